"""Transfer set: a real build on the embedded model (a few questions, short responses, small k).

The stored targets are checked against a fresh teacher forward (one example, no padding); the
responses against the teacher's own generation and the gold solution; resume against a build
killed with SIGKILL; the reader against corrupted shards, other tokenizers, foreign folders and
changed settings. The two tests of mechanics across processes (a killed build resumes to the
uninterrupted bytes; two processes build the bytes of one) run on conftest's 2-layer random
stand-in of the embedded model: byte equality does not depend on the weights.
"""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import FP32_TEACHER, stand_in_overrides
from faults import fault_seed, kill_at_random_moment
from llmkd import builder, models, transfer_set
from llmkd.config import load_recipe
from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k
from llmkd.errors import LlmkdError
from llmkd.generation import generate
from llmkd.losses import topk_with_tail

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2-cpu.yaml"

# llmkd's format only (tests/test_renderings.py has the others).
# Train questions 4-7: question 6 is answered in 42 tokens, so one response ends with the eos.
TEACHER_OVERRIDES = [
    "transfer_set.renderings=[llmkd]",
    "transfer_set.response=teacher", "transfer_set.start=4", "transfer_set.count=4", "transfer_set.top_k=16",
    "transfer_set.max_new_tokens=48", "transfer_set.batch_size=2", "transfer_set.shard_size=2",
]
# The teacher-mode set is in the default encoding (compact), the gold one in fp16.
GOLD_OVERRIDES = [
    "transfer_set.renderings=[llmkd]", "transfer_set.encoding=fp16",
    "transfer_set.response=gold", "transfer_set.start=0", "transfer_set.count=3", "transfer_set.top_k=8",
    "transfer_set.batch_size=2", "transfer_set.shard_size=2",
]
# Killed mid-way: 3 shards of 2 short teacher responses each.
KILL_OVERRIDES = [
    "transfer_set.renderings=[llmkd]",
    "transfer_set.response=teacher", "transfer_set.start=10", "transfer_set.count=6", "transfer_set.top_k=8",
    "transfer_set.max_new_tokens=16", "transfer_set.batch_size=2", "transfer_set.shard_size=2",
]


def recipe(overrides):
    return load_recipe(REPO / RECIPE, [FP32_TEACHER, *overrides])  # as the session's teacher


@pytest.fixture(scope="module")
def teacher_set(tmp_path_factory, smol_teacher, smol_tokenizer):
    out = tmp_path_factory.mktemp("ts") / "teacher"
    builder.build(recipe(TEACHER_OVERRIDES), out=out, progress=False, teacher=smol_teacher, tokenizer=smol_tokenizer)
    return transfer_set.TransferSet.open(out)


@pytest.fixture(scope="module")
def gold_set(tmp_path_factory, smol_teacher, smol_tokenizer):
    out = tmp_path_factory.mktemp("ts") / "gold"
    builder.build(recipe(GOLD_OVERRIDES), out=out, progress=False, teacher=smol_teacher, tokenizer=smol_tokenizer)
    return transfer_set.TransferSet.open(out)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def content(manifest: transfer_set.Manifest) -> dict:
    """The manifest without what legitimately differs between two builds of the same content."""
    d = manifest.to_dict()
    del d["build"], d["provenance"]
    d["shards"] = [{k: v for k, v in s.items() if k != "seconds"} for s in d["shards"]]
    return d


# --- Targets and responses --------------------------------------------------------------------------


