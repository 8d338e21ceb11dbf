"""Shared prefix (`llmkd.shared_prefix`): the same outputs and logits as running every row in full,
in generation and in teacher forcing."""

import torch

from llmkd import shared_prefix
from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k
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


def test_shared_prefix_generation_equals_plain(smol_teacher, smol_tokenizer):
    # 2-shot prompts share ~200 tokens of exemplars; sharing them must not change greedy outputs.
    rows = list(load_gsm8k("test"))[:4]
    shots = list(load_gsm8k("train"))[:2]
    texts = [prompts.render_prompt(smol_tokenizer, r["question"], shots) for r in rows]
    ids = [smol_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert shared_prefix.common_prefix_length(ids) >= shared_prefix.MIN_GENERATION_PREFIX_TOKENS
    assert shared_prefix.supported(smol_teacher)
    kw = dict(batch_size=4, max_new_tokens=24, stop_strings=prompts.STOP_STRINGS, progress=False)
    shared, _ = generate(smol_teacher, smol_tokenizer, texts, share_prefix=True, **kw)
    plain, _ = generate(smol_teacher, smol_tokenizer, texts, share_prefix=False, **kw)
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
