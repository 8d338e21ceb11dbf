from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k
from llmkd.generation import generate, truncate_at_stop


def test_truncate_at_first_stop_string():
    assert truncate_at_stop("a #### 5\n\nQuestion: b", ["Question:"]) == ("a #### 5\n\n", True)
    assert truncate_at_stop("x Question: y </s> z", ["</s>", "Question:"]) == ("x ", True)
    assert truncate_at_stop("no stop", ["Question:"]) == ("no stop", False)


def test_batched_generation_equals_one_at_a_time(stand_in_teacher, smol_tokenizer):
    # Left padding and the attention mask must make batching invisible to greedy decoding. On the random
    # stand-in of the embedded model (its architecture and tokenizer): equality is all that is asserted.
    rows = list(load_gsm8k("test"))[:3]
    texts = [prompts.render_prompt(smol_tokenizer, r["question"]) for r in rows]
    batched, stats = generate(stand_in_teacher, smol_tokenizer, texts, batch_size=3, max_new_tokens=24, progress=False)
    single = [generate(stand_in_teacher, smol_tokenizer, [t], batch_size=1, max_new_tokens=24, progress=False)[0][0]
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
    assert c.finish == "stop_string"
    cut, _ = generate(smol_teacher, smol_tokenizer, [text], batch_size=1, max_new_tokens=3, stop_strings=["6"], progress=False)
    assert (cut[0].tokens, cut[0].finish) == (3, "length")
