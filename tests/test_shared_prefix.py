"""Shared prefix (`llmkd.fastpath.shared_prefix`): the same outputs and logits as running every row in full,
in generation and in teacher forcing; the models it refuses, and its fallback on an older transformers."""

import pytest
import torch
import transformers
from test_generation_decoding import byte_tokenizer, tiny_model

from llmkd.fastpath import shared_prefix
from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k
from llmkd.errors import LlmkdError
from llmkd.generation import generate


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_shared_prefix_attention_equals_full_attention():
    # Prefix run once + left-padded suffixes at shifted positions == each full sequence run alone.
    model = _tiny_llama()
    prefix = list(range(5, 75))
    suffixes = [[80, 81, 82, 83], [90], [3, 4]]
    width = max(map(len, suffixes))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in suffixes])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes])
    with torch.no_grad(), shared_prefix.shared_prefix(model, prefix):
        shared = model(input_ids=ids, attention_mask=mask, position_ids=shared_prefix.position_ids(mask, len(prefix)))
    with torch.no_grad():
        for row, s in enumerate(suffixes):
            alone = model(input_ids=torch.tensor([prefix + s])).logits[0, -len(s):]
            torch.testing.assert_close(shared.logits[row, -len(s):], alone, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation != shared_prefix.ATTENTION_NAME  # restored on exit


def test_shared_prefix_generation_equals_plain(stand_in_teacher, smol_tokenizer):
    # 2-shot prompts share ~200 tokens of exemplars; sharing them must not change greedy outputs.
    # On the random stand-in of the embedded model (its architecture and tokenizer): equality is all
    # that is asserted.
    rows = list(load_gsm8k("test"))[:4]
    shots = list(load_gsm8k("train"))[:2]
    texts = [prompts.render_prompt(smol_tokenizer, r["question"], shots) for r in rows]
    ids = [smol_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert shared_prefix.common_prefix_length(ids) >= shared_prefix.MIN_GENERATION_PREFIX_TOKENS
    assert shared_prefix.supported(stand_in_teacher)
    kw = dict(batch_size=4, max_new_tokens=24, stop_strings=prompts.STOP_STRINGS, progress=False)
    shared, _ = generate(stand_in_teacher, smol_tokenizer, texts, share_prefix=True, **kw)
    plain, _ = generate(stand_in_teacher, smol_tokenizer, texts, share_prefix=False, **kw)
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]


def test_common_prefix_leaves_every_prompt_a_token():
    assert shared_prefix.common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix.common_prefix_length([[1, 2, 3], [1, 5]]) == 1
    assert shared_prefix.common_prefix_length([[1, 2]]) == 0


def _right_padded(prefix, suffixes, pad=0):
    width = len(prefix) + max(map(len, suffixes))
    ids = torch.tensor([prefix + s + [pad] * (width - len(prefix) - len(s)) for s in suffixes])
    mask = torch.tensor([[1] * (len(prefix) + len(s)) + [0] * (width - len(prefix) - len(s)) for s in suffixes])
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for row, s in enumerate(suffixes):  # the positions predicting the suffix tokens after the first
        keep[row, len(prefix) : len(prefix) + len(s) - 1] = True
    return ids, mask, keep


def test_shared_prefix_forward_equals_plain_teacher_forcing():
    model = _tiny_llama()
    ids, mask, keep = _right_padded(list(range(5, 45)), [[80, 81, 82, 83, 84], [90, 91], [3, 4, 5, 6]])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        shared = shared_prefix.forward(model, ids, mask, keep, 40).logits
    assert shared.shape == plain.shape == (int(keep.sum()), 97)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


# Tiny random models of each family: those served must decode exactly as plain generation; those
# refused must say why and still generate (the plain way).
ACCEPTED = {
    "llama": {}, "qwen2": {}, "mistral": {"sliding_window": None}, "phi3": {}, "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16}, "granite": {"attention_multiplier": 0.5},  # scaling other than 1/sqrt(head_dim)
    "olmo2": {}, "cohere": {}, "starcoder2": {}, "glm": {"head_dim": 16},
}
_MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=8)
_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
            topk_group=1)
REFUSED = {  # model type -> (config overrides, the refusal's words); all layers full, so only the named feature refuses
    "deepseek_v3": ({**_MLA, **_MOE}, "latent attention"),
    "deepseek_v2": ({**_MLA, **_MOE}, "latent attention"),
    "minicpm3": (_MLA, "latent attention"),
    "gemma2": (dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, layer_types=["full_attention"] * 2),
               "softcapping"),
    "gpt_oss": (dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
                     layer_types=["full_attention"] * 2), "sinks"),
}
_PREFIX = "You are a careful assistant. Answer the question below with a number only, please. "
_QUESTIONS = [_PREFIX + q for q in ("What is 2 + 3?", "How many legs has a cat?", "What is ten minus four?")]


