"""The adapter merged into a quantised student, and its gain won back: `llmkd export --to merged` (GGUF,
nf4 and fp4 students) and `benchmarks/bench_merged.py` (those and HQQ students).

Merging a LoRA into quantised weights means quantising them again: each layer's weight as the engine
multiplies with it, plus the adapter's delta (peft's `get_delta_weight`), goes through the layer's own
quantizer (the same GGUF block type; bitsandbytes' 4-bit type, block size and double quantisation; HQQ
with the same bits and group size). For llmkd's students the delta is smaller than one quantisation
step, so most of it rounds off. Recovery then trains what stays continuous in the format against the
teacher's cached targets, the integer codes fixed (EfficientQAT's end-to-end stage): each GGUF block's
fp16 scale d (and min m for q4_1 and q5_1), each bitsandbytes block's absmax (on its 8-bit grid where
double-quantised), each HQQ group's scale and zero. The forward uses them as they will be stored (a
straight-through rounding), so what trains is what ships. The result is one model with no adapter, at
the base's exact size in bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llmkd import models, quantize
from llmkd.config import RECOVERY_STEPS, Recipe, recovery_lr
from llmkd.errors import LlmkdError
from llmkd.gguf_quant import GGUFLinear, quantize_rows, unpack, with_scales
from llmkd.progress import bar as progress_bar



class ScaledBlocks(torch.nn.Module):
    """A GGUF layer whose codes are fixed and whose block scales (and mins) train."""

    def __init__(self, layer: GGUFLinear):
        super().__init__()
        self.layer = layer
        shape = (layer.out_features, layer.in_features)
        codes, d, m = unpack(layer.weight, layer.qtype, shape)
        self.register_buffer("codes", codes.to(torch.int8))  # every type's codes fit in int8
        self.d = torch.nn.Parameter(d)
        self.m = torch.nn.Parameter(m) if m is not None else None

    @staticmethod
    def _as_stored(x: torch.Tensor) -> torch.Tensor:
        return x + (x.to(torch.float16).float() - x).detach()  # fp16 in the forward, fp32 for Adam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = self._as_stored(self.d) * self.codes.float()
        if self.m is not None:
            w = w + self._as_stored(self.m)
        w = w.view(layer.out_features, layer.in_features).to(layer.compute_dtype)
        return torch.nn.functional.linear(x.to(layer.compute_dtype), w, layer.bias).to(x.dtype)

    def settle(self) -> GGUFLinear:
        """The layer with the trained scales written into its blocks."""
        layer = self.layer
        shape = (layer.out_features, layer.in_features)
        layer.weight = with_scales(layer.weight, layer.qtype, shape, self.d, self.m)
        return layer


class ScaledGroups(torch.nn.Module):
    """An HQQ layer (axis 1, scales and zeros not themselves quantised) whose codes are fixed and whose
    group scales and zeros train. The forward is HQQ's dequantisation, `(codes - zero) * scale` in the
    compute dtype. The zero is in codes, the scale in weight units: the zero trains as the offset
    `-zero * scale`, in weight units like the scale, so that one learning rate moves both alike."""

    def __init__(self, layer):
        super().__init__()
        meta = layer.meta
        if meta.get("axis") != 1 or meta.get("quant_scale") or meta.get("quant_zero") or "scale" not in meta:
            raise LlmkdError("merging HQQ layers needs axis 1 with plain scales and zeros (llmkd's HQQ students)")
        self.layer = layer
        groups = meta["shape"][0] * meta["shape"][1] // meta["group_size"]
        codes = layer.unpack(dtype=torch.float32)[:groups]  # 3 bits pack ten to a word: rows past the groups pad
        self.register_buffer("codes", codes.to(torch.uint8))
        self.scale = torch.nn.Parameter(meta["scale"].float().clone())  # hqq quantises in inference mode
        self.offset = torch.nn.Parameter(-meta["zero"].float() * self.scale.detach())

    def _as_stored(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.layer.compute_dtype
        return (x + (x.to(dtype).float() - x).detach()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = (self.codes.to(layer.compute_dtype) - self._as_stored(self._zero())) * self._as_stored(self.scale)
        out = torch.matmul(x, w.reshape(layer.meta["shape"]).t())
        return out + layer.bias if layer.bias is not None else out

    def _zero(self) -> torch.Tensor:
        return -self.offset / self.scale

    def settle(self):
        """The layer with the trained scales and zeros in its meta."""
        layer = self.layer
        layer.meta["scale"] = self.scale.detach().to(layer.compute_dtype)
        layer.meta["zero"] = self._zero().detach().to(layer.compute_dtype)
        return layer


def _stored_4bit(layer):
    """`layer` (bitsandbytes 4-bit) in its stored layout. bitsandbytes' CPU inference repacks a layer's
    weight at its first forward in eval mode on AVX512-BF16 CPUs; unpacked as its own save does."""
    import bitsandbytes.functional as F

    p = layer.weight
    if getattr(p.quant_state, "packing_format_for_cpu", False):
        p.data, p.quant_state = F._convert_weight_packed_for_cpu_inverse(p.data, p.quant_state)
    return layer


class ScaledAbsmax(torch.nn.Module):
    """A bitsandbytes 4-bit layer (NF4 or FP4) whose 4-bit codes are fixed and whose block absmax trains.
    The forward is bitsandbytes' dequantisation, `code[q] * absmax` per block in fp32, cast to the
    weight's dtype, then to the compute dtype. With double quantisation the absmax is stored as 8-bit
    codes of its offset from a mean, in blocks of 256 with an fp32 scale each: the forward rounds it to
    those codes straight through, the mean and the scales fixed, so the bytes stay the base's."""

    def __init__(self, layer):
        super().__init__()
        import bitsandbytes.functional as F

        self.layer = _stored_4bit(layer)
        state = layer.weight.quant_state
        packed = layer.weight.data.view(torch.uint8).reshape(-1)
        codes = torch.empty(2 * packed.numel(), dtype=torch.uint8, device=packed.device)
        codes[::2], codes[1::2] = packed >> 4, packed & 0xF  # the first of each pair in the high nibble
        # Each weight's code value, looked up once (fp32 holds NF4's and FP4's values exactly).
        self.register_buffer("levels", state.code.float()[codes[: state.shape.numel()].long()])
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        self.absmax = torch.nn.Parameter(absmax.float().clone())

    def _absmax_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The 8-bit codes of a nested absmax `x`, as bitsandbytes' quantize_blockwise rounds them
        (to the nearest entry of its sorted map), against the stored mean and block scales."""
        state = self.layer.weight.quant_state
        nested = state.state2
        scale = nested.absmax.repeat_interleave(nested.blocksize)[: x.numel()]
        bounds = (nested.code[:-1] + nested.code[1:]) / 2
        return torch.bucketize(((x - state.offset) / scale).clamp(-1, 1), bounds).to(torch.uint8)

    def _as_stored(self, x: torch.Tensor) -> torch.Tensor:
        state = self.layer.weight.quant_state
        if not state.nested:
            return x  # stored in fp32 as it trains
        import bitsandbytes.functional as F

        with torch.no_grad():
            stored = F.dequantize_blockwise(self._absmax_codes(x), state.state2) + state.offset
        return x + (stored - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, state = self.layer, self.layer.weight.quant_state
        scale = self._as_stored(self.absmax).repeat_interleave(state.blocksize)[: self.levels.numel()]
        w = (self.levels * scale).view(state.shape).to(state.dtype).to(layer.compute_dtype)
        bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
        return torch.nn.functional.linear(x.to(layer.compute_dtype), w, bias).to(x.dtype)

    def settle(self):
        """The layer with the trained absmax in its quant state (as 8-bit codes where it is nested)."""
        state, absmax = self.layer.weight.quant_state, self.absmax.detach().float()
        state.absmax = self._absmax_codes(absmax) if state.nested else absmax
        return self.layer


TRAINABLE = (ScaledBlocks, ScaledGroups, ScaledAbsmax)  # each format's layer, its scales training


def _mergeable_types() -> tuple[type, ...]:
    """The layer types llmkd merges into: GGUF's, bitsandbytes' 4-bit, and HQQ's where hqq is installed."""
    from bitsandbytes.nn import Linear4bit

    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return GGUFLinear, Linear4bit
    return GGUFLinear, Linear4bit, HQQLinear


