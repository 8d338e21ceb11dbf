"""The adapter merged into a quantised student, and its gain won back: `llmkd export --to merged` (GGUF,
nf4, fp4 and HQQ students) and `benchmarks/bench_merged.py`.

Merging a LoRA into quantised weights means quantising them again: each layer's weight as the engine
multiplies with it, plus the adapter's delta (peft's `get_delta_weight`), goes through the layer's own
quantizer (the same GGUF block type; bitsandbytes' 4-bit type, block size and double quantisation; HQQ
with the same bits and group size). For llmkd's students the delta is smaller than one quantisation
step, so most of it rounds off when each weight goes to its nearest code. So the quantizer only sets the
scales, and the codes on that grid are chosen as GPTQ chooses them (`gptq_codes`), from each layer's
inputs on transfer-set tokens: a weight's rounding error is carried onto the weights not yet rounded, and
the layer's output keeps what the adapter changed. Recovery then trains what stays continuous in the
format against the teacher's cached targets, the integer codes fixed (EfficientQAT's end-to-end stage):
each GGUF block's fp16 scale d (and min m for q4_1 and q5_1), each bitsandbytes block's absmax (on its
8-bit grid where double-quantised), each HQQ group's scale and zero. The forward uses them as they will be
stored (a straight-through rounding), so what trains is what ships. The result is one model with no
adapter, at the base's exact size in bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llmkd import lora_init, models, quantize
from llmkd.config import MERGE_CALIBRATION_TOKENS, RECOVERY_STEPS, Recipe, recovery_lr
from llmkd.errors import LlmkdError
from llmkd.gguf_quant import CODE_RANGE, GGUFLinear, quantize_rows, unpack, with_codes, with_scales
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

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(levels, scale, offset): each weight can be `levels * scale + offset`, with its block's scale and
        offset (None: 0) as stored, each (out, in)."""
        layer = self.layer
        lo, hi = CODE_RANGE[layer.qtype]
        shape = (layer.out_features, layer.in_features)
        per_weight = lambda x: self._as_stored(x).detach().expand(self.codes.shape).reshape(shape)  # noqa: E731
        levels = torch.arange(lo, hi + 1, dtype=torch.float32, device=self.codes.device)
        return levels, per_weight(self.d), None if self.m is None else per_weight(self.m)

    def set_codes(self, index: torch.Tensor) -> None:
        """Each weight's code: `index` (out, in) into `grid`'s levels."""
        lo = CODE_RANGE[self.layer.qtype][0]
        self.codes = (index + lo).to(torch.int8).view(self.codes.shape)

    def settle(self) -> GGUFLinear:
        """The layer with the codes and the trained scales written into its blocks."""
        layer = self.layer
        shape = (layer.out_features, layer.in_features)
        layer.weight = with_codes(with_scales(layer.weight, layer.qtype, shape, self.d, self.m), layer.qtype, shape,
                                  self.codes)
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

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels, scale, offset): each weight can be `levels * scale + offset`, with its group's scale and
        offset as stored, each (out, in)."""
        shape, codes = self.layer.meta["shape"], self.codes
        scale, zero = self._as_stored(self.scale).float(), self._as_stored(self._zero()).float()
        per_weight = lambda x: x.detach().expand(codes.shape).reshape(shape)  # noqa: E731
        levels = torch.arange(2 ** self.layer.meta["nbits"], dtype=torch.float32, device=codes.device)
        return levels, per_weight(scale), per_weight(-zero * scale)

    def set_codes(self, index: torch.Tensor) -> None:
        """Each weight's code: `index` (out, in) into `grid`'s levels."""
        self.codes = index.to(torch.uint8).view(self.codes.shape)

    def settle(self):
        """The layer with the codes packed into W_q, the trained scales and zeros in its meta."""
        from hqq.core.quantize import Quantizer

        layer = self.layer
        packed = Quantizer.pack[layer.meta["packing"]](self.codes)
        layer.W_q.data = packed.to(layer.W_q.dtype).view(layer.W_q.shape)
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
        self.register_buffer("codes", codes)
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

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(levels, scale, None): each weight can be `levels * scale`, with its block's absmax as stored as
        the scale, (out, in)."""
        state = self.layer.weight.quant_state
        scale = self._as_stored(self.absmax).detach().repeat_interleave(state.blocksize)[: self.levels.numel()]
        return state.code.float(), scale.view(state.shape), None

    def set_codes(self, index: torch.Tensor) -> None:
        """Each weight's code: `index` (out, in) into `grid`'s levels."""
        index = index.flatten()
        self.codes[: index.numel()] = index.to(torch.uint8)
        self.levels = self.layer.weight.quant_state.code.float()[index]

    def settle(self):
        """The layer with the codes packed into its weight, the trained absmax in its quant state (as 8-bit
        codes where it is nested)."""
        state, absmax = self.layer.weight.quant_state, self.absmax.detach().float()
        self.layer.weight.data.view(torch.uint8).view(-1).copy_((self.codes[::2] << 4) | self.codes[1::2])
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


