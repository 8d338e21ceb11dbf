"""The teacher's targets along responses: its top-k + tail distribution at every response token, and
the columns of a transfer-set shard that hold them. Stage 1 (`llmkd.builder`) scores the teacher's own
or the gold responses with it; the on-policy rounds of stage 2 (`llmkd.on_policy`) score the student's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from llmkd import topk_encoding
from llmkd.data import prompts
from llmkd.errors import LlmkdError
from llmkd.fastpath import shared_prefix
from llmkd.losses import topk_with_tail

# Largest logits tensor of one teacher forward (response positions x V): micro-batches are cut to fit.
LOGITS_BUDGET_BYTES = 1 << 30


@torch.no_grad()
def teacher_targets(teacher, sequences: Sequence[list[int]], starts: Sequence[int], k: int, *, pad_id: int,
                    batch_size: int, share_prefix: bool = True, on_batch: Callable[[int, int], None] | None = None,
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`topk_with_tail` of the teacher at the positions predicting each sequence's response tokens.

    Returns, per sequence, (ids int64 (R, K), logprobs fp32 (R, K), tail fp32 (R,)), R = len - start.
    Batches of `batch_size` sequences, longest first, right-padded; logits are computed only at the
    response positions (transformers' boolean `logits_to_keep`), and a batch is cut into
    micro-batches so they stay under `LOGITS_BUDGET_BYTES`. The prompt prefix all sequences share
    (system turn, instruction, exemplars) is run once for all batches (`shared_prefix.forward`).
    `on_batch(sequences, response tokens)` is called after each micro-batch (progress).
    """
    device = next(teacher.parameters()).device
    elem = torch.finfo(next(teacher.parameters()).dtype).bits // 8
    vocab = teacher.get_output_embeddings().weight.shape[0]
    max_tokens = max(1, LOGITS_BUDGET_BYTES // (vocab * elem))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = []
    for b in range(0, len(order), batch_size):
        micro, tokens = [], 0
        for i in order[b : b + batch_size]:
            r = len(sequences[i]) - starts[i]
            if micro and tokens + r > max_tokens:
                batches.append(micro)
                micro, tokens = [], 0
            micro.append(i)
            tokens += r
        batches.append(micro)

    prefix = shared_prefix.usable_prefix_length(sequences, teacher, limit=min(starts) - 1) if share_prefix else 0
    cache = shared_prefix.prefix_cache(teacher, sequences[0][:prefix]) if prefix else None
    out: list = [None] * len(sequences)
    for idx in batches:
        input_ids, attention, keep = prompts.teacher_forced_batch(
            [sequences[i] for i in idx], [starts[i] for i in idx], pad_id)
        input_ids, attention, keep = input_ids.to(device), attention.to(device), keep.to(device)
        logits = shared_prefix.forward(teacher, input_ids, attention, keep, prefix, cache).logits
        # logits: (N, V), the kept positions, row by row
        if logits.shape != (int(keep.sum()), vocab):
            raise RuntimeError(f"teacher ignored the boolean logits_to_keep: logits {tuple(logits.shape)}")
        ids, logprobs, tail = topk_with_tail(logits, k)  # (N, K), (N, K), (N,)
        offset = 0
        for i in idx:
            r = len(sequences[i]) - starts[i]
            out[i] = (ids[offset : offset + r].cpu(), logprobs[offset : offset + r].cpu(), tail[offset : offset + r].cpu())
            offset += r
        if on_batch is not None:
            on_batch(len(idx), offset)
    return out


def shard_columns(rows: Sequence[dict], sequences: Sequence[list[int]], starts: Sequence[int], finishes: Sequence[str],
                  targets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, where: str,
                  encoding: str, vocab_size: int) -> tuple[dict, np.ndarray]:
    """(the columns of a shard, the top-k mass of every response token as `encoding` stores it):
    `rows` give the id and question hash, `targets` are `teacher_targets`' output for `sequences`
    (prompt + response), kept at full precision for `write_shard` to encode."""
    targets = [(ids.numpy(), logprobs.float().numpy(), tail.float().numpy()) for ids, logprobs, tail in targets]
    masses = []
    for r, (ids, logprobs, tail) in zip(rows, targets):
        finite = np.isfinite(logprobs).all() and np.isfinite(tail).all()  # compact's bytes would hide a NaN
        _, logprobs, tail = topk_encoding.decode(encoding, topk_encoding.encode(encoding, ids, logprobs, tail, vocab_size))
        if not (finite and np.isfinite(logprobs).all() and np.isfinite(tail).all()):
            raise LlmkdError(f"teacher produced non-finite log-probabilities on {r['id']} ({where}); "
                             "check the teacher's weights and dtype")
        masses.append(np.exp(logprobs.astype(np.float64)).sum(-1))  # (R,)
    columns = {
        "id": [r["id"] for r in rows],
        "question_hash": [r["question_hash"] for r in rows],
        "input_ids": list(sequences),
        "response_start": list(starts),
        "finish": list(finishes),
        "topk_ids": [t[0] for t in targets],
        "topk_logprobs": [t[1] for t in targets],
        "tail_logmass": [t[2] for t in targets],
    }
    return columns, np.concatenate([np.zeros(0), *masses])
