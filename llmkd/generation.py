"""Batched greedy (or seeded sampled) generation with stop strings: the evaluator's and the builder's.

Prompts are sorted by length so each batch pads little, left-padded (decoder-only models continue
from the right edge), generated with the KV cache, and returned in the caller's order. A token prefix
common to all prompts (k-shot exemplars) is computed once and shared (`llmkd.fastpath.shared_prefix`). A
completion is cut at the first stop string; `tokens` counts the generated tokens that were kept.

Decoding is exactly what the caller asks for (`decoding_settings` states it): greedy is greedy and
sampling is softmax(logits / temperature), whatever the checkpoint's generation_config.json ships
(repetition penalties, top-k/top-p, n-gram bans, ...).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from llmkd.data.prompts import encode
from llmkd.fastpath import shared_prefix
from llmkd.progress import bar as progress_bar


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # generated ids up to and including the one that ended it (eos or a stop string)
    tokens: int  # len(token_ids)
    finish: str  # how it ended: "eos", "stop_string" or "length" (max_new_tokens reached)


@dataclass(frozen=True)
class GenerationStats:
    seconds: float
    generated_tokens: int


# Every GenerationConfig field that reshapes the next-token distribution or changes the search, at the
# value that turns it off (None where transformers knows no other "off": `_checkpoint_defaults_off`
# keeps those None). temperature and top_k depend on the mode: `_generation_config`.
_NEUTRAL: dict[str, Any] = dict(
    num_beams=1, num_beam_groups=1, diversity_penalty=0.0, length_penalty=1.0, early_stopping=False,
    num_return_sequences=1, penalty_alpha=None, dola_layers=None, low_memory=None, use_mtp=False,
    prompt_lookup_num_tokens=None, assistant_early_exit=None,
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, force_words_ids=None, constraints=None, sequence_bias=None, suppress_tokens=None,
    begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, min_length=0, min_new_tokens=None,
    exponential_decay_length_penalty=None, renormalize_logits=False, remove_invalid_values=False,
    guidance_scale=None, watermarking_config=None, token_healing=False,
    top_p=1.0, min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
    use_cache=True, output_scores=False, output_logits=False, return_dict_in_generate=False,
)


def _generation_config(*, max_new_tokens: int, stop_strings: Sequence[str], do_sample: bool, temperature: float,
                       eos_ids: list[int] | None = None, pad_id: int | None = None):
    from transformers import GenerationConfig

    return GenerationConfig(
        **_NEUTRAL,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        # 0 is "off" for sampling. Greedy runs no warpers at all; None there spares transformers' warning
        # that a top_k other than its default 50 is ignored.
        top_k=0 if do_sample else None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        stop_strings=list(stop_strings) or None,
    )


def decoding_settings(*, max_new_tokens: int, stop_strings: Sequence[str] = (), do_sample: bool = False,
                      temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The effective decoding settings of `generate` called with these arguments, for a manifest or summary.

    Read from the GenerationConfig `generate` passes, so the two cannot disagree. None means off.
    """
    config = _generation_config(max_new_tokens=max_new_tokens, stop_strings=stop_strings, do_sample=do_sample,
                                temperature=temperature)
    keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
            "no_repeat_ngram_size", "num_beams", "max_new_tokens")
    settings = {k: getattr(config, k) for k in keys}
    settings["stop_strings"] = list(stop_strings)
    # Batch b of the longest-first order is seeded with seed + b.
    settings["seed"] = seed if do_sample else None
    settings["checkpoint_generation_config"] = "ignored"
    return settings


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for s in stop_strings if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@contextlib.contextmanager
def _checkpoint_defaults_off(model):
    """Within the block `model.generate` merges nothing from the checkpoint's generation_config.

    transformers' `generate` (`_prepare_generation_config`) fills every field of the passed config that
    is None from `model.generation_config`, and None is the only "off" value of several processors
    (min_p, suppress_tokens, bad_words_ids, sequence_bias, forced ids, ...), so no passed config can pin
    them. With an empty generation_config in its place only transformers' global defaults fill the
    Nones, and those are neutral but for top_k=50, which `_generation_config` sets to 0 for sampling
    (greedy runs no warpers). The model's own config is put back on exit, also on an error.
    """
    from transformers import GenerationConfig

    base = shared_prefix._transformers_model(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def generate(model, tokenizer, prompts: Sequence[str], **options) -> tuple[list[Completion], GenerationStats]:
    """Complete each of `prompts` (texts, encoded by the one BOS rule); `options` as `generate_ids`'."""
    return generate_ids(model, tokenizer, [encode(tokenizer, p) for p in prompts], **options)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    ids: Sequence[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    desc: str = "generating",
    progress: bool = True,
    share_prefix: bool = True,
) -> tuple[list[Completion], GenerationStats]:
    """Complete each prompt of token `ids`, in the caller's order (module docstring)."""
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = _generation_config(max_new_tokens=max_new_tokens, stop_strings=stop_strings, do_sample=do_sample,
                                temperature=temperature, eos_ids=eos_ids, pad_id=pad_id)
    ids = [list(map(int, i)) for i in ids]
    prefix_len = shared_prefix.usable_prefix_length(
        ids, model, minimum=shared_prefix.MIN_GENERATION_PREFIX_TOKENS, generation=True) if share_prefix else 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[Completion | None] = [None] * len(ids)
    device = next(model.parameters()).device
    start, total = time.perf_counter(), 0
    bar = progress_bar(total=len(ids), desc=desc, unit="q", disable=not progress)
    sharing = shared_prefix.shared_prefix(model, ids[0][:prefix_len]) if prefix_len else contextlib.nullcontext()
    with sharing, _checkpoint_defaults_off(model):
        try:
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                rows = [ids[i][prefix_len:] for i in idx]
                width = max(map(len, rows))
                input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                extra = {"position_ids": shared_prefix.position_ids(mask, prefix_len)} if prefix_len else {}
                if do_sample:  # one seed per batch position in the sorted order: reproducible whatever else runs
                    torch.manual_seed(seed + b)
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                     tokenizer=tokenizer, **extra)
                new = out[:, width:].tolist()
                for i, row in zip(idx, new):
                    results[i] = _finish(row, tokenizer, eos_ids, stop_strings)
                    total += results[i].tokens
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{total / (time.perf_counter() - start):.0f}")
        finally:
            bar.close()
    return results, GenerationStats(time.perf_counter() - start, total)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _finish(ids: list[int], tokenizer, eos_ids: list[int], stop_strings: Sequence[str]) -> Completion:
    """Cut a generated row at its end: the first eos, else the token completing a stop string."""
    end = next((j + 1 for j, t in enumerate(ids) if t in eos_ids), len(ids))
    ids = ids[:end]
    text, stopped = truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)
    if stopped:  # keep tokens up to the one that completed the stop string
        for j in range(1, len(ids) + 1):
            if truncate_at_stop(tokenizer.decode(ids[:j], skip_special_tokens=True), stop_strings)[1]:
                ids = ids[:j]
                break
    finish = "eos" if ids and ids[-1] in eos_ids else "stop_string" if stopped else "length"
    return Completion(text=text.strip(), token_ids=ids, tokens=len(ids), finish=finish)