def _weight(layer) -> torch.Tensor:
    """`layer`'s weight as its engine multiplies with it, fp32 (out, in)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        p = _stored_4bit(layer).weight
        return bnb.functional.dequantize_4bit(p.data, p.quant_state).float()
    return layer.dequantize().float()


def _requantized(layer, merged: torch.Tensor):
    """`layer` holding the weight `merged` (fp32, (out, in)), quantised by the layer's own quantizer."""
    import bitsandbytes as bnb

    if isinstance(layer, GGUFLinear):
        layer.weight = quantize_rows(merged.cpu(), layer.qtype).to(layer.weight.device)
        return layer
    if isinstance(layer, bnb.nn.Linear4bit):
        p = _stored_4bit(layer).weight
        data, state = bnb.functional.quantize_4bit(
            merged.to(p.device, p.quant_state.dtype), blocksize=p.blocksize, compress_statistics=p.compress_statistics,
            quant_type=p.quant_type, quant_storage=p.quant_storage)
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=p.blocksize,
                                         compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                         quant_storage=p.quant_storage, module=layer, bnb_quantized=True)
        return layer
    from hqq.core.quantize import HQQLinear

    dtype = layer.compute_dtype
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                             device=layer.W_q.device)
    linear.weight.copy_(merged.to(linear.weight.device, dtype))
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    config = {**layer.quant_config, "offload_meta": layer.offload_meta}  # HQQLinear pops it from the one it keeps
    return HQQLinear(linear, quant_config=config, compute_dtype=dtype, device=layer.device, del_orig=True)


def gptq_codes(target: torch.Tensor, hessian: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor | None = None, *, block: int = 128, damp: float = 0.01,
               act_order: bool = True) -> torch.Tensor:
    """The codes of `target` (out, in) on a fixed grid, each weight `levels[code] * scale + offset` (scale and
    offset (out, in)), as an index into `levels`. Chosen column by column as GPTQ does: a column goes to its
    nearest levels, and its rounding error is spread over the columns not yet rounded through the inverse of
    `hessian` (the layer inputs' X^T X), so that the layer's output on those inputs moves least. With
    uncorrelated inputs (a diagonal hessian) this is rounding to nearest. `act_order`: the columns of the
    largest inputs first (GPTQ's act-order), while the most columns are left to absorb their errors."""
    h = hessian.float()
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(h.shape[0], device=h.device))
    w, h = target.float()[:, order].clone(), h[order][:, order].clone()
    scale = scale[:, order]
    offset = None if offset is None else offset[:, order]
    rows, cols = w.shape
    dead = h.diagonal() == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    index = torch.empty(rows, cols, dtype=torch.long, device=w.device)
    for i in range(0, cols, block):  # GPTQ's lazy batch: the columns past the block updated once per block
        j = min(i + block, cols)
        errors = torch.empty(rows, j - i, device=w.device)
        for k in range(i, j):
            values = levels * scale[:, k : k + 1] + (0 if offset is None else offset[:, k : k + 1])
            index[:, k] = (values - w[:, k : k + 1]).abs().argmin(1)
            error = (w[:, k] - values.gather(1, index[:, k : k + 1]).squeeze(1)) / u[k, k]
            w[:, k:j] -= error[:, None] * u[k, k:j][None, :]
            errors[:, k - i] = error
        w[:, j:] -= errors @ u[i:j, j:]
    return index[:, torch.argsort(order)]