def _trainable(layer) -> torch.nn.Module:
    from bitsandbytes.nn import Linear4bit

    if isinstance(layer, GGUFLinear):
        return ScaledBlocks(layer)
    return ScaledAbsmax(layer) if isinstance(layer, Linear4bit) else ScaledGroups(layer)


def _requantized(layer, delta: torch.Tensor):
    """`layer`'s weight plus `delta`, quantised again by the layer's own quantizer."""
    import bitsandbytes as bnb

    if isinstance(layer, GGUFLinear):
        layer.weight = quantize_rows(layer.dequantize() + delta.cpu(), layer.qtype).to(layer.weight.device)
        return layer
    if isinstance(layer, bnb.nn.Linear4bit):
        p = _stored_4bit(layer).weight
        merged = bnb.functional.dequantize_4bit(p.data, p.quant_state).float() + delta.to(p.device)
        data, state = bnb.functional.quantize_4bit(
            merged.to(p.quant_state.dtype), blocksize=p.blocksize, compress_statistics=p.compress_statistics,
            quant_type=p.quant_type, quant_storage=p.quant_storage)
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=p.blocksize,
                                         compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                         quant_storage=p.quant_storage, module=layer, bnb_quantized=True)
        return layer
    from hqq.core.quantize import HQQLinear

    dtype = layer.compute_dtype
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                             device=layer.W_q.device)
    linear.weight.copy_((layer.dequantize().float() + delta.to(layer.W_q.device)).to(dtype))
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    config = {**layer.quant_config, "offload_meta": layer.offload_meta}  # HQQLinear pops it from the one it keeps
    return HQQLinear(linear, quant_config=config, compute_dtype=dtype, device=layer.device, del_orig=True)


