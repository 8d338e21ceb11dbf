"""Shared prefix: when every row of a batch starts with the same tokens, their keys and values are
computed once and attended to by every row without being copied.

An 8-shot GSM8K prompt is ~1,800 tokens of exemplars and ~100 of question; even a 0-shot chat prompt
starts with ~60 tokens of system turn and instruction. Plain batched `generate` prefills all of it
per question and keeps one copy of the prefix's KV cache per row, so both the prefill and every
decode step (which reads the whole cache) scale with batch × prefix. Here the common token prefix is
run once (batch 1); the model then sees only the suffixes, at positions shifted by the prefix length,
and each attention layer attends to [shared prefix ; the row's own tokens]: one SDPA call when a row
brings several tokens, two softmax blocks combined by their log-sum-exp in a decode step (so the
prefix is never copied per row there). That is exact attention (the order of float sums differs
from SDPA's, so greedy outputs can rarely flip on near-ties).

Used by generation (`shared_prefix`) and by teacher-forced forwards (`forward`): the builder's
teacher targets and the fidelity metric. Not by training: at batch 4 with a 53-token prefix the
prefix's own small matmuls (forward and backward) cost what the rows save (measured: no gain).
vLLM does this (automatic prefix caching); transformers does not, hence this module. It applies to
decoder models whose attention goes through transformers' AttentionInterface with full (not
sliding-window) attention; anything else runs the plain way.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

ATTENTION_NAME = "llmkd_shared_prefix"
# Shorter prefixes are not worth it. Measured on 2 cores with a 53-token prefix of ~230-token rows:
# a teacher-forced forward is 20% faster; greedy decoding is not faster (each decode step pays for
# the two softmax blocks), so generation asks for more.
MIN_PREFIX_TOKENS = 32
MIN_GENERATION_PREFIX_TOKENS = 64

_prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer_idx -> (keys, values), batch 1


def common_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens every list starts with, leaving each at least one token of its own (the last prompt
    token must be run by `generate` to produce the first logits)."""
    if len(token_lists) < 2:
        return 0
    limit = min(len(t) for t in token_lists) - 1
    first = token_lists[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n


def supported(model) -> bool:
    """Full-attention decoder whose attention dispatches through AttentionInterface."""
    base = _transformers_model(model)
    cfg = base.config
    encoder_decoder = getattr(cfg, "is_encoder_decoder", False)
    sliding = getattr(cfg, "sliding_window", None) or any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))
    dispatches = cfg._attn_implementation in ("sdpa", "eager") and getattr(
        base, "_can_set_attn_implementation", lambda: True)()
    has_layers = any(hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") for m in base.modules())
    return not encoder_decoder and not sliding and dispatches and has_layers


def usable_prefix_length(token_lists: Sequence[Sequence[int]], model, limit: int | None = None,
                         minimum: int = MIN_PREFIX_TOKENS) -> int:
    """The common prefix worth sharing for `model` (at most `limit` tokens), or 0."""
    n = common_prefix_length(token_lists)
    n = min(n, limit) if limit is not None else n
    return n if n >= minimum and supported(model) else 0


@torch.no_grad()
def prefix_cache(model, prefix_ids: Sequence[int]):
    """The prefix's keys and values, batch 1 (of the model as it is now: an adapter on or off counts)."""
    base = _transformers_model(model)
    device = next(base.parameters()).device
    out = base(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True, logits_to_keep=1)
    return getattr(out, "cache", None) or out.past_key_values


@contextlib.contextmanager
def attending(model, cache):
    """Within the block the model attends to `cache` (a prefix's KV, batch 1) before its own tokens.

    Callers pass position ids shifted by the prefix length; see `position_ids`.
    """
    _register()
    base = _transformers_model(model)
    _prefix_kv.clear()
    for i, layer in enumerate(cache.layers):
        _prefix_kv[i] = (layer.keys, layer.values)
    previous = base.config._attn_implementation
    base.config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        base.config._attn_implementation = previous
        _prefix_kv.clear()


@contextlib.contextmanager
def shared_prefix(model, prefix_ids: Sequence[int]):
    """Inference: `prefix_ids` run once here; within the block the model attends to them first."""
    with attending(model, prefix_cache(model, prefix_ids)):
        yield


def forward(model, input_ids, attention_mask, logits_to_keep, prefix_length: int, cache=None):
    """`model(...)` on right-padded rows that all start with the same `prefix_length` tokens, none of
    them kept for logits: the prefix runs once (batch 1; pass its `prefix_cache` to reuse it across
    batches), the rows run only their own tokens. A `prefix_length` of 0 is the plain call."""
    if not prefix_length:
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
    P = prefix_length
    cache = cache if cache is not None else prefix_cache(model, input_ids[0, :P].tolist())
    mask = attention_mask[:, P:]
    with attending(model, cache):
        return model(input_ids=input_ids[:, P:], attention_mask=mask, position_ids=position_ids(mask, P),
                     logits_to_keep=logits_to_keep[:, P:], use_cache=False)


def position_ids(attention_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Positions of padded suffixes that continue a shared prefix (padding's positions are don't-cares)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + prefix_length


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over [shared prefix ; own tokens].

    Several queries per row (prefill, teacher forcing): the prefix is expanded to the batch
    once per layer call and SDPA runs over both blocks. One query per row (a decode step): the prefix
    is never copied; two softmax blocks are combined by their maxima.
    """
    prefix_k, prefix_v = _prefix_kv[module.layer_idx]  # (1, Hkv, P, D)
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    own = _allowed(attention_mask, batch, q_len, k_len, query.device)  # (B, 1, Lq, K)
    if q_len > 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        expand = (batch, -1, -1, -1)
        keys = torch.cat([prefix_k.expand(*expand), key], dim=2)
        values = torch.cat([prefix_v.expand(*expand), value], dim=2)
        allowed = torch.cat([own.new_ones(batch, 1, q_len, prefix_k.shape[2]), own], dim=-1)
        return sdpa_attention_forward(module, query, keys, values, allowed, dropout=dropout, scaling=scaling,
                                      is_causal=False)
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Query head h reads kv head h // group: fold each group's queries into rows of its kv head.
    q = query.reshape(batch, kv_heads, group * q_len, dim)
    # Prefix block as one batched matmul per kv head, with the batch folded into rows (no copies of the prefix).
    q_rows = q.transpose(0, 1).reshape(kv_heads, batch * group * q_len, dim)
    s_prefix = (q_rows @ prefix_k[0].transpose(-1, -2)).float() * scale  # (Hkv, B*G*Lq, P)
    s_own = (q @ key.transpose(-1, -2)).float() * scale  # (B, Hkv, G*Lq, K)
    own = own.unsqueeze(2).expand(batch, 1, group, q_len, k_len).reshape(batch, 1, group * q_len, k_len)
    s_own = s_own.masked_fill(~own, float("-inf"))
    m_prefix = s_prefix.amax(-1).view(kv_heads, batch, group * q_len).transpose(0, 1)  # (B, Hkv, G*Lq)
    m = torch.maximum(m_prefix, s_own.amax(-1))  # finite: the prefix block is never masked
    e_prefix = torch.exp(s_prefix - m.transpose(0, 1).reshape(kv_heads, -1, 1))
    e_own = torch.exp(s_own - m.unsqueeze(-1))
    o_prefix = (e_prefix.to(prefix_v.dtype) @ prefix_v[0]).view(kv_heads, batch, group * q_len, dim).transpose(0, 1)
    o_own = e_own.to(value.dtype) @ value
    denom = e_prefix.sum(-1).view(kv_heads, batch, group * q_len).transpose(0, 1) + e_own.sum(-1)
    out = (o_prefix.float() + o_own.float()) / denom.unsqueeze(-1)
    out = out.to(query.dtype).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def _allowed(mask, batch, q_len, k_len, device) -> torch.Tensor:
    """Boolean (B, 1, Lq, K) 'may attend' for the own block."""
    if mask is None:  # causal over the own tokens, queries at their end
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        allowed = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:  # additive float mask
        allowed = mask == 0
    return allowed[..., -k_len:].expand(batch, 1, q_len, k_len)


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # always a boolean mask: padding sits inside the suffixes
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask)


def _transformers_model(model):
    """The transformers model inside a DDP and/or PEFT wrapper (they share modules and config)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model
