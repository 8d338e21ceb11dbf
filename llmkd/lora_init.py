"""Activation-preserving LoRA initialisation (`lora.init: activations`), run before the end-to-end KD.

As ApiQ's block-wise variant and EfficientQAT's block stage: decoder layer by decoder layer, the
student's LoRA is trained to reproduce the 16-bit teacher's layer output on calibration tokens. The
student is fed its *own* preceding (already initialised) layers' outputs, the teacher its own, so a
layer also learns to undo the error its predecessors pass on. It needs the teacher's weights, not
its logits, and touches only the LoRA parameters.

Calibration tokens: the transfer set's examples (prompt + response), concatenated in their order and
cut into blocks of `CALIBRATION_BLOCK` tokens, the first `lora.init_tokens` of them; with
`lora.init_text`, the first half of them, and that file's first tokens the other half. Per layer,
`lora.init_steps` Adam steps at `lora.init_lr`, each on `lora.init_batch` blocks drawn at random
(seeded by train.seed and the layer), minimising each token's squared error to the teacher's output over
that output's squared norm (the relative error, averaged over tokens; also the figure reported).
A layer whose fit ends with a higher error than it started with (an lr too high) is put back as
built, and the report says so. The whole init runs with the LoRA dropout off: its errors, the put-back
rule and the hidden states handed to the next layer are those of the adapter itself, not of one draw
of dropout noise; training's dropout acts afterwards as the recipe says.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmkd import models
from llmkd.errors import LlmkdError
from llmkd.fastpath.dequantize import repacked_for_cpu_inference

CALIBRATION_BLOCK = 256  # tokens per calibration sequence: long enough for attention to matter


@dataclass
class LayerFit:
    layer: int
    relative_error_before: float  # the layer's output error with the adapter as built (a no-op)
    relative_error_after: float
    kept: bool = True  # False: the fit raised the error (too high an lr), the layer's LoRA was put back


@dataclass
class InitReport:
    method: str
    blocks: int
    tokens: int
    steps_per_layer: int
    seconds: float
    layers: list[LayerFit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        first, last = self.layers[0], self.layers[-1]
        put_back = [f.layer for f in self.layers if not f.kept]
        return (f"LoRA initialised from the teacher's activations: {len(self.layers)} layers x {self.steps_per_layer} "
                f"steps on {self.tokens:,} tokens in {self.seconds:.0f} s; last layer's relative error "
                f"{last.relative_error_before:.4f} -> {last.relative_error_after:.4f} "
                f"(first layer {first.relative_error_before:.4f} -> {first.relative_error_after:.4f})"
                + (f"; {len(put_back)} layer(s) whose fit raised the error put back as built (lora.init_lr too "
                   f"high?): {put_back}" if put_back else ""))


def calibration_blocks(rows, tokens: int, batch: int, text_ids: list[int] | None = None) -> torch.Tensor:
    """(n, CALIBRATION_BLOCK) token ids from transfer-set `rows` (an iterable of rows with input_ids);
    n is a multiple of `batch`, at least one batch. With `text_ids` (lora.init_text's tokens), half of
    `tokens` from the rows and the other half from text_ids, each a whole number of batches."""
    per_batch = batch * CALIBRATION_BLOCK
    if text_ids is not None:
        half = max(1, tokens // 2 // per_batch) * per_batch
        if len(text_ids) < half:
            raise LlmkdError(f"lora.init_text: {len(text_ids):,} tokens, fewer than the {half:,} it is to give "
                             f"(half of lora.init_tokens, in batches of lora.init_batch x {CALIBRATION_BLOCK})")
        text = torch.tensor(text_ids[:half], dtype=torch.long).view(-1, CALIBRATION_BLOCK)
        return torch.cat([calibration_blocks(rows, tokens - half, batch), text])
    need = max(per_batch, -(-tokens // per_batch) * per_batch)
    stream: list[int] = []
    for r in rows:
        stream.extend(int(t) for t in r["input_ids"])
        if len(stream) >= need:
            break
    n = len(stream) // per_batch * batch
    if n == 0:
        raise LlmkdError(f"lora.init activations: the transfer set holds {len(stream)} tokens, fewer than one "
                         f"calibration batch (lora.init_batch {batch} x {CALIBRATION_BLOCK} tokens)")
    return torch.tensor(stream[: n * CALIBRATION_BLOCK], dtype=torch.long).view(n, CALIBRATION_BLOCK)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with one entry per hidden layer."""
    config = model.config
    n = getattr(config, "num_hidden_layers", None) or getattr(getattr(config, "text_config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise LlmkdError(f"lora.init activations: no list of {n} decoder layers found in {type(model).__name__}")


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


@torch.no_grad()
def first_layer_inputs(model, blocks: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], dict]:
    """The hidden states entering decoder layer 0 for each mini-batch of `blocks`, and the keyword
    arguments the model passes its layers (rotary embeddings, mask, ...), the same for every
    mini-batch since all have the same shape."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def capture(module, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
            kwargs["use_cache"] = False
        raise _Stop

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for b in range(0, len(blocks), batch):
            try:
                model(input_ids=blocks[b : b + batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def layer_output(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _token_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per token, the squared error over the target's squared norm: every token counts alike, not
    only the few whose hidden states carry the residual stream's massive activations."""
    target = target.float()
    return (output.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)


def _relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    return float(torch.cat([_token_error(o, t).flatten() for o, t in zip(outputs, targets)]).mean())


@contextlib.contextmanager
def dropout_off(model):
    """Every dropout module of `model` (peft's lora_dropout among them) in eval mode for the block, the
    rest of the model left in its mode: an eval-mode forward would make bitsandbytes repack its CPU
    4-bit weights for inference, which `initialise` refuses."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in dropouts:
            m.train()


def initialise(student, teacher, blocks: torch.Tensor, *, batch: int, steps: int, lr: float, seed: int,
               progress: bool = True) -> InitReport:
    """Fit each decoder layer's LoRA of `student` (a peft model) to `teacher`'s layer outputs on
    `blocks`, layer by layer (see the module docstring). Only parameters that require grad move."""
    start = time.perf_counter()
    repacked = [n for n, m in student.named_modules() if repacked_for_cpu_inference(m)]
    if repacked:
        raise LlmkdError(f"lora.init activations: {repacked[0]} was repacked by bitsandbytes for CPU inference "
                         "(the student ran an eval-mode forward); initialise a freshly loaded student")
    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise LlmkdError(f"lora.init activations: student has {len(s_layers)} layers, teacher {len(t_layers)}")
    with dropout_off(student):
        report = _fit_layers(student, teacher, s_layers, t_layers, blocks, batch=batch, steps=steps, lr=lr,
                             seed=seed, progress=progress)
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def _fit_layers(student, teacher, s_layers, t_layers, blocks, *, batch, steps, lr, seed, progress) -> InitReport:
    """`initialise`'s fit, one decoder layer after the other."""
    from llmkd.progress import bar as progress_bar

    s_hidden, s_kwargs = first_layer_inputs(student, blocks, batch)
    t_hidden, t_kwargs = first_layer_inputs(teacher, blocks, batch)
    report = InitReport("activations", len(blocks), blocks.numel(), steps, 0.0)
    with progress_bar(total=len(s_layers), desc="lora init", unit="layer", disable=not progress) as bar:
        for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
            with torch.no_grad():
                t_out = [layer_output(t_layer, h, t_kwargs) for h in t_hidden]
                targets = [t.to(s_hidden[0].dtype) for t in t_out]
                before = _relative_error([layer_output(s_layer, h, s_kwargs) for h in s_hidden], targets)
            params = [p for p in s_layer.parameters() if p.requires_grad]
            as_built = [p.detach().clone() for p in params]
            if params and steps:
                optimizer = torch.optim.Adam(params, lr=lr)
                draw = torch.Generator().manual_seed(seed * 1_000_003 + i)
                for _ in range(steps):
                    j = int(torch.randint(len(s_hidden), (1,), generator=draw))
                    loss = _token_error(layer_output(s_layer, s_hidden[j], s_kwargs), targets[j]).mean()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                fitted = [layer_output(s_layer, h, s_kwargs) for h in s_hidden]
                after = _relative_error(fitted, targets)
                kept = after <= before
                if not kept:  # a diverged fit would pass its error on to every later layer
                    for p, p0 in zip(params, as_built):
                        p.copy_(p0)
                    fitted = [layer_output(s_layer, h, s_kwargs) for h in s_hidden]
            s_hidden, t_hidden = fitted, t_out
            report.layers.append(LayerFit(i, round(before, 6), round(after, 6), kept))
            bar.update(1)
            bar.set_postfix(error=f"{before:.4f}->{after:.4f}")
    return report


def text_tokens(path: str, tokenizer) -> list[int]:
    """lora.init_text's token ids (no special tokens: blocks cut from a stream, like the transfer set's)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkdError(f"lora.init_text: cannot read {path} as UTF-8 text ({type(e).__name__})") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def initialise_from_recipe(recipe, student, rows, text_ids: list[int] | None = None, *,
                           progress: bool = True) -> InitReport:
    """`initialise` with the recipe's settings: loads the teacher, calibrates on the transfer set's `rows`
    (and lora.init_text's `text_ids`), frees the teacher."""
    cfg = recipe.lora
    blocks = calibration_blocks(rows, cfg.init_tokens, cfg.init_batch, text_ids)
    teacher = models.load_teacher(recipe.model)
    try:
        return initialise(student, teacher, blocks, batch=cfg.init_batch, steps=cfg.init_steps, lr=cfg.init_lr,
                          seed=recipe.train.seed, progress=progress)
    finally:
        del teacher
        models.release_memory()  # before training's activations claim the device
