"""The student's quantizer (`model.quant`): what each choice is, how the student is loaded with it,
how many bytes it holds per weight (planned) and in fact (measured from the loaded layers).

- bitsandbytes, quantised on load by transformers: `nf4` and `fp4` (QLoRA's 4-bit `Linear4bit`;
  `model.double_quant` applies) and `int8` (LLM.int8's `Linear8bitLt`).
- HQQ at 2, 3, 4 and 8 bits, group size `model.hqq_group_size`. transformers refuses `HqqConfig`
  here, so the model is loaded in the compute dtype on the CPU and every linear layer of the decoder
  (not lm_head) is moved to the device and replaced there by hqq's `HQQLinear` on its PyTorch
  backend, one at a time; the rest follows at the end. The device never holds the 16-bit model (in
  `llmkd eval` the teacher is already there): at most the layers quantised so far and one in flight.
  peft puts LoRA on those layers. Their scales and zeros stay in the compute dtype, which the byte
  counts show.
- GGUF (`gguf-q4_0`, q4_1, q5_0, q5_1, q8_0): llama.cpp's own blocks, written by the `gguf` package
  (`llmkd.gguf_quant`), loaded and replaced on the device layer by layer as HQQ's; `llmkd export --to
  gguf` ships these very bytes.

Every choice quantises the same linear layers: all `nn.Linear` but the output embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkd import gguf_quant
from llmkd.config import ModelConfig
from llmkd.errors import LlmkdError


@dataclass(frozen=True)
class Quantizer:
    name: str
    library: str  # "bitsandbytes", "hqq" or "gguf"
    bits: int

    @property
    def ggml_type(self) -> str:
        """The GGUF block type of a gguf quantizer ("q4_0")."""
        return self.name.removeprefix("gguf-")


QUANTIZERS = {q.name: q for q in (
    Quantizer("nf4", "bitsandbytes", 4), Quantizer("fp4", "bitsandbytes", 4), Quantizer("int8", "bitsandbytes", 8),
    Quantizer("hqq2", "hqq", 2), Quantizer("hqq3", "hqq", 3), Quantizer("hqq4", "hqq", 4), Quantizer("hqq8", "hqq", 8),
    *(Quantizer(f"gguf-{t}", "gguf", gguf_quant.BITS[t]) for t in gguf_quant.TYPES),
)}


def quantizer(cfg: ModelConfig) -> Quantizer:
    return QUANTIZERS[cfg.quant]


def _bnb_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage),
    )


def from_pretrained_kwargs(cfg: ModelConfig, compute_dtype: torch.dtype, device_map: dict) -> dict:
    """What `from_pretrained` needs to load the student of `cfg` for `device_map` ({"": device}):
    bitsandbytes quantises onto the device while loading, HQQ's and GGUF's 16-bit weights load on the CPU."""
    if quantizer(cfg).library == "bitsandbytes":
        return {"device_map": device_map, "quantization_config": _bnb_config(cfg, compute_dtype)}
    return {"device_map": {"": "cpu"}}


def quantize_loaded(model, cfg: ModelConfig, compute_dtype: torch.dtype, device_map: dict):
    """The model `from_pretrained` returned with `from_pretrained_kwargs`, quantised as `cfg` says, on
    `device_map`'s device."""
    q = quantizer(cfg)
    if q.library == "hqq":
        return _hqq_quantize(model, q.bits, cfg.hqq_group_size, compute_dtype, device_map[""])
    if q.library == "gguf":
        device = device_map[""]
        return _replace_decoder_linears(model, lambda _, c: gguf_quant.GGUFLinear(c, q.ggml_type, compute_dtype, device),
                                        device)
    return model


