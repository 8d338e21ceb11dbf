"""Shared-prefix generation: k-shot prompts repeat the same exemplars, so their keys and values are
computed once and attended to by every row of every batch without being copied.

An 8-shot GSM8K prompt is ~1,800 tokens of exemplars and ~100 of question. Plain batched `generate`
prefills all of it per question and keeps one copy of the exemplars' KV cache per row, so both the
prefill and every decode step (which reads the whole cache) scale with batch × 1,800. Here the
common token prefix is run once (batch 1); `generate` then sees only the suffixes, at positions
shifted by the prefix length, and each attention layer combines two softmax blocks, one over the
shared prefix and one over the row's own cache, by their log-sum-exp. That is exact attention
(the order of float sums differs from SDPA's, so greedy outputs can rarely flip on near-ties).

vLLM does this (automatic prefix caching); transformers' `generate` does not, hence this module.
It applies to decoder models whose attention goes through transformers' AttentionInterface with
full (not sliding-window) attention; anything else falls back to plain generation.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

ATTENTION_NAME = "llmkd_shared_prefix"
MIN_PREFIX_TOKENS = 64  # below this the bookkeeping costs more than it saves

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
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "sliding_window", None) or \
            getattr(cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
        return False
    if cfg._attn_implementation not in ("sdpa", "eager"):
        return False
    attn = [m for m in base.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return bool(attn) and getattr(base, "_can_set_attn_implementation", lambda: True)()


@contextlib.contextmanager
def shared_prefix(model, prefix_ids: Sequence[int]):
    """Within the block, the model attends to `prefix_ids` (run once here) before its inputs.

    Callers pass position ids shifted by `len(prefix_ids)`; see `position_ids`.
    """
    _register()
    base = _transformers_model(model)
    device = next(base.parameters()).device
    with torch.no_grad():
        out = base(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
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


def position_ids(attention_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Positions of left-padded suffixes that continue a shared prefix (padding gets the prefix length)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + prefix_length


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax over [shared prefix ; own cache] from the two blocks' scores, combined by their maxima."""
    prefix_k, prefix_v = _prefix_kv[module.layer_idx]  # (1, Hkv, P, D)
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Query head h reads kv head h // group: fold each group's queries into rows of its kv head.
    q = query.reshape(batch, kv_heads, group * q_len, dim)
    # Prefix block as one batched matmul per kv head, with the batch folded into rows (no copies of the prefix).
    q_rows = q.transpose(0, 1).reshape(kv_heads, batch * group * q_len, dim)
    s_prefix = (q_rows @ prefix_k[0].transpose(-1, -2)).float() * scale  # (Hkv, B*G*Lq, P)
    s_own = (q @ key.transpose(-1, -2)).float() * scale  # (B, Hkv, G*Lq, K)
    s_own = s_own.masked_fill(~_allowed(attention_mask, batch, q_len, k_len, query.device, group), float("-inf"))
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


def _allowed(mask, batch, q_len, k_len, device, group) -> torch.Tensor:
    """Boolean (B, 1, G*Lq, K) 'may attend' for the own-cache block."""
    if mask is None:  # causal over the own cache, queries at its end
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        allowed = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:  # additive float mask
        allowed = mask == 0
    allowed = allowed[..., -k_len:].expand(batch, 1, q_len, k_len)
    return allowed.unsqueeze(2).expand(batch, 1, group, q_len, k_len).reshape(batch, 1, group * q_len, k_len)


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
    """The transformers model inside a PEFT wrapper (they share modules and config)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
