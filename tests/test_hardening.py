"""Hardening through the command line: every bad input is a one-line error naming the problem, a
non-zero exit, and no change to any output folder; an evaluation killed at a random moment leaves
no partial file and its re-run writes what an uninterrupted run writes.

(Killed builds and training runs are in test_transfer_set.py and test_train.py; the refusals'
finer points are tested per module. This file checks the contract a user sees: `llmkd ...` exits 2
with one line.)
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import FP32_TEACHER, stand_in_overrides
from faults import fault_seed, kill_at_random_moment, timed_call
from llmkd import atomic, models
from llmkd import builder, transfer_set
from llmkd.cli import main
from llmkd.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2-cpu.yaml"
GOLD = [FP32_TEACHER, "transfer_set.response=gold", "transfer_set.start=0", "transfer_set.count=2", "transfer_set.top_k=8",
        "transfer_set.batch_size=2", "transfer_set.shard_size=2"]


@pytest.fixture(scope="module")
def built_set(tmp_path_factory, smol_teacher, smol_tokenizer):
    out = tmp_path_factory.mktemp("hardening") / "set"
    builder.build(load_recipe(REPO / RECIPE, GOLD), out=out, progress=False, teacher=smol_teacher, tokenizer=smol_tokenizer)
    return out


def snapshot(*folders: Path) -> dict:
    """Every file under the folders with its size and modification time."""
    files = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            st = p.stat()
            files[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    return files


def copy_set(built_set: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(built_set, out)
    return out


def corrupt_byte(folder: Path) -> None:
    shard = folder / "shards" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def nan_teacher_data(folder: Path) -> None:
    """A NaN tail log-mass (stored as float16 in every encoding) in a shard whose manifest hash is updated
    to match (so only the content is wrong)."""
    ts = transfer_set.TransferSet.open(folder)
    shard, settings = ts.shard_paths[0], ts.manifest.settings
    columns = transfer_set.Examples.read([shard], settings.top_k, settings.encoding).columns()
    columns["tail_logmass"][0][2] = float("nan")
    transfer_set.write_shard(shard, columns, settings.top_k, settings.encoding, settings.vocab_size)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=models.sha256_file(shard))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def other_tokenizer(folder: Path) -> None:
    """The set claims another tokenizer: what a set built for a different model looks like."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["settings"]["tokenizer_sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))


