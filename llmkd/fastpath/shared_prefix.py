"""Shared prefix: when every row of a batch starts with the same tokens, their keys and values are
computed once and attended to by every row without being copied.

Plain batched `generate` prefills a common prefix (k-shot exemplars, a system turn) per row and keeps
one copy of its KV cache per row, so both the prefill and every decode step scale with batch x prefix.
Here the common token prefix is run once (batch 1); the model then sees only the suffixes, at
positions shifted by the prefix length, and each attention layer attends to [shared prefix ; the
row's own tokens]: one SDPA call when a row brings several tokens, two softmax blocks combined by
their log-sum-exp in a decode step (so the prefix is never copied per row there). That is exact
attention (the order of float sums differs from SDPA's, so greedy outputs can rarely flip on near-ties).

Used by generation (`shared_prefix`) and by teacher-forced forwards (`forward`): the builder's
teacher targets and the fidelity metric; not by training, where the prefix's own small matmuls cost
what the rows save. vLLM does this (automatic prefix caching); transformers does not, hence this
module. `supported` says which models it serves: decoder models whose attention goes through
transformers' AttentionInterface as plain full attention (no sliding window, logit softcapping,
attention sinks, or value heads of another size than the query's); anything else runs the plain way.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from llmkd.errors import LlmkdError

ATTENTION_NAME = "llmkd_shared_prefix"
# Shorter prefixes are not worth it. Measured on 2 cores with a 53-token prefix of ~230-token rows:
# a teacher-forced forward is 20% faster; greedy decoding is not faster (each decode step pays for
# the two softmax blocks), so generation asks for more.
MIN_PREFIX_TOKENS = 32
MIN_GENERATION_PREFIX_TOKENS = 64
# The oldest transformers these paths are verified on. They rely on two recent 5.x behaviours:
# boolean `logits_to_keep` masks (`forward`) and `generate` advancing user-supplied position_ids
# (decoding after a shifted prefix; huggingface/transformers#43734, merged 2026-02-10). Older 5.x
# decodes every new token at one rotary position, silently. Neither could be pinned to a release
# offline, so both are probed on the model (`_probe`), and this version is named in the errors.
MIN_TRANSFORMERS = "5.24"
_PREFIX_ATTR = "_llmkd_prefix_kv"  # set on each attention module inside `attending`: its layer's prefix (K, V)
_probes: dict[tuple[type, str], bool] = {}  # (model class, capability) -> present; a property of the code


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


def supported(model, generation: bool = False) -> bool:
    """Whether this module serves `model` (for `generate` too, with `generation`)."""
    return refusal(model, generation) is None


def refusal(model, generation: bool = False) -> str | None:
    """Why this module cannot serve `model` exactly, or None when it can."""
    base = _transformers_model(model)
    cfg = base.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    layers = _attention_layers(base)
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if not layers:
        return "no attention layers of transformers' kind (layer_idx, num_key_value_groups)"
    if cfg._attn_implementation not in ("sdpa", "eager") or not getattr(
            base, "_can_set_attn_implementation", lambda: True)():
        return f"attention implementation {cfg._attn_implementation!r} does not dispatch through AttentionInterface"
    # With per-layer types, only those say which layers slide (Gemma 2 keeps a window size when all are
    # full); without, the config's window applies to every layer (Mistral v0.1).
    types = getattr(text, "layer_types", None)
    if (any(t != "full_attention" for t in types) if types else getattr(text, "sliding_window", None)) or any(
            getattr(m, "sliding_window", None) for m in layers):
        return "sliding-window attention"
    # Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): value heads are narrower than the query's.
    if any(getattr(text, k, None) is not None for k in ("kv_lora_rank", "v_head_dim")) or any(
            getattr(m, "v_head_dim", None) not in (None, getattr(m, "head_dim", None)) for m in layers):
        return "multi-head latent attention (value head size differs from the query's)"
    # The two-block softmax below knows neither a tanh cap on the scores (Gemma 2) nor a sink logit (gpt-oss).
    if getattr(text, "attn_logit_softcapping", None) is not None or any(
            getattr(m, "attn_logit_softcapping", None) is not None for m in layers):
        return "attention logit softcapping"
    if any(getattr(m, "sinks", None) is not None for m in layers):
        return "attention sinks"
    if generation and not _probe(base, "advances_position_ids"):
        return _needs("decoding after a shared prefix needs `generate` to advance user-supplied position_ids")
    return None


def usable_prefix_length(token_lists: Sequence[Sequence[int]], model, limit: int | None = None,
                         minimum: int = MIN_PREFIX_TOKENS, generation: bool = False) -> int:
    """The common prefix worth sharing for `model` (at most `limit` tokens), or 0."""
    n = common_prefix_length(token_lists)
    n = min(n, limit) if limit is not None else n
    return n if n >= minimum and supported(model, generation) else 0


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

    Each attention layer holds its own layer's prefix for the block (no state outside the model, so
    two models can each attend to their own prefix). Callers pass position ids shifted by the prefix
    length; see `position_ids`.
    """
    if (reason := refusal(model)) is not None:
        raise LlmkdError(f"shared prefix: cannot serve this model: {reason}")
    _register()
    base = _transformers_model(model)
    layers = _attention_layers(base)
    previous = base.config._attn_implementation
    try:
        for m in layers:
            layer = cache.layers[m.layer_idx]
            setattr(m, _PREFIX_ATTR, (layer.keys, layer.values))
        base.config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        base.config._attn_implementation = previous
        for m in layers:
            m.__dict__.pop(_PREFIX_ATTR, None)