def _family(model_type: str, **overrides):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type}")
    return tiny_model(model_type, **overrides)


def _shared_and_plain(model, tok):
    kw = dict(batch_size=3, max_new_tokens=8, progress=False)
    return ([c.token_ids for c in generate(model, tok, _QUESTIONS, share_prefix=share, **kw)[0]] for share in (True, False))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("model_type", ACCEPTED)
def test_served_families_decode_as_plain_generation(model_type, tok):
    model = _family(model_type, **ACCEPTED[model_type])
    ids = [tok(t)["input_ids"] for t in _QUESTIONS]
    assert shared_prefix.refusal(model, generation=True) is None
    assert shared_prefix.usable_prefix_length(ids, model, minimum=shared_prefix.MIN_GENERATION_PREFIX_TOKENS,
                                              generation=True) >= 64
    shared, plain = _shared_and_plain(model, tok)
    assert shared == plain


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_families_generate_the_plain_way(model_type, tok):
    overrides, reason = REFUSED[model_type]
    model = _family(model_type, **overrides)
    assert not shared_prefix.supported(model) and reason in shared_prefix.refusal(model)
    with pytest.raises(LlmkdError, match=reason):
        with shared_prefix.shared_prefix(model, list(range(70))):
            pass
    shared, plain = _shared_and_plain(model, tok)
    assert shared == plain and all(shared)


def test_two_models_attend_to_their_own_prefixes():
    # The prefix lives in each model's attention layers, not in one module-wide slot.
    first, second = _tiny_llama(), tiny_model("llama")
    prefix, suffix = list(range(5, 45)), torch.tensor([[80, 81]])
    mask = torch.ones_like(suffix)
    with torch.no_grad():
        alone = first(input_ids=torch.tensor([prefix + [80, 81]])).logits[:, -2:]
        with shared_prefix.shared_prefix(first, prefix), shared_prefix.shared_prefix(second, prefix[::-1]):
            shared = first(input_ids=suffix, attention_mask=mask, position_ids=shared_prefix.position_ids(mask, 40))
    torch.testing.assert_close(shared.logits, alone, atol=1e-5, rtol=1e-5)


def test_attention_is_restored_when_the_block_fails():
    model = _tiny_llama()
    with pytest.raises(ValueError):
        with shared_prefix.shared_prefix(model, list(range(5, 45))):
            raise ValueError("inside")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, shared_prefix._PREFIX_ATTR) for m in model.modules())


def test_generation_falls_back_when_generate_keeps_positions_still(monkeypatch, tok):
    # Before transformers advanced user-supplied position_ids, every decode step of a shifted suffix
    # ran at one rotary position. Emulate that: the probe must notice and generation must go plain.
    model = tiny_model("llama")
    original = model._update_model_kwargs_for_generation

    def stale(outputs, model_kwargs, *args, **kwargs):
        positions = model_kwargs.get("position_ids")
        updated = original(outputs, model_kwargs, *args, **kwargs)
        if positions is not None:
            updated["position_ids"] = positions
        return updated

    monkeypatch.setattr(model, "_update_model_kwargs_for_generation", stale)
    monkeypatch.setattr(shared_prefix, "_probes", {})
    assert shared_prefix.supported(model)  # teacher forcing needs no decoding
    assert shared_prefix.MIN_TRANSFORMERS in shared_prefix.refusal(model, generation=True)
    ids = [tok(t)["input_ids"] for t in _QUESTIONS]
    assert shared_prefix.usable_prefix_length(ids, model, generation=True) == 0
    shared, plain = _shared_and_plain(model, tok)
    assert shared == plain


def test_forward_names_the_version_it_needs_for_boolean_logits_to_keep(monkeypatch):
    model = _tiny_llama()
    monkeypatch.setattr(shared_prefix, "_probes", {(type(model), "boolean_logits_to_keep"): False})
    ids, mask, keep = _right_padded(list(range(5, 45)), [[80, 81, 82], [90, 91]])
    with pytest.raises(LlmkdError, match=f"transformers>={shared_prefix.MIN_TRANSFORMERS}"):
        shared_prefix.forward(model, ids, mask, keep, 40)