def assert_targets_match_fresh_forward(ts: transfer_set.TransferSet, teacher):
    """Stored top-k ids, logprobs and tail = a fresh unpadded forward's, within the encoding's rounding:
    fp16's, or compact's byte per sqrt(p) (each within 1/255 of the fresh one, once rescaled)."""
    k, encoding = ts.manifest.settings.top_k, ts.manifest.settings.encoding
    for row in ts.examples():
        ids, start = row["input_ids"].tolist(), row["response_start"]
        with torch.no_grad():
            logits = teacher(torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1]  # (R, V)
        stored_ids = torch.from_numpy(row["topk_ids"]).long()  # (R, K)
        stored_lp = torch.from_numpy(row["topk_logprobs"]).float()  # (R, K)
        stored_tail = torch.from_numpy(row["tail_logmass"]).float()  # (R,)
        assert stored_ids.shape == stored_lp.shape == (len(ids) - start, k)

        fresh_ids, fresh_lp, fresh_tail = topk_with_tail(logits, k)
        fp16 = dict(rtol=2e-3, atol=2e-3)  # fp16 keeps 11 significant bits (rel. 4.9e-4), plus batching noise
        # Values: the stored ids' fresh logprobs are the stored logprobs, and the top-k's, in order.
        full_lp = torch.log_softmax(logits.float(), -1)
        torch.testing.assert_close(fresh_tail, stored_tail, **fp16)
        if encoding == "fp16":
            torch.testing.assert_close(full_lp.gather(1, stored_ids), stored_lp, **fp16)
            torch.testing.assert_close(fresh_lp, stored_lp, **fp16)
        else:
            assert encoding == "compact"
            fresh_sqrt = full_lp.gather(1, stored_ids).double().exp().sqrt()
            rescale = (1 - stored_tail.double().exp()) / fresh_sqrt.square().sum(-1)  # (R,) as the decoder's
            error = (stored_lp.double().exp().sqrt() - fresh_sqrt).abs()
            assert (error <= 0.5 / 255 + 2e-3 + fresh_sqrt * (rescale - 1).abs()[:, None]).all(), error.max()
            assert (stored_lp.double().exp().sum(-1) - (1 - stored_tail.double().exp())).abs().max() < 1e-6
        # Ids: equal, except where two candidates are tied within rounding (then either order is right).
        same = fresh_ids == stored_ids
        tied = (fresh_lp - full_lp.gather(1, stored_ids)).abs() < 1e-4
        assert (same | tied).all()
        assert (same.float().mean() > 0.99), "ids differ beyond near-ties"


def test_teacher_mode_targets_match_a_fresh_forward(teacher_set, smol_teacher):
    assert_targets_match_fresh_forward(teacher_set, smol_teacher)


def test_teacher_mode_response_is_the_teachers_generation(teacher_set, smol_teacher, smol_tokenizer):
    tok, r = smol_tokenizer, recipe(TEACHER_OVERRIDES)
    decoding = teacher_set.manifest.settings.decoding  # recorded: greedy and nothing else
    assert decoding["do_sample"] is False and decoding["repetition_penalty"] == 1.0
    assert decoding["no_repeat_ngram_size"] == 0 and decoding["max_new_tokens"] == r.transfer_set.max_new_tokens
    questions = list(load_gsm8k("train"))[4:8]
    texts = [prompts.render_prompt(tok, q["question"]) for q in questions]
    completions, _ = generate(smol_teacher, tok, texts, batch_size=2, max_new_tokens=48,
                              stop_strings=prompts.STOP_STRINGS, progress=False)
    rows = list(teacher_set.examples())
    assert [row["id"] for row in rows] == [q["id"] for q in questions] == teacher_set.manifest.question_ids
    finishes = []
    for row, text, c in zip(rows, texts, completions):
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert row["input_ids"][: row["response_start"]].tolist() == prompt_ids
        response = row["input_ids"][row["response_start"] :].tolist()
        assert response == c.token_ids  # the exact tokens generated, eos included
        assert tok.decode(response, skip_special_tokens=True).strip() == c.text
        finishes.append(row["finish"])
        if row["finish"] == "eos":
            assert response[-1] == tok.eos_token_id and tok.decode(response[-1:]) == "<|im_end|>"
        elif row["finish"] == "length":
            assert len(response) == r.transfer_set.max_new_tokens
    assert "eos" in finishes  # question 6 ends within 48 tokens

    m = teacher_set.manifest
    assert m.totals.examples == 4 and len(m.shards) == 2
    assert m.totals.response_tokens == sum(len(row["input_ids"]) - row["response_start"] for row in rows)
    assert 0.5 < m.totals.mean_topk_mass < 1
    assert m.settings.max_new_tokens == 48 and m.settings.stop_strings == list(prompts.STOP_STRINGS)
    assert m.settings.seed is None  # greedy: the seed does not matter, so it is not a setting