def foreign_adapter(tmp_path: Path) -> Path:
    """A LoRA adapter trained for another base model (a tiny Llama with hidden size 64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    out = tmp_path / "foreign-adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


def malformed_recipe(tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  lr: [1e-3\n")
    return str(path)


# (case, argv builder(tmp_path, built_set) -> list[str], expected words in the one-line error)
CASES = [
    ("malformed YAML", lambda t, s: ["recipe", malformed_recipe(t)], "bad.yaml"),
    ("unknown key", lambda t, s: ["eval", RECIPE, "eval.limt=3"], "unknown key 'eval.limt'"),
    ("unknown key (dry run)", lambda t, s: ["train", "recipes/gsm8k.yaml", "train.lrr=1", "--dry-run"],
     "unknown key 'train.lrr'"),
    ("missing recipe", lambda t, s: ["recipe", "recipes/nope.yaml"], "recipe not found: recipes/nope.yaml"),
    ("limit 0", lambda t, s: ["eval", RECIPE, "--limit", "0"], "--limit must be > 0"),
    ("fidelity without a student", lambda t, s: ["eval", "--teacher", "--fidelity"], "--fidelity compares a student"),
    ("empty recipe file", lambda t, s: ["run", str((t / "empty.yaml", (t / "empty.yaml").write_text(""))[0])],
     "empty recipe"),
    ("more shots than exemplars", lambda t, s: ["eval", RECIPE, "--shots", "100000", "--teacher", "--limit", "1",
                                                "--out", str(t / "eval")], "100000 shots asked"),
    ("wrong type", lambda t, s: ["train", RECIPE, "train.lr=fast"], "train.lr"),
    ("zero size", lambda t, s: ["train", RECIPE, "train.batch_size=0"], "train.batch_size"),
    ("negative size", lambda t, s: ["build-transfer-set", RECIPE, "transfer_set.count=-5"], "transfer_set.count"),
    ("k above the vocabulary", lambda t, s: ["build-transfer-set", RECIPE, "transfer_set.top_k=60000",
                                            f"transfer_set.out={t / 'new'}"], "top_k=60000 is not below"),
    ("empty range (build)", lambda t, s: ["build-transfer-set", RECIPE, "transfer_set.start=7473",
                                          f"transfer_set.out={t / 'new'}"], "past the end"),
    ("empty range (eval)", lambda t, s: ["eval", RECIPE, "--out", str(t / "eval"), "eval.start=1319"], "past the end"),
    ("missing transfer set", lambda t, s: ["train", RECIPE, f"transfer_set.out={t / 'none'}",
                                           f"train.out={t / 'train'}"], "llmkd build-transfer-set"),
    ("corrupted transfer set", lambda t, s: (corrupt_byte(c := copy_set(s, t)) or
                                             ["train", RECIPE, *GOLD, f"transfer_set.out={c}", f"train.out={t / 'train'}"]),
     "sha256 differs"),
    ("NaN in teacher data", lambda t, s: (nan_teacher_data(c := copy_set(s, t)) or
                                          ["train", RECIPE, *GOLD, f"transfer_set.out={c}", f"train.out={t / 'train'}"]),
     "non-finite teacher log-probabilities"),
    ("transfer set of another tokenizer", lambda t, s: (other_tokenizer(c := copy_set(s, t)) or
                                                        ["train", RECIPE, *GOLD, f"transfer_set.out={c}",
                                                         f"train.out={t / 'train'}"]), "another tokenizer"),
    ("adapter for another base model", lambda t, s: ["eval", RECIPE, "--student", "--adapter", str(foreign_adapter(t)),
                                                     "--limit", "1", "--out", str(t / "eval")], "does not fit model"),
    ("hub id offline", lambda t, s: ["eval", RECIPE, "--limit", "1", "--out", str(t / "eval"),
                                     "model.name=nobody/no-such-model"], "nobody/no-such-model"),
    ("output folder with other content (build)", lambda t, s: (((t / "mine").mkdir(), (t / "mine" / "notes.txt").write_text("x"))
                                                               and ["build-transfer-set", RECIPE, *GOLD, f"transfer_set.out={t / 'mine'}"]),
     "exists and is not a transfer set"),
    ("unreadable lora.init_text", lambda t, s: ["train", RECIPE, *GOLD, f"transfer_set.out={s}", f"train.out={t / 'train'}",
                                                "train.batch_size=2", "lora.init=activations",
                                                f"lora.init_text={t / 'none.txt'}"],
     "lora.init_text: cannot read"),
    ("output folder with other content (train)", lambda t, s: (((t / "mine").mkdir(), (t / "mine" / "notes.txt").write_text("x"))
                                                               and ["train", RECIPE, *GOLD, f"transfer_set.out={s}",
                                                                    f"train.out={t / 'mine'}"]),
     "not a training run"),
]


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, argv, needle, built_set, tmp_path, capsys, monkeypatch):
    args = argv(tmp_path, built_set)
    before = snapshot(tmp_path, built_set, REPO / "runs", REPO / "transfer_sets")
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err, (case, err)
    assert snapshot(tmp_path, built_set, REPO / "runs", REPO / "transfer_sets") == before, case


def test_evaluation_killed_at_a_random_moment_reruns_to_the_same_result(tmp_path, stand_in):
    # A fresh seed per run (printed on failure): every moment of an evaluation must be safe to die in.
    # On the random stand-in: what is checked (the files a kill leaves, the re-run's bytes) is mechanics.
    cmd = [sys.executable, "-m", "llmkd", "eval", RECIPE, "--teacher", "--shots", "0", "--limit", "2"]
    settings = stand_in_overrides(stand_in, "eval.max_new_tokens=12", "eval.batch_size=2")
    run = dict(cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # The uninterrupted run here, in this process (the killed one is a subprocess): the span from its
    # folder appearing to its end, as timed_run would measure it of a subprocess but for its teardown.
    code, span = timed_call(lambda: main([*cmd[3:], "--out", str(clean), *settings]), out=clean)
    assert code == 0
    what = kill_at_random_moment([*cmd, "--out", str(killed), *settings], out=killed, span=span,
                                 seed=fault_seed(), **run)
    # Whatever exists under its own name after the kill is complete: every JSON file parses.
    left = [p for p in killed.rglob("*") if p.is_file() and not atomic.is_temporary(p)] if killed.exists() else []
    for p in left:
        text = p.read_text()
        [json.loads(line) for line in text.splitlines()] if p.suffix == ".jsonl" else json.loads(text)
    assert main([*cmd[3:], "--out", str(killed), *settings]) == 0, what  # the re-run, in this process

    def results(out: Path):
        rows = [json.loads(line) for line in (out / "teacher-0shot" / "samples.jsonl").read_text().splitlines()]
        return [(r["id"], r["output"], r["flexible"]) for r in rows]

    assert results(killed) == results(clean), what
    # ...and the re-run cleared any unfinished write: the same files as the uninterrupted run.
    assert sorted(p.relative_to(killed) for p in killed.rglob("*")) == \
        sorted(p.relative_to(clean) for p in clean.rglob("*")), what
