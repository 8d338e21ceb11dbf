"""The adapter merged into a GGUF student's blocks, and its gain won back: `llmkd export --to merged`.

Merging a LoRA into quantised weights means quantising them again: each layer's weight as llama.cpp
multiplies with it, plus the adapter's delta (peft's `get_delta_weight`), goes through the same
block quantizer. For llmkd's students the delta is smaller than one quantisation step, so most of it
rounds off. Recovery then trains what stays continuous in the format, each block's fp16 scale d (and
min m for q4_1 and q5_1), against the teacher's cached targets with the integer codes fixed:
EfficientQAT's end-to-end stage. The forward uses the scales as fp16 will store them (a straight-
through rounding), so what trains is what ships. The result is one model with no adapter, at the
base's exact size in bytes: GGUFLinear layers whose blocks `export_gguf.write_base` writes unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llmkd import models
from llmkd.config import Recipe
from llmkd.gguf_quant import GGUFLinear, quantize_rows, unpack, with_scales
from llmkd.progress import bar as progress_bar

RECOVERY_STEPS = 64  # optimizer steps of the scales' training, at the recipe's batch size
RECOVERY_LR = 1e-5  # Adam on the scales (each about max|w| / 8, ~1e-2): ~0.1% of a scale per step


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


def _replace(model, kind, make) -> int:
    """Each child of `model` of `kind` replaced by `make(child)`; how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, kind)]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def merge_requantized(student) -> torch.nn.Module:
    """The base model under `student` (a PeftModel over GGUF layers) with each adapted layer replaced by
    the merged weight quantised again with its own block type (no adapter left)."""
    from peft.tuners.lora import LoraLayer

    base = student.get_base_model()

    def merged(lora: LoraLayer) -> GGUFLinear:
        layer = lora.get_base_layer()
        delta = sum(lora.get_delta_weight(name).float() for name in lora.active_adapters)
        layer.weight = quantize_rows(layer.dequantize() + delta.cpu(), layer.qtype).to(layer.weight.device)
        return layer

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
        return (f"block scales recovered: {self.steps} steps at lr {self.lr:g} in {self.seconds:.0f} s, "
                f"KD loss {first:.4f} -> {last:.4f} (mean of the first and last 8 steps)")


def recover(model, recipe: Recipe, tokenizer, *, steps: int = RECOVERY_STEPS, lr: float = RECOVERY_LR,
            progress: bool = True) -> Recovery:
    """Train the block scales of `model`'s GGUF layers against the run's transfer set (its KD loss,
    batch size and seed), codes fixed; the layers keep the trained scales."""
    from llmkd.train import TrainingData, collate, loss_step

    data = TrainingData.open(recipe, tokenizer)
    examples = data.examples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    n = _replace(model, GGUFLinear, ScaledBlocks)
    scales = [p for m in model.modules() if isinstance(m, ScaledBlocks) for p in (m.d, m.m) if p is not None]
    optimizer = torch.optim.Adam(scales, lr=lr)
    order = np.random.default_rng(recipe.train.seed).permutation(len(examples))
    batch_size, t0, losses = recipe.train.batch_size, time.perf_counter(), []
    device = next(model.parameters()).device
    model.train()
    with progress_bar(total=steps, desc=f"recovering the scales of {n} layers", unit="step", disable=not progress) as bar:
        for step in range(steps):
            start = step * batch_size % max(len(examples) - batch_size + 1, 1)
            batch = collate([examples[int(i)] for i in order[start : start + batch_size]], pad).to(device)
            terms = loss_step(model, batch, recipe.train.loss, float(batch.response_tokens))
            terms.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(terms.loss))
            bar.update(1)
    model.eval()
    with torch.no_grad():
        _replace(model, ScaledBlocks, ScaledBlocks.settle)
    return Recovery(steps=steps, lr=lr, seconds=time.perf_counter() - t0, losses=losses)


def merged_students(recipe: Recipe, adapter, tokenizer, *, steps: int = RECOVERY_STEPS, lr: float = RECOVERY_LR,
                    progress: bool = True):
    """(merged and re-quantized, merged and recovered, Recovery) of the run's GGUF student and adapter."""
    requantized = merge_requantized(models.load_student(recipe.model, adapter=adapter))
    recovered = merge_requantized(models.load_student(recipe.model, adapter=adapter))
    recovery = recover(recovered, recipe, tokenizer, steps=steps, lr=lr, progress=progress)
    return requantized, recovered, recovery