def test_gold_mode_response_is_the_solution(gold_set, smol_teacher, smol_tokenizer):
    tok = smol_tokenizer
    rows = list(gold_set.examples())
    for row, q in zip(rows, list(load_gsm8k("train"))[:3]):
        response = tok.decode(row["input_ids"][row["response_start"] :])
        assert response == prompts.render_response(tok, q["question"], prompts.assistant_turn(q["answer"]))
        assert response.startswith(prompts.assistant_turn(q["answer"])) and "<|im_end|>" in response
        assert row["finish"] == "gold" and row["question_hash"] == q["question_hash"]
    assert_targets_match_fresh_forward(gold_set, smol_teacher)
    gold_set.verify()
    gold_set.check_tokenizer(tok)
    assert gold_set.question_hashes == {q["question_hash"] for q in list(load_gsm8k("train"))[:3]}


def test_complete_set_is_returned_not_rebuilt(gold_set, smol_tokenizer):
    before = {p: p.stat().st_mtime_ns for p in gold_set.shard_paths}
    again = builder.build(recipe(GOLD_OVERRIDES), out=gold_set.path, progress=False, teacher="not needed",
                    tokenizer=smol_tokenizer)
    assert again == gold_set.manifest
    assert {p: p.stat().st_mtime_ns for p in gold_set.shard_paths} == before


def test_summary_lines(gold_set):
    text = "\n".join(transfer_set.summary_lines(gold_set.manifest))
    assert "B/token at top-8" in text and "98,304 B/token at V=49,152" in text and "256,512" in text


# --- Questions --------------------------------------------------------------------------------------


def test_test_split_refused_without_allow_eval_split():
    r = recipe(["transfer_set.split=test", "transfer_set.count=2"])
    with pytest.raises(LlmkdError, match="contaminat"):
        builder.build(r, out="/nonexistent/never-written")
    rows, _, _, _ = builder.select_questions(r, allow_eval_split=True)
    assert [q["id"] for q in rows] == ["gsm8k-test-00000", "gsm8k-test-00001"]


def test_exemplars_excluded_from_the_questions():
    exemplars = prompts.select_exemplars(load_gsm8k("train"), 2, 1234)
    first = min(e["index"] for e in exemplars)
    r = recipe(["transfer_set.renderings=[llmkd]", "transfer_set.shots=2", "data.exemplar_seed=1234",
                f"transfer_set.start={first - 1}", "transfer_set.count=3"])
    rows, chosen, excluded, _ = builder.select_questions(r)
    assert [e["id"] for e in chosen] == [e["id"] for e in exemplars]
    assert excluded == [f"gsm8k-train-{first:05d}"]
    assert [q["index"] for q in rows] == [first - 1, first + 1]


def test_limit_caps_count():
    rows, _, _, _ = builder.select_questions(recipe(["transfer_set.count=10"]), limit=3)
    assert len(rows) == 3


# --- Resume -----------------------------------------------------------------------------------------


