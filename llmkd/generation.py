"""Batched greedy (or seeded sampled) generation with stop strings: the evaluator's and the builder's.

Prompts are sorted by length so each batch pads little, left-padded (decoder-only models continue
from the right edge), generated with the KV cache, and returned in the caller's order. A token prefix
common to all prompts (k-shot exemplars) is computed once and shared (`llmkd.shared_prefix`). A
completion is cut at the first stop string; `tokens` counts the generated tokens that were kept.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from llmkd import shared_prefix


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # generated ids up to and including the one that ended it (eos or a stop string)
    tokens: int  # len(token_ids)


@dataclass(frozen=True)
class GenerationStats:
    seconds: float
    generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for s in stop_strings if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
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
    from transformers import GenerationConfig

    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(stop_strings) or None,
    )
    # Chat templates already carry their special tokens; don't add a second BOS.
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefix_len = shared_prefix.usable_prefix_length(
        ids, model, minimum=shared_prefix.MIN_GENERATION_PREFIX_TOKENS) if share_prefix else 0
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    results: list[Completion | None] = [None] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    start, total = time.perf_counter(), 0
    bar = tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress)
    with shared_prefix.shared_prefix(model, ids[0][:prefix_len]) if prefix_len else contextlib.nullcontext():
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
    return Completion(text=text.strip(), token_ids=ids, tokens=len(ids))
