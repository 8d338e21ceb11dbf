"""Any data (llmkd.data.sources): every file format and row format, column mapping, every bad row as a
one-line error and as a counted skip, held-out rows fixed by content, and the builder on such data —
GSM8K written as `messages` gives the built-in source's transfer set bit for bit, and every assistant
token of a multi-turn row is a target exactly once (against an independent render -> tokenize)."""

import json

import numpy as np
import pytest

from conftest import STAND_IN_SET, stand_in_overrides
from llmkd.builder import build
from llmkd.config import DataConfig, load_recipe
from llmkd.data import prompts, sources
from llmkd.data.gsm8k import load_gsm8k
from llmkd.errors import LlmkdError
from llmkd.transfer_set import TransferSet

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                  {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another one?"},
                  {"role": "assistant", "content": "Eleven."}]},
    {"messages": [{"role": "user", "content": "What is a dict?"}, {"role": "assistant", "content": "A mapping."}]},
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data(path, **keys) -> DataConfig:
    return DataConfig(source=str(path), eval_fraction=keys.pop("eval_fraction", 0.0), **keys)


def test_messages_rows_give_one_example_per_assistant_turn(tmp_path):
    rows = sources.load_rows(data(write_jsonl(tmp_path / "chat.jsonl", CHAT)), "train", gold=True)
    assert rows.format == "messages" and rows.conversations == 3
    assert [e["id"] for e in rows.examples] == ["chat-00001-turn1", "chat-00001-turn2", "chat-00002", "chat-00003"]
    first, second = rows.examples[:2]
    assert [t["content"] for t in first["messages"]] == ["Be brief.", "Name a prime."] and first["response"] == "Seven."
    assert len(second["messages"]) == 4 and second["response"] == "Eleven."  # earlier turns as written
    assert first["question_hash"] == second["question_hash"]  # one conversation, one content hash
    # The teacher answers at the same places, and after a conversation's last user turn.
    open_ended = write_jsonl(tmp_path / "open.jsonl", [{"messages": CHAT[0]["messages"][:4]}])
    teacher = sources.load_rows(data(open_ended), "train", gold=False)
    assert [(len(e["messages"]), e["response"]) for e in teacher.examples] == [(2, None), (4, None)]


def test_prompt_completion_in_every_file_format_and_column_mapping(tmp_path):
    import datasets

    rows = [{"question": "What is 'abc'.upper()?", "answer": "'ABC'"}, {"question": "Is [] falsy?", "answer": "Yes."}]
    mapping = {"columns": {"prompt": "question", "completion": "answer"}}
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "a.csv", index=False)
    ds.to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "a.jsonl", rows)
    ds.save_to_disk(tmp_path / "saved")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", rows)
    for source in ("a.csv", "a.parquet", "a.json", "a.jsonl", "saved", "hub"):
        path = tmp_path / source
        got = sources.load_rows(data(f"hub:{path}" if source == "hub" else path, **mapping), "train", gold=True)
        assert got.format == "prompt_completion", source
        assert [(e["messages"], e["response"]) for e in got.examples] == [
            (({"role": "user", "content": r["question"]},), r["answer"]) for r in rows], source
    # TRL's conversational prompt/completion: lists of turns; only the completion's turns are responses.
    chat = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Bye"}], "completion": [{"role": "assistant", "content": "Bye."}]}]
    got = sources.load_rows(data(write_jsonl(tmp_path / "c.jsonl", chat)), "train", gold=True)
    assert [(len(e["messages"]), e["response"]) for e in got.examples] == [(3, "Bye.")]
    # Prompts alone: the teacher writes the responses; gold responses are refused in one line.
    only = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Explain tuples."}])
    assert sources.load_rows(data(only), "train", gold=False).examples[0]["response"] is None
    with pytest.raises(LlmkdError, match="prompts only.*transfer_set.response: teacher"):
        sources.load_rows(data(only), "train", gold=True)
    with pytest.raises(LlmkdError, match="data.columns: .* has no column 'query'"):
        sources.load_rows(data(tmp_path / "a.jsonl", columns={"prompt": "query"}), "train", gold=True)
    with pytest.raises(LlmkdError, match="cannot tell the format"):
        sources.load_rows(data(tmp_path / "a.jsonl"), "train", gold=True)