def test_build_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(tmp_path, stand_in):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    overrides = stand_in_overrides(stand_in, *KILL_OVERRIDES)  # the random stand-in: no eos, 16 tokens each
    code = (
        "import sys\n"
        "from llmkd.config import load_recipe\n"
        "from llmkd.builder import build\n"
        f"build(load_recipe({RECIPE!r}, {overrides!r}), out=sys.argv[1], progress=False)\n"
    )
    run = dict(cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    # The uninterrupted reference in this process (loading the stand-in as the subprocess does, so that
    # its span is the subprocess's); the shards of the killed subprocess and of the resume here must
    # come out byte-identical to it.
    start = time.monotonic()
    builder.build(recipe(overrides), out=clean, progress=False)
    span = time.monotonic() - start
    what = kill_at_random_moment([sys.executable, "-c", code, str(killed)], out=killed, span=span,
                                 done=killed / "manifest.json", seed=fault_seed(), **run)
    assert not (killed / "manifest.json").exists(), what
    with pytest.raises(LlmkdError, match="unfinished build"):
        transfer_set.TransferSet.open(killed)
    # Shards recorded as finished at the kill must be kept as they are, not rebuilt.
    finished = {p.stem: (killed / "shards" / f"{p.stem}.safetensors").stat().st_ino
                for p in (killed / "progress").glob("shard-*.json")} if (killed / "progress").is_dir() else {}

    builder.build(recipe(overrides), out=killed, progress=False)
    assert {name: (killed / "shards" / f"{name}.safetensors").stat().st_ino for name in finished} == finished, what
    killed_files, clean_files = folder_files(killed), folder_files(clean)
    assert sorted(killed_files) == sorted(clean_files) == [
        "manifest.json", "shards/shard-00000.safetensors", "shards/shard-00001.safetensors", "shards/shard-00002.safetensors"
    ], what  # no temporary files, no progress records, no build.json
    for name in killed_files:
        if name.endswith(".safetensors"):
            assert killed_files[name] == clean_files[name], f"{what}: {name}"  # byte-identical shards
    resumed, uninterrupted = transfer_set.TransferSet.open(killed), transfer_set.TransferSet.open(clean)
    resumed.verify()
    assert content(resumed.manifest) == content(uninterrupted.manifest), what
    assert resumed.manifest.totals.examples == 6 and len(resumed.manifest.shards) == 3


# --- Refusals -----------------------------------------------------------------------------------------


@pytest.fixture
def gold_copy(gold_set, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(gold_set.path, out)
    return transfer_set.TransferSet.open(out)


def test_verify_detects_a_flipped_byte(gold_copy):
    shard = gold_copy.shard_paths[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(LlmkdError, match=r"shard-00001\.safetensors: sha256"):
        gold_copy.verify()


def test_verify_detects_a_truncated_shard(gold_copy):
    shard = gold_copy.shard_paths[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(LlmkdError, match=r"shard-00000\.safetensors: .* bytes, the manifest says"):
        gold_copy.verify()
    with pytest.raises(LlmkdError, match=r"shard-00000\.safetensors"):
        gold_copy.examples()


def random_columns(lengths, starts, k, seed=0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = [n - s for n, s in zip(lengths, starts)]
    return {"id": [f"q{i}" for i in range(len(lengths))], "question_hash": [f"h{i}" for i in range(len(lengths))],
            "finish": ["eos", "gold", "length"][: len(lengths)], "response_start": list(starts),
            "input_ids": [rng.integers(0, 50_000, n) for n in lengths],
            "topk_ids": [rng.integers(0, 50_000, (r, k)) for r in rows],
            "topk_logprobs": [rng.normal(size=(r, k)).astype("float16") for r in rows],
            "tail_logmass": [rng.normal(size=r).astype("float16") for r in rows]}


def test_shards_give_back_their_rows_across_shards_with_deterministic_bytes(tmp_path):
    import numpy as np

    k, lengths, starts = 3, [5, 2, 7], [2, 1, 6]
    columns = random_columns(lengths, starts, k)
    transfer_set.write_shard(tmp_path / "a.safetensors", columns, k)
    transfer_set.write_shard(tmp_path / "empty.safetensors", random_columns([], [], k), k)
    transfer_set.write_shard(tmp_path / "b.safetensors", random_columns([4], [3], k, seed=1), k)
    examples = transfer_set.Examples.read([tmp_path / "a.safetensors", tmp_path / "empty.safetensors",
                                           tmp_path / "b.safetensors"], k)
    assert len(examples) == 4 and examples.input_lengths.tolist() == [5, 2, 7, 4]
    assert examples.response_lengths.tolist() == [3, 1, 1, 1] and examples[-1]["id"] == "q0"
    for i, row in enumerate(examples.rows(range(3))):  # each field as written, the strings too
        for key, values in columns.items():
            assert np.array_equal(np.asarray(row[key]), np.asarray(values[i])), (i, key)
    transfer_set.write_shard(tmp_path / "again.safetensors", transfer_set.Examples.read([tmp_path / "a.safetensors"]).columns(), k)
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_a_malformed_shard_is_a_one_line_error_naming_it(tmp_path):
    from safetensors.numpy import load_file, save_file

    k = 3
    good = tmp_path / "good.safetensors"
    transfer_set.write_shard(good, random_columns([5, 2], [2, 1], k), k)
    with pytest.raises(LlmkdError, match=r"good\.safetensors: topk_ids is \(3,\) per row, the manifest's top_k is 4"):
        transfer_set.read_shard(good, k=4)

    def broken(name, **change):
        from safetensors import safe_open

        with safe_open(str(good), framework="numpy") as f:
            meta = f.metadata()
        path = tmp_path / f"{name}.safetensors"
        save_file({**load_file(good), **change}, path, metadata=meta)
        return path

    import numpy as np

    cases = {
        broken("late_start", response_start=np.array([2, 2], dtype=np.int32)): "a response_start outside",
        broken("short_targets", tail_logmass=np.zeros(2, dtype=np.float16)): "tail_logmass has 2 rows, the examples' responses 4",
        broken("wrong_dtype", topk_ids=np.zeros((4, k), dtype=np.int64)): "topk_ids is int64",
        broken("long_offsets", input_offsets=np.array([0, 5, 8], dtype=np.int64)): "input_offsets end at 8, input_ids holds 7",
        broken("falling_offsets", input_offsets=np.array([0, 8, 7], dtype=np.int64)): "input_offsets do not run from 0 upwards",
    }
    not_a_shard = tmp_path / "model.safetensors"
    save_file({"weight": np.zeros(3, dtype=np.float32)}, not_a_shard)
    cases[not_a_shard] = "not a transfer-set shard"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cases[garbage] = "unreadable shard"
    for path, words in cases.items():
        with pytest.raises(LlmkdError) as err:
            transfer_set.read_shard(path, k)
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message, message
        assert words in message, message


def test_verify_detects_non_finite_logprobs(gold_copy):
    shard = gold_copy.shard_paths[0]
    columns = transfer_set.Examples.read([shard]).columns()
    columns["topk_logprobs"][1][3][0] = float("nan")
    transfer_set.write_shard(shard, columns, gold_copy.manifest.settings.top_k)
    manifest = json.loads((gold_copy.path / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=models.sha256_file(shard))
    (gold_copy.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LlmkdError, match=r"shard-00000\.safetensors: non-finite"):
        transfer_set.TransferSet.open(gold_copy.path).verify()


def larger(ts: transfer_set.TransferSet, shards: int = 3, tokens: int = 40_000, nan: bool = False):
    """`ts` rewritten as `shards` shards of 3 examples of `tokens` tokens (about 6.5 MB each at top-8),
    the manifest updated; nan: the last shard's last tail_logmass not finite (past its first MiB)."""
    import numpy as np

    k, data = ts.manifest.settings.top_k, json.loads((ts.path / "manifest.json").read_text())
    for path in ts.shard_paths:
        path.unlink()
    data["shards"] = []
    for i in range(shards):
        columns = random_columns([tokens, tokens - 1, tokens - 2], [10, 20, 30], k, seed=i)
        if nan and i == shards - 1:
            columns["tail_logmass"][-1][-1] = np.float16("nan")
        path = ts.path / transfer_set.shard_name(i)
        transfer_set.write_shard(path, columns, k)
        data["shards"].append({"file": transfer_set.shard_name(i), "examples": 3, "response_tokens": 3 * tokens - 63,
                               "bytes": path.stat().st_size, "sha256": models.sha256_file(path),
                               "mean_topk_mass": 0.9, "seconds": 0.0})
    data["totals"]["examples"] = 3 * shards
    (ts.path / "manifest.json").write_text(json.dumps(data))
    return transfer_set.TransferSet.open(ts.path)


def test_opening_a_set_holds_no_copy_of_it(gold_copy):
    """verify + examples, what a training start runs: memory for a read block, not for a shard or the set."""
    import tracemalloc

    import numpy as np

    ts = larger(gold_copy)
    shard = min(e.bytes for e in ts.manifest.shards)
    tracemalloc.start()
    try:
        ts.verify()
        examples = ts.examples()
        sums = [float(r["topk_logprobs"].sum(dtype=np.float32)) for r in examples]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(sums) == 9 and shard > 6_000_000
    assert peak < shard / 2, f"{peak:,} B allocated at peak, a shard is {shard:,} B"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_rows_are_views_of_the_mapped_shard_files(tmp_path):
    import numpy as np

    k = 3
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for seed, path in enumerate(paths):
        transfer_set.write_shard(path, random_columns([5, 2, 7], [2, 1, 6], k, seed=seed), k)
    examples = transfer_set.Examples.read(paths, k)
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        maps.append((low, high, name))
    for i in (0, 2, 3, 5):
        for key in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass"):
            address = examples[i][key].__array_interface__["data"][0]
            where = [name for low, high, name in maps if low <= address < high]
            assert where == [str(paths[i // 3])], (i, key, where)
    assert not np.shares_memory(examples[0]["topk_ids"], examples[1]["topk_ids"])


def test_verify_finds_a_non_finite_value_past_the_first_block(gold_copy):
    ts = larger(gold_copy, nan=True)
    with pytest.raises(LlmkdError, match=r"shard-00002\.safetensors: non-finite teacher log-probabilities in column tail_logmass"):
        ts.verify()


def test_tokenizer_mismatch_refused(gold_set, smol_tokenizer):
    other = copy.deepcopy(smol_tokenizer)
    other.add_tokens(["<llmkd-new-token>"])
    with pytest.raises(LlmkdError, match="another tokenizer"):
        gold_set.check_tokenizer(other)
    templated = copy.deepcopy(smol_tokenizer)
    templated.chat_template = "{{ messages }}"
    with pytest.raises(LlmkdError, match="another chat template"):
        gold_set.check_tokenizer(templated)
    # A batched, padded call changes the backend's padding state, not the tokenizer's identity.
    smol_tokenizer(["a", "a b c"], padding=True)
    gold_set.check_tokenizer(smol_tokenizer)


def test_foreign_folder_refused_and_left_alone(tmp_path, smol_tokenizer):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(LlmkdError, match=f"{mine}: exists and is not a transfer set"):
        builder.build(recipe(GOLD_OVERRIDES), out=mine, progress=False, tokenizer=smol_tokenizer)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_changed_settings_refused(gold_copy, smol_tokenizer):
    before = folder_files(gold_copy.path)
    with pytest.raises(LlmkdError, match=r"copy: a transfer set built with other settings \(top_k: 8 there, 4 now"):
        builder.build(recipe([*GOLD_OVERRIDES, "transfer_set.top_k=4"]), out=gold_copy.path, progress=False,
                tokenizer=smol_tokenizer)
    # An unfinished build with other settings is refused too.
    settings = asdict(gold_copy.manifest.settings) | {"shard_size": 1}
    (gold_copy.path / "manifest.json").unlink()
    (gold_copy.path / "build.json").write_text(json.dumps({"settings": settings}))
    with pytest.raises(LlmkdError, match=r"an unfinished build with other settings \(shard_size: 1 there, 2 now"):
        builder.build(recipe(GOLD_OVERRIDES), out=gold_copy.path, progress=False, tokenizer=smol_tokenizer)
    assert {k: v for k, v in folder_files(gold_copy.path).items() if k.startswith("shards")} == \
        {k: v for k, v in before.items() if k.startswith("shards")}


def test_open_validates_the_manifest(gold_copy):
    path = gold_copy.path / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"format_version": 99}))
    with pytest.raises(LlmkdError, match=r"manifest.json: invalid transfer-set manifest: format_version 99"):
        transfer_set.TransferSet.open(gold_copy.path)
    del data["totals"]["bytes"]
    path.write_text(json.dumps(data))
    with pytest.raises(LlmkdError, match=r"manifest.json: .*missing key\(s\) totals.bytes"):
        transfer_set.TransferSet.open(gold_copy.path)
    path.write_text("{not json")
    with pytest.raises(LlmkdError, match=r"manifest.json: invalid"):
        transfer_set.TransferSet.open(gold_copy.path)
    path.unlink()
    with pytest.raises(LlmkdError, match="not a transfer set, no manifest.json"):
        transfer_set.TransferSet.open(gold_copy.path)


# --- Two processes --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_build_equals_one_process(tmp_path, stand_in):
    """accelerate launch --multi_gpu --num_processes 2: two gloo ranks on CPU, shard i on rank i % 2.

    On the random stand-in (byte equality does not depend on the weights), for GSM8K and for a messages
    file: the gold set of GOLD_OVERRIDES (or the 4 responses of the messages file, 2 shards) built here in
    one process, then by two (one launch builds both).
    """
    from test_sources import CHAT, write_jsonl

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed next to this python")
    rows = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    builds = {
        "gsm8k": (str(REPO / RECIPE), stand_in_overrides(stand_in, *GOLD_OVERRIDES)),
        "chat rows": (None, stand_in_overrides(stand_in, f"data.source={rows}", "data.eval_fraction=0",
                                               "transfer_set.count=null", "transfer_set.response=gold",
                                               "transfer_set.batch_size=2", "transfer_set.shard_size=2")),
    }
    script = tmp_path / "build.py"
    lines = ["from llmkd.config import load_recipe", "from llmkd.builder import build"]
    for i, (data, (path, overrides)) in enumerate(builds.items()):
        builder.build(load_recipe(path, overrides), out=tmp_path / f"one-{i}", progress=False)
        assert len(transfer_set.TransferSet.open(tmp_path / f"one-{i}").shard_paths) == 2, data  # shard i on rank i % 2
        lines += [f"m = build(load_recipe({path!r}, {overrides!r}), out={str(tmp_path / f'two-{i}')!r}, progress=False)",
                  "assert m.build.processes == 2, m.build"]
    script.write_text("\n".join(lines) + "\n")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script)]
    # Each rank runs as many threads as this process did for `one`: equal bytes by construction
    # (torchrun would give each rank one thread, and some CPUs' kernels round differently then).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for i, data in enumerate(builds):
        one, two = (transfer_set.TransferSet.open(tmp_path / f"{k}-{i}") for k in ("one", "two"))
        two.verify()
        assert two.manifest.build.processes == 2, data
        assert content(two.manifest) == content(one.manifest), data
        for a, b in zip(two.shard_paths, one.shard_paths, strict=True):
            assert a.read_bytes() == b.read_bytes(), (data, a.name)


# --- The teacher's identity ------------------------------------------------------------------------------

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = "model.safetensors.index.json"
# A repo like mistralai/Mistral-7B-Instruct-v0.3: the HF shards and their index, a consolidated copy for
# another runtime, and a pickled copy from_pretrained never reads beside the safetensors.
FAKE_REPO = {
    "config.json": b'{"model_type": "llama"}',
    SHARDS[0]: b"shard one", SHARDS[1]: b"shard two",
    INDEX: json.dumps({"metadata": {}, "weight_map": {"a": SHARDS[0], "b": SHARDS[1], "c": SHARDS[0]}}).encode(),
    "consolidated.safetensors": b"another runtime's copy", "pytorch_model.bin": b"a pickled copy",
}


def write_files(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def fake_hub(monkeypatch, repo: Path, snapshot: Path, log: list):
    """huggingface_hub.snapshot_download serving `repo` into `snapshot`, each file it copies logged."""
    import fnmatch

    import huggingface_hub

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in sorted(repo.iterdir()):
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                log.append(f.name)
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_teacher_identity_fetches_and_hashes_only_what_from_pretrained_reads(tmp_path, monkeypatch):
    from types import SimpleNamespace

    fetched = []
    fake_hub(monkeypatch, write_files(tmp_path / "repo", FAKE_REPO), tmp_path / "snapshot", fetched)
    identity = transfer_set.teacher_identity(SimpleNamespace(name="fake-org/fake-model", revision=None))
    assert sorted(fetched) == sorted(["config.json", INDEX, *SHARDS])  # each once: no consolidated, no .bin
    assert identity["files"] == {n: models.sha256_file(tmp_path / "repo" / n) for n in ["config.json", *SHARDS]}
    assert identity["resolved"] == str(tmp_path / "snapshot")


def test_teacher_identity_of_a_folder_hashes_only_what_from_pretrained_reads(tmp_path):
    from types import SimpleNamespace

    def files(folder):
        return set(transfer_set.teacher_identity(SimpleNamespace(name=str(folder), revision=None))["files"])

    assert files(write_files(tmp_path / "sharded", FAKE_REPO)) == {"config.json", *SHARDS}
    single = {"config.json": b"{}", "model.safetensors": b"w", "consolidated.safetensors": b"c", "pytorch_model.bin": b"b"}
    assert files(write_files(tmp_path / "single", single)) == {"config.json", "model.safetensors"}
    assert files(write_files(tmp_path / "bin", {"config.json": b"{}", "pytorch_model.bin": b"b"})) == \
        {"config.json", "pytorch_model.bin"}
    with pytest.raises(LlmkdError, match=r"bare: no model\.safetensors\[\.index\.json\] or pytorch_model\.bin"):
        files(write_files(tmp_path / "bare", {"config.json": b"{}", "consolidated.safetensors": b"c"}))
    (tmp_path / "sharded" / SHARDS[1]).unlink()
    with pytest.raises(LlmkdError, match=rf"index\.json: names {SHARDS[1]}, not in"):
        files(tmp_path / "sharded")


def test_teacher_identity_of_the_embedded_default_is_unchanged():
    """The rule before: every *.safetensors of the folder (else *.bin) and config.json. Sets built then stay valid."""
    folder = models.embedded_model_dir()
    before = {p.name: models.sha256_file(p) for p in [*sorted(folder.glob("*.safetensors")), folder / "config.json"]}
    identity = transfer_set.teacher_identity(recipe(GOLD_OVERRIDES).model)
    assert identity["files"] == before and list(before) == ["model.safetensors", "config.json"]
    assert identity["sha256"] == transfer_set.sha256_text(json.dumps(before, sort_keys=True))


def test_two_processes_fetch_the_teacher_one_after_the_other(tmp_path):
    """Under a process group, the local main process fetches first; the other waits, then finds the cache."""
    repo = write_files(tmp_path / "repo", FAKE_REPO)
    script = tmp_path / "identity.py"
    script.write_text(
        "import os, shutil, sys, time\n"
        "import torch.distributed as dist\n"
        "import huggingface_hub\n"
        "from types import SimpleNamespace\n"
        "from llmkd import transfer_set\n"
        "rank = int(os.environ['RANK'])\n"
        "dist.init_process_group('gloo', init_method=sys.argv[1], rank=rank, world_size=2)\n"
        "def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):\n"
        "    with open(sys.argv[2], 'a') as log:\n"
        "        log.write(f'{rank} start\\n')\n"
        "    time.sleep(1.0 if rank == 0 else 0)\n"
        f"    shutil.copytree({str(repo)!r}, sys.argv[3], dirs_exist_ok=True)\n"
        "    with open(sys.argv[2], 'a') as log:\n"
        "        log.write(f'{rank} end\\n')\n"
        "    return sys.argv[3]\n"
        "huggingface_hub.snapshot_download = snapshot_download\n"
        "dist.barrier()\n"
        "transfer_set.teacher_identity(SimpleNamespace(name='fake-org/fake-model', revision=None))\n"
        "dist.destroy_process_group()\n"
    )
    log, init = tmp_path / "log", f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(script), init, str(log), str(tmp_path / f"snapshot-{rank}")],
                              env={**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    ranks = [line.split()[0] for line in log.read_text().splitlines()]
    assert ranks == sorted(ranks) and ranks.count("0") == ranks.count("1") == 6, ranks  # 3 fetches, start + end