@contextlib.contextmanager
def shared_prefix(model, prefix_ids: Sequence[int]):
    """Inference: `prefix_ids` run once here; within the block the model attends to them first."""
    if (reason := refusal(model, generation=True)) is not None:
        raise LlmkdError(f"shared prefix: cannot serve this model: {reason}")
    with attending(model, prefix_cache(model, prefix_ids)):
        yield


def forward(model, input_ids, attention_mask, logits_to_keep, prefix_length: int, cache=None):
    """`model(...)` on right-padded rows that all start with the same `prefix_length` tokens, none of
    them kept for logits: the prefix runs once (batch 1; pass its `prefix_cache` to reuse it across
    batches), the rows run only their own tokens. A `prefix_length` of 0 is the plain call."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool and not _probe(
            _transformers_model(model), "boolean_logits_to_keep"):
        raise LlmkdError(_needs("teacher-forced forwards need boolean logits_to_keep masks"))
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
    prefix_k, prefix_v = getattr(module, _PREFIX_ATTR)  # (1, Hkv, P, D)
    unserved = [k for k in ("softcap", "s_aux", "sliding_window") if kwargs.get(k) is not None]
    if unserved or value.shape[-1] != query.shape[-1]:  # `refusal` should have kept such a model away
        raise RuntimeError(f"shared-prefix attention cannot serve {unserved or 'value heads of another size'}")
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


def _attention_layers(base) -> list[torch.nn.Module]:
    return [m for m in base.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def _needs(what: str) -> str:
    import transformers

    return f"{what}, which transformers {transformers.__version__} lacks: install transformers>={MIN_TRANSFORMERS}"


@torch.no_grad()
def _probe(base, capability: str) -> bool:
    """Whether this model class, under the installed transformers, has `capability` (tried once, on the
    model itself: a 1-2 token run, since what matters is the code path its class takes)."""
    key = (type(base), capability)
    if key not in _probes:
        from transformers import GenerationConfig

        device = next(base.parameters()).device
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        try:
            if capability == "boolean_logits_to_keep":
                keep = torch.tensor([[False, True]], device=device)
                _probes[key] = base(input_ids=one.repeat(1, 2), logits_to_keep=keep).logits.shape[:-1] == (1,)
            else:  # "advances_position_ids": a decode step after a prompt token at position 5 must be at 6
                seen: list[torch.Tensor] = []
                hook = base.register_forward_pre_hook(
                    lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
                saved, base.generation_config = base.generation_config, GenerationConfig()
                try:
                    eos = base.config.get_text_config().vocab_size - 1  # any id: min_new_tokens bans it
                    config = GenerationConfig(max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                              eos_token_id=eos, pad_token_id=0)
                    base.generate(input_ids=one, attention_mask=torch.ones_like(one), position_ids=one + 5,
                                  generation_config=config)
                finally:
                    hook.remove()
                    base.generation_config = saved
                _probes[key] = [p.flatten().tolist() if p is not None else None for p in seen[:2]] == [[5], [6]]
        except Exception:  # an older transformers may reject the probe outright: as good as absent
            _probes[key] = False
    return _probes[key]


def _transformers_model(model):
    """The transformers model inside a DDP and/or PEFT wrapper (they share modules and config)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model