BAD_ROWS = {  # row 2 of each file, and what the one-line error names
    "missing column": ({"text": "x"}, "messages: missing"),
    "empty prompt": ({"prompt": "  ", "completion": "x"}, "prompt: empty"),
    "unknown role": ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
                     "messages[1].role: unknown role 'tool'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "a"}]}, "messages: no assistant turn"),
    "no user turn": ({"messages": [{"role": "assistant", "content": "a"}]}, "messages: no user turn"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_every_bad_row_is_a_one_line_error_naming_file_row_and_field_or_a_counted_skip(tmp_path, case):
    bad, says = BAD_ROWS[case]
    good = CHAT[1] if "messages" in bad or "text" in bad else {"prompt": "a", "completion": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good])
    with pytest.raises(LlmkdError) as err:
        sources.load_rows(data(path), "train", gold=True)
    assert str(err.value).startswith(f"{path} row 2: {says}") and "\n" not in str(err.value)
    rows = sources.load_rows(data(path, on_bad_row="skip"), "train", gold=True)
    assert [e["id"] for e in rows.examples] == ["d-00001", "d-00003"] and sum(rows.skipped.values()) == 1


def test_a_response_of_max_length_tokens_is_refused_or_skipped_and_prompts_are_cut_from_the_left(tmp_path):
    rows = sources.load_rows(data(write_jsonl(tmp_path / "d.jsonl", CHAT)), "train", gold=True)
    with pytest.raises(LlmkdError, match=r"d-00002: response: 9 tokens, not below data.max_length 9"):
        sources.skip_long(rows, [3, 3, 9, 2], 9, "error")
    sources.skip_long(rows, [3, 3, 9, 2], 9, "skip")
    assert [e["id"] for e in rows.examples] == ["d-00001-turn1", "d-00001-turn2", "d-00003"]
    assert rows.skipped == {"response: 9 tokens or more": 1}
    assert sources.fit([1, 2, 3, 4, 5], 3) == [3, 4, 5] and sources.fit([1, 2], 3) == [1, 2]


def test_held_out_rows_are_chosen_by_content_and_do_not_move_when_rows_are_appended(tmp_path):
    rows = [{"prompt": f"Question number {i}?", "completion": f"Answer {i}."} for i in range(200)]
    cfg = data(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.2)
    held = {e["question_hash"] for e in sources.load_rows(cfg, "test", gold=True).examples}
    trained = {e["question_hash"] for e in sources.load_rows(cfg, "train", gold=True).examples}
    assert not held & trained and len(held) + len(trained) == 200 and 20 <= len(held) <= 60
    write_jsonl(tmp_path / "d.jsonl", [*rows, *({"prompt": f"New {i}?", "completion": "x"} for i in range(100))])
    sources._read.cache_clear()
    grown = {e["question_hash"] for e in sources.load_rows(cfg, "test", gold=True).examples}
    assert held <= grown and not grown & trained  # every old held-out row stays held out, no trained row moves
    # A second file instead: every row of it is held out, every row of the first trains.
    other = write_jsonl(tmp_path / "e.jsonl", rows[:5])
    split = DataConfig(source=str(tmp_path / "d.jsonl"), eval_source=str(other))
    assert len(sources.load_rows(split, "test", gold=True).examples) == 5
    assert len(sources.load_rows(split, "train", gold=True).examples) == 300


def test_recipes_name_gsm8k_as_before_and_refuse_gsm8k_settings_on_other_data(tmp_path):
    assert load_recipe(None, ["data.source=local"]).data.source == "gsm8k"
    assert load_recipe(None, ["data.source=hub"]).data.source == "hub:openai/gsm8k"
    with pytest.raises(LlmkdError, match="data: .*format is for your own data; GSM8K"):
        load_recipe(None, ["data.format=messages"])
    with pytest.raises(LlmkdError, match="transfer_set.shots is a GSM8K setting"):
        load_recipe(None, ["data.source=x.jsonl", "transfer_set.shots=2"])
    with pytest.raises(LlmkdError, match="no such file or folder"):
        sources.load_rows(DataConfig(source=str(tmp_path / "nope.jsonl")), "train", gold=True)


# --- The builder on such data (the random stand-in) --------------------------------------------------

def gsm8k_as_messages(rows) -> list[dict]:
    return [{"messages": [{"role": "user", "content": prompts.user_turn(r["question"])},
                          {"role": "assistant", "content": prompts.assistant_turn(r["answer"])}]} for r in rows]


def test_gsm8k_written_as_messages_gives_the_built_in_sources_transfer_set_bit_for_bit(tmp_path, stand_in):
    gold = ["transfer_set.response=gold"]
    built_in = build(load_recipe(None, stand_in_overrides(stand_in, *STAND_IN_SET, *gold)), out=tmp_path / "a",
                     progress=False)
    rows = list(load_gsm8k("train"))[746:750]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_as_messages(rows))
    mine = build(load_recipe(None, stand_in_overrides(stand_in, f"data.source={path}", "data.eval_fraction=0",
                                                      "transfer_set.count=null", "transfer_set.batch_size=4", *gold)),
                 out=tmp_path / "b", progress=False)
    assert mine.totals.response_tokens == built_in.totals.response_tokens and mine.data["format"] == "messages"
    a, b = TransferSet.open(tmp_path / "a").examples(), TransferSet.open(tmp_path / "b").examples()
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("input_ids", "response_start", "topk_ids", "topk_logprobs", "tail_logmass"):
            assert np.array_equal(x[key], y[key]), key


