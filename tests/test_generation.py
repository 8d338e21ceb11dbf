from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k
from llmkd.generation import generate, truncate_at_stop


def test_truncate_at_first_stop_string():
    assert truncate_at_stop("a #### 5\n\nQuestion: b", ["Question:"]) == ("a #### 5\n\n", True)
    assert truncate_at_stop("x Question: y </s> z", ["</s>", "Question:"]) == ("x ", True)
    assert truncate_at_stop("no stop", ["Question:"]) == ("no stop", False)


def test_batched_generation_equals_one_at_a_time(smol_teacher, smol_tokenizer):
    # Left padding and the attention mask must make batching invisible to greedy decoding.
    rows = list(load_gsm8k("test"))[:3]
    texts = [prompts.render_prompt(smol_tokenizer, r["question"]) for r in rows]
    batched, stats = generate(smol_teacher, smol_tokenizer, texts, batch_size=3, max_new_tokens=24, progress=False)
    single = [generate(smol_teacher, smol_tokenizer, [t], batch_size=1, max_new_tokens=24, progress=False)[0][0]
              for t in texts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert stats.generated_tokens == sum(c.tokens for c in batched) > 0


def test_generation_stops_at_a_stop_string(smol_teacher, smol_tokenizer):
    text = "Count from one to ten: 1, 2, 3,"
    out, _ = generate(smol_teacher, smol_tokenizer, [text], batch_size=1, max_new_tokens=40,
                      stop_strings=["6"], progress=False)
    c = out[0]
    assert c.text.replace(" ", "") == "4,5,"
    assert c.tokens < 40  # generation itself stopped, not just the text
    assert "6" in smol_tokenizer.decode(c.token_ids) and "6" not in smol_tokenizer.decode(c.token_ids[:-1])


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_shared_prefix_attention_equals_full_attention():
    # Prefix run once + left-padded suffixes at shifted positions == each full sequence run alone.
    import torch

    from llmkd import shared_prefix

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
    from llmkd import shared_prefix

    rows = list(load_gsm8k("test"))[:4]
    shots = list(load_gsm8k("train"))[:2]
    texts = [prompts.render_prompt(smol_tokenizer, r["question"], shots) for r in rows]
    ids = [smol_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert shared_prefix.common_prefix_length(ids) >= shared_prefix.MIN_PREFIX_TOKENS
    assert shared_prefix.supported(smol_teacher)
    kw = dict(batch_size=4, max_new_tokens=24, stop_strings=prompts.STOP_STRINGS, progress=False)
    shared, _ = generate(smol_teacher, smol_tokenizer, texts, share_prefix=True, **kw)
    plain, _ = generate(smol_teacher, smol_tokenizer, texts, share_prefix=False, **kw)
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]


def test_common_prefix_leaves_every_prompt_a_token():
    from llmkd.shared_prefix import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 5]]) == 1
    assert common_prefix_length([[1, 2]]) == 0
