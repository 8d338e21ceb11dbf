"""On-policy rounds (`train.on_policy`, llmkd/on_policy.py) on the 2-layer random stand-in: what a round
holds against references written with plain transformers, which source each step takes, and a run
killed around a round resuming to the uninterrupted one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import stand_in_overrides
from llmkd import checkpoint, models, train
from llmkd.config import load_recipe
from llmkd.errors import LlmkdError
from llmkd.transfer_set import Examples, TransferSet

REPO = Path(__file__).resolve().parents[1]
# 4 steps of batch 2 over the stand-in set's 4 questions; rounds before steps 0 and 2. CE on the gold (or
# sampled) tokens: on random weights teacher and 4-bit student agree almost exactly, so KL alone hardly moves.
BASE = ["lora.init=default", "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=1",
        "train.warmup_steps=1", "train.loss.alpha=0.5", "train.on_policy.rounds=2", "train.on_policy.questions=3",
        "train.on_policy.max_new_tokens=6", "train.on_policy.batch_size=2"]


def recipe_of(stand_in, stand_in_transfer_set, out, *extra):
    return load_recipe(REPO / "recipes/smollm2-cpu.yaml", stand_in_overrides(
        stand_in, f"transfer_set.out={stand_in_transfer_set}", f"train.out={out}", *BASE, *extra))


def records(recipe) -> list[dict]:
    return [json.loads((recipe.layout.on_policy / f"round-{r:03d}.json").read_text()) for r in range(2)]


def round_rows(recipe, r: int) -> list[dict]:
    ts = recipe.transfer_set  # the rounds are stored as the transfer set is
    return list(Examples.read([recipe.layout.on_policy / f"round-{r:03d}.safetensors"], ts.top_k, ts.encoding))


def sources(recipe) -> list[str]:
    return [json.loads(line)["source"] for line in recipe.layout.metrics.read_text().splitlines()]


def adapter(recipe) -> dict:
    return load_file(str(recipe.layout.adapter / "adapter_model.safetensors"))


def test_a_round_holds_the_students_answers_scored_by_the_teacher(stand_in, stand_in_transfer_set, stand_in_teacher,
                                                                  tmp_path):
    recipe = recipe_of(stand_in, stand_in_transfer_set, tmp_path / "run", "train.on_policy.fraction=1",
                       "train.on_policy.do_sample=false")
    train.train(recipe, progress=False)
    made = records(recipe)
    assert [r["step"] for r in made] == [0, 2] and [r["examples"] for r in made] == [3, 3]
    assert sources(recipe) == ["on_policy"] * 4  # fraction 1: every step from the newest round
    summary = json.loads(recipe.layout.train_summary.read_text())
    assert [r["sha256"] for r in summary["on_policy"]] == [r["sha256"] for r in made]
    assert made[0]["decoding"]["do_sample"] is False and made[0]["decoding"]["max_new_tokens"] == 6

    cached = {r["id"]: r for r in TransferSet.open(stand_in_transfer_set).examples()}
    rows = round_rows(recipe, 0)
    # Round 0 comes before any update and the LoRA starts as a no-op: its greedy answers are the 4-bit
    # base's, here by plain argmax over full forwards, one prompt at a time (train mode: bitsandbytes'
    # dequantize-and-matmul on every CPU; LoRA dropout is 0).
    base = models.load_quantized(recipe.model, {"": "cpu"})
    base.train()
    for row in rows:
        start = row["response_start"]
        prompt = cached[row["id"]]["input_ids"][: cached[row["id"]]["response_start"]].tolist()
        assert row["input_ids"][:start].tolist() == prompt  # the transfer set's own prompt, in its rendering
        answer, ids = row["input_ids"][start:].tolist(), list(prompt)
        with torch.no_grad():
            for _ in range(len(answer)):
                ids.append(int(base(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert 1 <= len(answer) <= 6 and answer == ids[len(prompt):]

    # The teacher's targets: top-32 of its log-softmax at the positions predicting each answer token,
    # each probability's square root stored to within a byte's step (compact, as the transfer set).
    for row in round_rows(recipe, 1):
        start = row["response_start"]
        with torch.no_grad():
            logits = stand_in_teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0, start - 1 : -1]
        reference = logits.double().log_softmax(-1)
        ids = torch.tensor(row["topk_ids"]).long()
        assert ids.shape == (len(row["input_ids"]) - start, 32)
        assert torch.equal(ids.sort(-1).values, reference.topk(32, -1).indices.sort(-1).values)
        stored = torch.tensor(row["topk_logprobs"]).double()
        assert torch.allclose(stored.exp().sqrt(), reference.gather(-1, ids).exp().sqrt(), atol=1.5 / 255)
        tail = torch.log1p(-reference.gather(-1, ids).exp().sum(-1))
        assert torch.allclose(torch.tensor(row["tail_logmass"]).double(), tail, atol=1e-2)


def test_fraction_zero_trains_exactly_as_without_rounds(stand_in, stand_in_transfer_set, tmp_path):
    # LoRA dropout on, answers sampled: the rounds' sampling must not shift dropout's random stream.
    two = ["lora.dropout=0.1", "train.max_steps=2"]  # rounds before steps 0 and 1
    plain = recipe_of(stand_in, stand_in_transfer_set, tmp_path / "plain", "train.on_policy.rounds=0", *two)
    rounds = recipe_of(stand_in, stand_in_transfer_set, tmp_path / "rounds", "train.on_policy.fraction=0", *two)
    train.train(plain, progress=False)
    train.train(rounds, progress=False)
    assert sources(rounds) == ["transfer_set"] * 2 and len(records(rounds)) == 2
    assert not plain.layout.on_policy.exists()
    a, b = adapter(plain), adapter(rounds)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_reuses_a_finished_round_remakes_a_cut_one_and_refuses_a_lost_one(
        stand_in, stand_in_transfer_set, tmp_path, monkeypatch):
    def run(name: str, *, killed_at: int | None = None, resume: bool = False):
        recipe = recipe_of(stand_in, stand_in_transfer_set, tmp_path / name, "train.on_policy.fraction=0.5",
                           "lora.dropout=0.1")
        save = train.save_checkpoint

        def save_or_die(s, step):  # killed just before step `killed_at`'s checkpoint
            if step == killed_at:
                raise RuntimeError("killed")
            return save(s, step)

        monkeypatch.setattr(train, "save_checkpoint", save_or_die)
        try:
            train.train(recipe, resume=resume, progress=False)
        except RuntimeError as e:
            assert str(e) == "killed"
        finally:
            monkeypatch.setattr(train, "save_checkpoint", save)
        return recipe

    whole = run("whole")
    made = records(whole)
    assert "on_policy" in sources(whole)[2:] and "transfer_set" in sources(whole)  # both sources after round 1

    def same_adapter(recipe) -> bool:
        a, b = adapter(whole), adapter(recipe)
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Killed before step 4's checkpoint (round 1, made before step 2's update, finished), and round 1's
    # record lost: from step 3's checkpoint the student of step 2 is gone, so it is refused; from step 2's,
    # the round is made again, the same bytes.
    run("cut", killed_at=4)
    cut = recipe_of(stand_in, stand_in_transfer_set, tmp_path / "cut")
    (cut.layout.on_policy / "round-001.json").unlink()
    with pytest.raises(LlmkdError, match="round-001.json: missing or not matching"):
        run("cut", resume=True)
    shutil.rmtree(cut.layout.checkpoints / checkpoint.name(3))
    run("cut", resume=True)
    assert records(cut)[1]["sha256"] == made[1]["sha256"] and same_adapter(cut)
    # Killed before the last checkpoint: resumed at step 3, the finished round 1 is reused.
    shutil.rmtree(cut.layout.checkpoints / checkpoint.name(4))
    shutil.rmtree(cut.layout.adapter)
    run("cut", resume=True)
    summary = json.loads(cut.layout.train_summary.read_text())
    assert [(r["round"], r["reused"]) for r in summary["on_policy"]] == [(1, True)]
    assert same_adapter(cut)


def test_more_rounds_than_steps_or_several_processes_are_refused(stand_in, stand_in_transfer_set, tmp_path):
    from llmkd import on_policy

    recipe = recipe_of(stand_in, stand_in_transfer_set, tmp_path / "run", "train.on_policy.rounds=5")
    with pytest.raises(LlmkdError, match="train.on_policy.rounds 5 is more than the run's 4 steps"):
        train.train(recipe, progress=False)
    data = train.TrainingData.open(recipe, models.load_tokenizer(recipe.model))
    with pytest.raises(LlmkdError, match="needs one process"):
        on_policy.Rounds.for_run(recipe, recipe.layout, data, None, 4, 2, resumed=False)
    assert on_policy.round_steps(93, 3) == [0, 31, 62]


def test_the_dry_run_lists_a_rounds_memory(capsys):
    from llmkd.cli import main

    assert main(["train", "recipes/gsm8k.yaml", "train.on_policy.rounds=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train.on_policy: 2 round(s) of 32 responses" in out
    assert "the teacher's weights (14.96 GiB)" in out  # 8,030,261,248 parameters in bf16