def test_every_assistant_token_of_a_multi_turn_row_is_a_target_once(tmp_path, stand_in, smol_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    build(load_recipe(None, stand_in_overrides(stand_in, f"data.source={path}", "data.eval_fraction=0",
                                               "transfer_set.count=null", "transfer_set.response=gold")),
          out=tmp_path / "set", progress=False)
    examples = TransferSet.open(tmp_path / "set").examples()
    tok = smol_tokenizer
    # Independently: the whole conversation rendered once, then each assistant turn's content located in it.
    full = tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    for example, turn in zip(list(examples)[:2], ("Seven.", "Eleven.")):
        ids, start = [int(i) for i in example["input_ids"]], int(example["response_start"])
        prompt, response = tok.decode(ids[:start]), tok.decode(ids[start:])
        assert response == turn + "<|im_end|>"  # the turn and its end marker, nothing else
        assert full.startswith(prompt + response)  # what precedes it is the conversation so far, as rendered
        assert len(example["topk_ids"]) == len(ids) - start  # a target at each response token, none elsewhere
    targets = sum(len(e["topk_ids"]) for e in examples)
    assistant_tokens = sum(len(tok(t["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                           for row in CHAT for t in row["messages"] if t["role"] == "assistant")
    assert targets == assistant_tokens


def test_bad_rows_skipped_are_counted_in_the_manifest_and_the_summary(tmp_path, stand_in):
    from llmkd.transfer_set import summary_lines

    path = write_jsonl(tmp_path / "chat.jsonl", [*CHAT, {"messages": [{"role": "user", "content": "?"}]}])
    manifest = build(load_recipe(None, stand_in_overrides(
        stand_in, f"data.source={path}", "data.eval_fraction=0", "data.on_bad_row=skip", "transfer_set.count=null",
        "transfer_set.response=gold", "data.max_length=24")), out=tmp_path / "set", progress=False)
    assert manifest.data["skipped"] == {"messages: no assistant turn to learn from": 1}
    assert manifest.data["conversations"] == 3
    assert any(line.startswith("bad rows skipped  1: 1 messages: no assistant turn") for line in summary_lines(manifest))
    for example in TransferSet.open(tmp_path / "set").examples():
        assert len(example["input_ids"]) <= 24  # the system turn's prompt, cut from the left to fit


def test_the_dry_run_measures_sequence_lengths_in_the_rows(tmp_path, stand_in, smol_tokenizer):
    from llmkd import plan

    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    recipe = load_recipe(None, stand_in_overrides(stand_in, f"data.source={path}", "data.eval_fraction=0",
                                                  "transfer_set.count=null", "transfer_set.response=gold"))
    longest, response, examples, how = plan.sequence_plan(recipe)
    rendered = smol_tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=False)  # the longest row, whole
    assert examples == 4 and how.startswith(f"measured in 4 rows of {path}")
    assert longest == len(smol_tokenizer(rendered.rstrip("\n"), add_special_tokens=False)["input_ids"])
    assert response == len(smol_tokenizer("Eleven.<|im_end|>", add_special_tokens=False)["input_ids"])


def test_a_model_without_a_chat_template_is_refused_in_one_line_unless_the_recipe_gives_one(tmp_path, stand_in):
    bare = tmp_path / "no-template"
    bare.mkdir()
    for f in stand_in.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).symlink_to(f)
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    rows = [f"data.source={path}", "data.eval_fraction=0", "transfer_set.count=null", "transfer_set.response=gold"]
    with pytest.raises(LlmkdError, match="has no chat template.*model.chat_template"):
        build(load_recipe(None, stand_in_overrides(bare, *rows)), out=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    given = build(load_recipe(None, stand_in_overrides(bare, *rows, f"model.chat_template={stand_in / 'chat_template.jinja'}")),
                  out=tmp_path / "given", progress=False)
    own = build(load_recipe(None, stand_in_overrides(stand_in, *rows)), out=tmp_path / "own", progress=False)
    assert [s.sha256 for s in given.shards] == [s.sha256 for s in own.shards]  # the same template, the same set


def test_the_sweep_runs_on_your_own_data_and_names_it(tmp_path, stand_in):
    from llmkd import sweep

    path = write_jsonl(tmp_path / "chat.jsonl", [*CHAT, *CHAT[1:]] * 2)  # 10 conversations, duplicates hash alike
    recipe = load_recipe(None, stand_in_overrides(
        stand_in, "name=own", f"data.source={path}", "data.eval_fraction=0.5", "transfer_set.count=null",
        "transfer_set.response=gold", "train.max_steps=1", "train.batch_size=1", "eval.max_new_tokens=2",
        "eval.fidelity_count=2"))
    held = sources.load_rows(recipe.data, "test", gold=True).examples
    assert held  # "Say hello." / "What is a dict?" / the two-turn one: whichever hash below 0.5
    table = sweep.run(recipe, ["nf4"], progress=False, say=lambda _: None).read_text()
    assert f"teacher-forced on the held-out rows of {path}" in table and "| nf4 | 4 |" in table


def test_on_policy_rounds_run_on_your_own_data_and_stop_at_its_end_of_turn(tmp_path, stand_in):
    from llmkd import train
    from llmkd.transfer_set import Examples

    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    recipe = load_recipe(None, stand_in_overrides(
        stand_in, f"data.source={path}", "data.eval_fraction=0", "transfer_set.count=null", "transfer_set.response=gold",
        f"transfer_set.out={tmp_path / 'set'}", f"train.out={tmp_path / 'run'}", "lora.init=default",
        "train.batch_size=2", "train.max_steps=2", "train.on_policy.rounds=1", "train.on_policy.questions=2",
        "train.on_policy.max_new_tokens=4", "train.on_policy.batch_size=2", "train.on_policy.fraction=1"))
    build(recipe, progress=False)
    train.train(recipe, progress=False)
    record = json.loads((recipe.layout.on_policy / "round-000.json").read_text())
    assert record["decoding"]["stop_strings"] == list(sources.END_OF_TURN)  # not GSM8K's "Question:"
    cached = {e["id"]: e for e in TransferSet.open(tmp_path / "set").examples()}
    ts = recipe.transfer_set
    for row in Examples.read([recipe.layout.on_policy / "round-000.safetensors"], ts.top_k, ts.encoding):
        start = int(row["response_start"])
        assert row["input_ids"][:start].tolist() == cached[row["id"]]["input_ids"][:start].tolist()  # the row's prompt
