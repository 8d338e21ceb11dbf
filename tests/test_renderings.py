"""transfer_set.renderings: a transfer set written in several renderings (llmkd/data/prompts.py
RENDERINGS), taken in turn across the whole set, and scored as the teacher sees each."""

import pytest

from conftest import FP32_TEACHER, REPO
from llmkd import builder, transfer_set
from llmkd.config import load_recipe
from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k
from llmkd.errors import LlmkdError

MIX = ["llmkd", "bare", "notes"]


def mixed(*extra):
    return load_recipe(REPO / "recipes/smollm2-cpu.yaml", [
        FP32_TEACHER, "transfer_set.start=0", "transfer_set.count=5", "transfer_set.top_k=8", "transfer_set.batch_size=2",
        "transfer_set.shard_size=2", f"transfer_set.renderings=[{','.join(MIX)}]", *extra])


def test_gold_examples_take_the_renderings_in_turn_across_shards(smol_teacher, smol_tokenizer, tmp_path):
    from test_transfer_set import assert_targets_match_fresh_forward

    tok = smol_tokenizer
    builder.build(mixed("transfer_set.response=gold"), out=tmp_path / "set", progress=False, teacher=smol_teacher,
                  tokenizer=tok)
    built = transfer_set.TransferSet.open(tmp_path / "set")
    assert built.manifest.settings.renderings == MIX and len(built.manifest.shards) == 3
    for i, (row, q) in enumerate(zip(built.examples(), list(load_gsm8k("train"))[:5], strict=True)):
        how = MIX[i % 3]  # example 2 opens shard 1 with "notes": the turn runs across shards
        prompt, response = prompts.render_example(tok, q["question"], q["answer"], how)
        ids, mask = prompts.tokenize_example(tok, prompt, response)
        assert row["input_ids"].tolist() == ids and row["response_start"] == mask.index(1), (i, how)
    assert_targets_match_fresh_forward(built, smol_teacher)

    # Another mix is another set: it is refused, never reused as this one.
    with pytest.raises(LlmkdError, match="renderings"):
        builder.build(mixed("transfer_set.response=gold", "transfer_set.renderings=[llmkd]"), out=tmp_path / "set",
                      progress=False, teacher=smol_teacher, tokenizer=tok)


def test_teacher_mode_answers_the_prompt_of_each_rendering(smol_teacher, smol_tokenizer, tmp_path):
    tok = smol_tokenizer
    builder.build(mixed("transfer_set.response=teacher", "transfer_set.count=3", "transfer_set.max_new_tokens=8"),
                  out=tmp_path / "set", progress=False, teacher=smol_teacher, tokenizer=tok)
    built = transfer_set.TransferSet.open(tmp_path / "set")
    for i, (row, q) in enumerate(zip(built.examples(), list(load_gsm8k("train"))[:3], strict=True)):
        prompt = prompts.render_example_prompt(tok, q["question"], MIX[i])
        assert row["input_ids"][: row["response_start"]].tolist() == prompts.encode(tok, prompt), MIX[i]


def test_k_shot_prompts_are_llmkds_format_only():
    with pytest.raises(LlmkdError, match=r"transfer_set: .*0-shot renderings.*shots 2"):
        mixed("transfer_set.shots=2")
