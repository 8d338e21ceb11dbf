"""Frozen quantised weights dequantized once for a block of work, on the CPU, where the library would
do it per call.

bitsandbytes' CPU 4-bit matmul (`matmul_4bit`), HQQ's PyTorch backend and GGUFLinear dequantize the weight on
every forward and again in backward, then run a plain matmul: dequantizing once gives the same
numbers (tests check bitwise equal logits) for less work. bitsandbytes has a second CPU path: with
AVX512-BF16, an inference forward (module in eval mode, input without grad) repacks the weight for a
fused kernel instead. The block then leaves those layers to bitsandbytes, so the numbers stay
bitsandbytes' own. LLM.int8 layers quantise their inputs too: they are left alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from llmkd import quantize, sharding
from llmkd.gguf_quant import GGUFLinear

MAX_BYTES = 4 << 30  # a CPU-sized model; beyond this the copy costs more memory than it saves time


def repacked_for_cpu_inference(module) -> bool:
    """Whether bitsandbytes has repacked this 4-bit layer for its fused AVX512-BF16 inference kernel
    (it does so at the layer's first inference forward, for good)."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _dequantizes_per_call(layer, training: bool) -> bool:
    """Whether bitsandbytes would run this layer as dequantize-then-matmul (see Linear4bit.forward)."""
    if layer.weight.device.type != "cpu" or layer.compute_dtype is None:
        return False
    if repacked_for_cpu_inference(layer):
        return False  # already repacked for the fused kernel
    fused = getattr(layer, "support_avx512bf16_for_cpu", False) and not training
    return not fused


@contextlib.contextmanager
def dequantized_once(model, *, enabled: bool = True) -> Iterator[dict]:
    """Within the block, the CPU 4-bit layers of `model` that bitsandbytes would dequantize per call
    use one dequantized copy. Yields {"dequantized_once": layers, "reason": ...} for the run's summary.

    Decided once at entry from the model's mode: call it around training (train mode) or around
    inference (eval mode), not across a mode switch.
    """
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    sharded = sharding.is_sharded(model)  # each rank holds shards, gathered for every forward
    all_4bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    hqq = [m for m in quantize.hqq_layers(model).values() if m.W_q.device.type == "cpu"]
    gguf = [] if sharded else [m for m in model.modules() if isinstance(m, GGUFLinear) and m.weight.device.type == "cpu"]
    layers = [] if sharded else [m for m in all_4bit if _dequantizes_per_call(m, model.training)]
    size = sum(m.weight.quant_state.shape.numel() * m.compute_dtype.itemsize for m in layers)
    size += sum(_numel(m.meta["shape"]) * m.compute_dtype.itemsize for m in hqq)
    size += sum(m.in_features * m.out_features * m.compute_dtype.itemsize for m in gguf)
    if not enabled:
        reason = "fast_paths off"
    elif sharded:
        reason = "the student is sharded (train.sharding): its weights are gathered for each forward"
    elif not all_4bit and not hqq and not gguf:
        reason = "no 4-bit, HQQ or GGUF layers"
    elif not layers and not hqq and not gguf:
        reason = "bitsandbytes runs its own kernel here (GPU, or the CPU's fused AVX512-BF16 inference path)"
    elif size > MAX_BYTES:
        reason = f"the dequantized copy would take {size / 2**30:.1f} GiB"
    else:
        library = "HQQ" if hqq else "GGUF" if gguf else "bitsandbytes"
        reason = f"{library} dequantizes per call here; dequantized once instead"
    status = {"dequantized_once": len(layers) + len(hqq) + len(gguf) if reason.endswith("instead") else 0, "reason": reason}
    if not status["dequantized_once"]:
        yield status
        return
    for m in layers:
        weight = dequantize_4bit(m.weight.data, m.weight.quant_state).to(m.compute_dtype)
        m.forward = _dense_forward(m, weight)  # an instance attribute shadows the class's forward
    for m in hqq:
        m.forward = _hqq_dense_forward(m, m.dequantize().detach())
    for m in gguf:
        m.forward = _dense_forward(m, m.dequantize().to(m.compute_dtype))  # GGUFLinear.forward, dequantized once
    layers += hqq + gguf
    try:
        yield status
    finally:
        for m in layers:
            del m.forward


def _dense_forward(layer, weight: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:  # Linear4bit.forward with the weight already dequantized
        bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
        return torch.nn.functional.linear(x.to(layer.compute_dtype), weight, bias).to(x.dtype)

    return forward


def _hqq_dense_forward(layer, weight: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:  # HQQMatmulNoCacheMul.forward with the weight dequantized
        out = torch.matmul(x, weight.t())
        if layer.bias is not None:
            out += layer.bias
        return out

    return forward


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