def _replace(model, kind, make) -> int:
    """Each module under `model` of `kind` replaced by `make(module)`; how many."""
    return quantize.replace_children(model, lambda m: isinstance(m, kind), lambda _, m: make(m))


def merge_requantized(student, blocks: torch.Tensor | None = None, *, batch: int = 4,
                      progress: bool = False) -> torch.nn.Module:
    """The base model under `student` (a PeftModel over GGUF, bitsandbytes 4-bit or HQQ layers) with each adapted
    layer replaced by the merged weight quantised again by its own quantizer (no adapter left).

    Without `blocks` each merged weight is rounded to its nearest codes. With `blocks` (calibration token ids, as
    `lora_init.calibration_blocks` cuts them) the quantizer still sets the scales, and the codes on that grid are
    chosen by `gptq_codes`, decoder layer by decoder layer: a layer's inputs are the hidden states that the
    layers merged before it hand on, so that it also absorbs their rounding. One layer's statistics at a time."""
    from peft.tuners.lora import LoraLayer

    base = student.get_base_model()
    hessians: dict = {}

    def merged(lora: LoraLayer):
        layer = lora.get_base_layer()
        if not isinstance(layer, _mergeable_types()):
            raise LlmkdError(f"merging into {type(layer).__name__} layers is not supported: "
                             "GGUF, bitsandbytes 4-bit (nf4, fp4) and HQQ students only")
        weight = _weight(layer)
        target = weight + sum(lora.get_delta_weight(name).float() for name in lora.active_adapters).to(weight.device)
        layer = _requantized(layer, target)
        if lora not in hessians:
            return layer
        wrapper = _trainable(layer)
        wrapper.set_codes(gptq_codes(target, hessians.pop(lora), *wrapper.grid()))
        return wrapper.settle()

    def accumulate(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        hessians[module] = x.t() @ x + hessians.get(module, 0)

    with torch.no_grad():
        if blocks is not None:
            mode = student.training
            student.train()  # bitsandbytes repacks (and rounds) a CPU 4-bit layer at its first eval-mode forward
            with lora_init.dropout_off(student):
                hidden, kwargs = lora_init.first_layer_inputs(student, blocks, batch)
                layers = lora_init.decoder_layers(student)
                with progress_bar(total=len(layers), desc="merging on calibration inputs", unit="layer",
                                  disable=not progress) as bar:
                    for layer in layers:
                        handles = [m.register_forward_pre_hook(accumulate) for m in layer.modules()
                                   if isinstance(m, LoraLayer)]
                        try:
                            for h in hidden:
                                lora_init.layer_output(layer, h, kwargs)
                        finally:
                            for handle in handles:
                                handle.remove()
                        _replace(layer, LoraLayer, merged)
                        hidden = [lora_init.layer_output(layer, h, kwargs) for h in hidden]
                        bar.update(1)
            student.train(mode)
        _replace(base, LoraLayer, merged)  # every adapted layer left (all of them without calibration)
    return base


@dataclass
class Recovery:
    steps: int
    lr: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    calibration_tokens: int = 0  # those the merge chose its codes on (0: rounded to nearest)

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
                    calibration_tokens: int = MERGE_CALIBRATION_TOKENS, progress: bool = True):
    """(merged and re-quantized, merged and recovered, Recovery) of the run's student and adapter. The merge
    chooses its codes on `calibration_tokens` of the transfer set (0: rounds to nearest)."""
    import copy

    from llmkd.train import TrainingData

    blocks = None  # one block a forward: a small transfer set still gives every block it holds
    if calibration_tokens:
        blocks = lora_init.calibration_blocks(TrainingData.open(recipe, tokenizer).examples, calibration_tokens, 1)
    student = models.load_student(recipe.model, adapter=adapter)
    requantized = merge_requantized(student, blocks, batch=1, progress=progress)
    recovered = copy.deepcopy(requantized)
    recovery = recover(recovered, recipe, tokenizer, steps=steps, lr=lr, progress=progress)
    recovery.calibration_tokens = 0 if blocks is None else blocks.numel()
    return requantized, recovered, recovery