def _replace(model, kind, make) -> int:
    """Each module under `model` of `kind` replaced by `make(module)`; how many."""
    return quantize.replace_children(model, lambda m: isinstance(m, kind), lambda _, m: make(m))


def merge_requantized(student) -> torch.nn.Module:
    """The base model under `student` (a PeftModel over GGUF, bitsandbytes 4-bit or HQQ layers) with each adapted layer
    replaced by the merged weight quantised again by its own quantizer (no adapter left)."""
    from peft.tuners.lora import LoraLayer

    base = student.get_base_model()

    def merged(lora: LoraLayer):
        layer = lora.get_base_layer()
        if not isinstance(layer, _mergeable_types()):
            raise LlmkdError(f"merging into {type(layer).__name__} layers is not supported: "
                             "GGUF, bitsandbytes 4-bit (nf4, fp4) and HQQ students only")
        delta = sum(lora.get_delta_weight(name).float() for name in lora.active_adapters)
        return _requantized(layer, delta)

    with torch.no_grad():
        _replace(base, LoraLayer, merged)
    return base


@dataclass
class Recovery:
    steps: int
    lr: float
    seconds: float
    losses: list[float] = field(default_factory=list)

    def line(self) -> str:
        first, last = np.mean(self.losses[:8]), np.mean(self.losses[-8:])
        return (f"scales recovered, codes fixed: {self.steps} steps at lr {self.lr:g} in {self.seconds:.0f} s, "
                f"KD loss {first:.4f} -> {last:.4f} (mean of the first and last 8 steps)")


def recover(model, recipe: Recipe, tokenizer, *, steps: int = RECOVERY_STEPS, lr: float | None = None,
            progress: bool = True) -> Recovery:
    """Train the block scales of `model`'s GGUF layers (the block absmax of its bitsandbytes 4-bit layers,
    the group scales and zeros of its HQQ layers) against the run's transfer set (its KD loss without CE,
    batch size and seed), codes fixed; the layers keep them. `lr`: config.recovery_lr of the quantizer if None."""
    from llmkd.train import TrainingData, collate, loss_step

    lr = lr or recovery_lr(recipe.model.quant)

    # Recovery wins back fidelity to the teacher: the KD term alone, whatever CE weight the run trained with.
    loss = recipe.train.loss.model_copy(update={"alpha": 0.0})
    data = TrainingData.open(recipe, tokenizer)
    examples = data.examples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    n = _replace(model, _mergeable_types(), _trainable)
    scales = [p for m in model.modules() if isinstance(m, TRAINABLE)
              for p in m.parameters(recurse=False)]
    optimizer = torch.optim.Adam(scales, lr=lr)
    order = np.random.default_rng(recipe.train.seed).permutation(len(examples))
    batch_size, t0, losses = recipe.train.batch_size, time.perf_counter(), []
    device = next(model.parameters()).device
    model.train()
    with progress_bar(total=steps, desc=f"recovering the scales of {n} layers", unit="step", disable=not progress) as bar:
        for step in range(steps):
            start = step * batch_size % max(len(examples) - batch_size + 1, 1)
            batch = collate([examples[int(i)] for i in order[start : start + batch_size]], pad).to(device)
            terms = loss_step(model, batch, loss, float(batch.response_tokens))
            terms.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(terms.loss.detach().item())
            bar.update(1)
    model.eval()
    with torch.no_grad():
        _replace(model, TRAINABLE, lambda m: m.settle())
    return Recovery(steps=steps, lr=lr, seconds=time.perf_counter() - t0, losses=losses)


def merged_students(recipe: Recipe, adapter, tokenizer, *, steps: int = RECOVERY_STEPS, lr: float | None = None,
                    progress: bool = True):
    """(merged and re-quantized, merged and recovered, Recovery) of the run's student and adapter."""
    import copy

    requantized = merge_requantized(models.load_student(recipe.model, adapter=adapter))
    recovered = copy.deepcopy(requantized)
    recovery = recover(recovered, recipe, tokenizer, steps=steps, lr=lr, progress=progress)
    return requantized, recovered, recovery