def replace_children(model, select, make) -> int:
    """Each module under `model` for which `select(module)` holds replaced, one at a time, by
    `make(name, module)`; how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if select(child)]
    for parent, name, child in targets:
        setattr(parent, name, make(name, child))
    return len(targets)


def _replace_decoder_linears(model, make, device):
    """Every linear layer of `model`'s decoder (not the output embedding) replaced by `make(name, layer)` on
    `device`, one at a time (the device never holds the 16-bit model); the rest moved there after."""
    head = model.get_output_embeddings()
    replace_children(model, lambda m: isinstance(m, torch.nn.Linear) and m is not head, make)
    model.to(device)  # what is not quantised: embeddings, norms, lm_head, rotary buffers
    model.hqq_quantized = True  # peft's prepare_model_for_kbit_training: no fp32 upcast, no re-quantisation
    return model


def _hqq_quantize(model, bits: int, group_size: int, compute_dtype: torch.dtype, device: str):
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    except ImportError:
        raise LlmkdError("model.quant hqq* needs hqq: DISABLE_CUDA=1 pip install hqq==0.2.8.post1 "
                         "(DISABLE_CUDA=1: its setup otherwise builds CUDA kernels)") from None
    HQQLinear.set_backend(HQQBackend.PYTORCH)  # plain torch: differentiable, runs on any device
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)

    def make(name, child):
        if child.weight.numel() % group_size:
            raise LlmkdError(f"model.hqq_group_size: {group_size} does not divide the {child.weight.numel():,} "
                             f"weights of {name} ({child.in_features} x {child.out_features})")
        # Quantised where it will run, from the weight moved there (the same arithmetic as a model loaded
        # there whole); del_orig frees that copy.
        return HQQLinear(child.to(device), quant_config=config, compute_dtype=compute_dtype, device=device,
                         del_orig=True)

    return _replace_decoder_linears(model, make, device)


def _quantized_layer_types() -> tuple[type, ...]:
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    types: list[type] = [Linear4bit, Linear8bitLt, gguf_quant.GGUFLinear]
    try:
        from hqq.core.quantize import HQQLinear

        types.append(HQQLinear)
    except ImportError:
        pass
    return tuple(types)


def _held_tensors(obj, depth: int = 3) -> list[torch.Tensor]:
    """Tensors an object holds in its attributes, dicts and quantisation states (not child modules)."""
    found: list[torch.Tensor] = []
    if depth < 0:
        return found
    if isinstance(obj, torch.Tensor):
        return [obj, *_held_tensors(vars(obj), depth - 1)] if hasattr(obj, "__dict__") else [obj]
    values = obj.values() if isinstance(obj, dict) else (
        [v for k, v in vars(obj).items() if k not in ("_modules", "base_layer")] if hasattr(obj, "__dict__") else [])
    for v in values:
        if isinstance(v, torch.nn.Module):
            continue
        if isinstance(v, (torch.Tensor, dict)) or type(v).__name__ == "QuantState":
            found += _held_tensors(v, depth - 1)
    return found


def weight_bytes(model) -> dict:
    """Bytes the model holds, measured: in its quantised linear layers (packed weights, scales, zeros,
    quantisation constants) and in everything else (embeddings, norms, lm_head; LoRA excluded).
    A storage shared by several tensors (tied embeddings, a view) counts once."""
    types = _quantized_layer_types()
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    quantized = [m for m in model.modules() if isinstance(m, types)]
    in_quantized = count(t for m in quantized for t in _held_tensors(m))
    rest = count(t for name, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in name)
    return {"quantized_linears": in_quantized, "rest": rest, "total": in_quantized + rest,
            "quantized_layers": len(quantized)}


def hqq_layers(model) -> dict[str, torch.nn.Module]:
    """`model`'s HQQ layers by name, found by class name: hqq is an optional extra, imported only by who uses it."""
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "HQQLinear"}


def quantization_report(model) -> dict:
    """The quantisation that actually runs in `model`, read from its layers (not the recipe), with
    the bytes it holds.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its fused kernel at the first
    inference forward and expands double-quantised constants to fp32 (`packing_format_for_cpu`):
    the values are those of the double quantisation, the storage is not.
    """
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    report: dict = {"weight_bytes": weight_bytes(model)}
    four = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if four:
        states = [m.weight.quant_state for m in four]
        packed = [bool(getattr(q, "packing_format_for_cpu", False)) for q in states]
        nested = {bool(getattr(q, "original_nested", q.nested)) if p else bool(q.nested) for q, p in zip(states, packed)}
        report.update({
            "linear4bit_layers": len(four),
            "quant_type": sorted({q.quant_type for q in states}),
            "double_quant": sorted(nested),
            "blocksize": sorted({int(q.blocksize) for q in states}),
            "compute_dtype": sorted({str(m.compute_dtype).removeprefix("torch.") for m in four}),
            "packed_for_cpu_kernel": sum(packed),
        })
    eight = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    if eight:
        report.update({"linear8bit_layers": len(eight), "quant_type": ["int8"]})
    metas = [m.meta for m in hqq_layers(model).values()]
    if metas:
        bits = sorted({int(m["nbits"]) for m in metas})
        report.update({
            "hqq_layers": len(metas), "quant_type": [f"hqq{b}" for b in bits],
            "bits": bits, "group_size": sorted({int(m["group_size"]) for m in metas}),
            "compute_dtype": sorted({str(m["compute_dtype"]).removeprefix("torch.") for m in metas}),
        })
    ggufs = [m for m in model.modules() if isinstance(m, gguf_quant.GGUFLinear)]
    if ggufs:
        report.update({
            "gguf_layers": len(ggufs), "quant_type": sorted({f"gguf-{m.qtype}" for m in ggufs}),
            "compute_dtype": sorted({str(m.compute_dtype).removeprefix("torch.") for m in ggufs}),
        })
    return report


def planned_bytes_per_weight(cfg: ModelConfig, in_features: int, compute_bytes: int) -> float:
    """What `cfg.quant` holds per weight of a linear layer with `in_features` inputs, as planned."""
    q = quantizer(cfg)
    if q.name in ("nf4", "fp4"):
        # 4 bits + one absmax per 64-weight block: fp32, or with double quantisation 1 byte plus one
        # fp32 constant per 256 blocks.
        return 0.5 + ((1 + 4 / 256) / 64 if cfg.double_quant else 4 / 64)
    if q.name == "int8":
        return 1 + 4 / in_features  # one fp32 scale per output row
    if q.library == "gguf":
        return gguf_quant.BLOCK_BYTES[q.ggml_type] / gguf_quant.BLOCK
    # HQQ packs 2 and 4 bits exactly, 3 bits ten to a 32-bit word; a scale and a zero per group.
    packed = {2: 2 / 8, 3: 4 / 10, 4: 4 / 8, 8: 1.0}[q.bits]
    return packed + 2 * compute_bytes / cfg.hqq_group_size
