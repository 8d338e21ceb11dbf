"""`llmkd run` (llmkd.pipeline), shrunk to seconds: every stage, its outputs where the layout says, a
training that lowers the loss into an adapter plain peft loads, the reuse of finished stages, and the fast
paths off against on. All mechanics: it runs on the 2-layer random stand-in of the embedded model (its
tokenizer, its architecture), not on the real 30 layers."""

import json
import os

import pytest
import torch

from conftest import REPO, stand_in_overrides
from llmkd import pipeline
from llmkd.config import load_recipe

TINY = [
    "name=tiny", "transfer_set.out=", "transfer_set.start=746", "transfer_set.count=4", "transfer_set.batch_size=4",
    # batch 4 = the whole set: every step sees the same batch, so the loss must fall. fp32: the reload
    # below quantises with plain transformers in fp32, whatever dtype the CPU probe would pick.
    "train.batch_size=4", "train.max_steps=3", "train.checkpoint_every=1",
    "train.warmup_steps=0", "train.schedule=constant",
    # Random weights start at CE ~ ln(vocab) = 10.8: at 1e-3 two updates lower the loss by 9%, at 5e-3 by 16%
    # (monotonically), at 1e-2 and above the second update overshoots.
    "train.lr=5e-3",
    "eval.limit=1", "eval.batch_size=1", "eval.max_new_tokens=6", "eval.shots=[0]",
    "eval.fidelity_count=1", "eval.fidelity_start=1000",
    # With CE on the gold tokens: on random weights teacher and 4-bit student agree almost exactly, so a
    # KL-only loss would barely move.
    "train.loss.alpha=0.5",
]


@pytest.fixture
def tiny(stand_in):
    return stand_in_overrides(stand_in, *TINY)


def test_main_job_runs_every_stage_reuses_finished_ones_and_fast_paths_change_no_result(scratch_dir, tiny):
    said = []
    slow = load_recipe(REPO / "recipes/smollm2-cpu.yaml", [*tiny, "fast_paths=false"])
    report = pipeline.run(slow, progress=False, say=said.append)
    layout = slow.layout
    assert report == layout.report / "report.md" and report.is_file()
    assert (scratch_dir / "runs/tiny/transfer_set/manifest.json").is_file()  # all under the recipe's name
    assert (layout.adapter / "adapter_config.json").is_file() and layout.metrics.is_file()
    assert [s[:5] for s in said if s.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    summary = json.loads((layout.eval / "eval-summary.json").read_text())
    assert summary["fast_paths"]["reason"] == "fast_paths off"
    outputs = {tag: (layout.eval / f"{tag}-0shot/samples.jsonl").read_text() for tag in ("teacher", "student", "distilled")}
    curve = [json.loads(line) for line in layout.metrics.read_text().splitlines()]
    # The loss falls: by 16% on the stand-in (the real model's 20% margin is not reachable from CE ~ ln(vocab)).
    assert [m["step"] for m in curve] == [1, 2, 3] and curve[-1]["loss"] < 0.9 * curve[0]["loss"], curve
    assert sorted(p.name for p in layout.checkpoints.iterdir()) == ["step-000002", "step-000003"]
    assert_plain_peft_loads_what_llmkd_evaluates(slow)
    adapter = (layout.adapter / "adapter_model.safetensors").read_bytes()

    fast = load_recipe(REPO / "recipes/smollm2-cpu.yaml", tiny)
    said.clear()
    pipeline.run(fast, progress=False, say=said.append)
    assert any("trained 3 steps (resumed at step 3)" in s for s in said), said  # nothing trained again
    assert len(layout.metrics.read_text().splitlines()) == len(curve)
    assert (layout.adapter / "adapter_model.safetensors").read_bytes() == adapter
    again = json.loads((layout.eval / "eval-summary.json").read_text())
    # The fast paths give the same numbers: shared-prefix attention only sums in another order.
    for a, b in zip(summary["fidelity"], again["fidelity"], strict=True):
        assert a["tag"] == b["tag"] and a["tokens"] == b["tokens"]
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-5)
        assert b["top1_agreement"] == pytest.approx(a["top1_agreement"], abs=0.01)
    for tag, text in outputs.items():
        assert [json.loads(r)["output"] for r in text.splitlines()] == \
            [json.loads(r)["output"] for r in (layout.eval / f"{tag}-0shot/samples.jsonl").read_text().splitlines()]


def assert_plain_peft_loads_what_llmkd_evaluates(recipe):
    """The saved adapter, on a freshly quantised base with transformers + peft only, gives the logits of
    the student llmkd's evaluator loads, and differs from the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmkd import models

    base = AutoModelForCausalLM.from_pretrained(
        models.resolve(recipe.model.name), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    )
    plain = PeftModel.from_pretrained(base, str(recipe.layout.adapter)).eval()
    ours = models.load_student(recipe.model, recipe.layout.adapter)
    tokenizer = models.load_tokenizer(recipe.model)
    ids = tokenizer("Natalia sold clips to 48 of her friends in April.", return_tensors="pt").input_ids
    with torch.no_grad():
        again, evaluated = plain(input_ids=ids).logits, ours(input_ids=ids).logits
        with plain.disable_adapter():
            untrained = plain(input_ids=ids).logits
    assert (again - untrained).abs().max() > 0.1  # the adapter matters...
    torch.testing.assert_close(evaluated, again, rtol=0, atol=1e-4)  # ...and is what eval scores


HANDOVER_SCRIPT = """
import gc, json, sys, weakref
from llmkd import pipeline, sweep, train
from llmkd.config import load_recipe

overrides = json.loads(sys.argv[1])
students, alive = [], []
build_student = train.build_student


def tracked_student(*args, **kwargs):
    model = build_student(*args, **kwargs)
    students.append(weakref.ref(model))
    return model


def handed_over(run_eval):
    def checked(*args, **kwargs):
        alive.append([ref() is not None for ref in students])
        return run_eval(*args, **kwargs)
    return checked


train.build_student = tracked_student
pipeline.run_eval, sweep.run_eval = handed_over(pipeline.run_eval), handed_over(sweep.run_eval)
gc.disable()  # reference counting alone: a reference cycle would keep a trained student
bf16 = [*overrides, "train.mixed_precision=bf16"]
pipeline.run(load_recipe("recipes/smollm2-cpu.yaml", bf16), progress=False, say=lambda _: None)
# A point with a precision of its own, after one that trained in bf16 in the same process.
point = load_recipe("recipes/smollm2-cpu.yaml", [*bf16, "name=sweep", "sweep.point_overrides={fp4: [train.mixed_precision=no]}"])
sweep.run(point, ["nf4", "fp4"], progress=False, say=lambda _: None)
print(json.dumps(alive))
"""


def test_the_trained_student_is_freed_before_evaluation_and_sweep_points_may_change_precision(scratch_dir, tiny):
    # Under bf16 accelerate leaves the model's forward bound to the model on the model (a cycle): the
    # student (gigabytes on a GPU) stayed alive beside the teacher and the next student. accelerate's
    # state is one per process: a point with its own train.mixed_precision was refused after the first.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", HANDOVER_SCRIPT, json.dumps([*tiny, "train.max_steps=1"])],
                          cwd=scratch_dir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # run: one evaluation; sweep: the teacher's, then one per point.
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[False], [False], [False, False], [False, False, False]]
    trained = {q: json.loads((scratch_dir / f"runs/sweep-{q}/train/summary.json").read_text()) for q in ("nf4", "fp4")}
    assert [trained[q]["recipe"]["train"]["mixed_precision"] for q in ("nf4", "fp4")] == ["bf16", "no"]


def test_two_launched_processes_build_and_train_and_the_main_one_alone_evaluates(scratch_dir, tiny):
    # Before, after training (which ends the process group) every rank repeated the whole evaluation into
    # the same files, one rank's start-up clean-up deleting another's unfinished writes.
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port: other jobs on the machine may use accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "llmkd", "run", "recipes/smollm2-cpu.yaml", *tiny, "train.batch_size=2", "train.max_steps=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=scratch_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 process(es) on cpu" in out and "effective batch 2 x 1 x 2 = 4" in out, out
    assert [out.count(f"[{i}/4]") for i in range(1, 5)] == [1, 1, 1, 1], out
    assert (scratch_dir / "runs/tiny/report/report.md").is_file()
    assert json.loads((scratch_dir / "runs/tiny/eval/eval-summary.json").read_text())["fidelity"]


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_commands_of_one_process_refuse_a_launch_of_several(monkeypatch, capsys, command):
    from llmkd.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([command, "recipes/smollm2-cpu.yaml"]) == 2
    assert f"llmkd {command} runs in one process, launched here as 2 (WORLD_SIZE)" in capsys.readouterr().err


def test_main_job_on_the_shipped_chat_example_reports_held_out_fidelity_and_agreement(scratch_dir, stand_in):
    """recipes/chat-example.yaml (JSON Lines of messages rows, not GSM8K), end to end on the stand-in."""
    from test_lm_eval_tasks import write_tasks

    tasks = write_tasks(scratch_dir)  # with lm-eval tasks of the user's own beside
    recipe = load_recipe(REPO / "recipes/chat-example.yaml", stand_in_overrides(
        stand_in, "name=chat", "transfer_set.out=", "train.max_steps=2", "train.lr=5e-3", "train.loss.alpha=0.5",
        "eval.limit=3", "eval.batch_size=3", "eval.max_new_tokens=4", "eval.fidelity_count=3",
        f"eval.tasks=[{', '.join(tasks)}]"))
    report = pipeline.run(recipe, progress=False, say=lambda _: None)
    summary = json.loads((recipe.layout.eval / "eval-summary.json").read_text())
    assert [(t["tag"], t["task"]) for t in summary["tasks"]] == [
        (tag, task) for tag in ("teacher", "student", "distilled") for task in ("py_gen", "py_choice")]
    assert {(t["task"], t["a"], t["b"]) for t in summary["task_tests"]} == {
        ("py_gen", "student", "distilled"), ("py_choice", "student", "distilled")}
    assert summary["accuracy"] == [] and [g["tag"] for g in summary["generations"]] == ["teacher", "student", "distilled"]
    assert [(f["tag"], f["rendering"], f["questions"]) for f in summary["fidelity"]] == [
        ("student", "data", 3), ("distilled", "data", 3)]
    assert [g["tag"] for g in summary["agreement"]] == ["student", "distilled"]
    assert summary["data"]["source"] == "recipes/data/python-docs-chat.jsonl" and summary["data"]["format"] == "messages"
    manifest = json.loads((recipe.layout.transfer_set / "manifest.json").read_text())
    held = {json.loads(line)["question_hash"]
            for line in (recipe.layout.eval / "teacher-0shot/samples.jsonl").read_text().splitlines()}
    assert held and not held & set(manifest["question_hashes"])  # no held-out row was trained on
    text = report.read_text()
    assert "held-out rows of your data" in text and "GSM8K" not in text and "nf4 base" in text
    assert "## lm-eval tasks" in text and "| py_choice | acc,none | 3 |" in text


def test_prompt_only_data_trains_on_the_teachers_answers_and_scores_fidelity_on_them(scratch_dir, stand_in):
    rows = [{"query": f"Describe the number {i} in one word."} for i in range(24)]
    (scratch_dir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(None, stand_in_overrides(
        stand_in, "name=prompts", "data.source=prompts.jsonl", "data.columns={prompt: query}", "data.eval_fraction=0.25",
        "transfer_set.response=teacher", "transfer_set.max_new_tokens=4", "transfer_set.count=8",
        "train.max_steps=1", "train.batch_size=4", "eval.limit=2", "eval.batch_size=2", "eval.max_new_tokens=3",
        "eval.fidelity_count=2"))
    pipeline.run(recipe, progress=False, say=lambda _: None)
    summary = json.loads((recipe.layout.eval / "eval-summary.json").read_text())
    teacher = [json.loads(line) for line in (recipe.layout.eval / "teacher-0shot/samples.jsonl").read_text().splitlines()]
    assert summary["data"]["format"] == "prompt" and len(teacher) == 2
    # The teacher-forced responses are the teacher's own greedy outputs (+ the end-of-turn marker): at most 4 tokens.
    assert [f["tag"] for f in summary["fidelity"]] == ["student", "distilled"]
    assert 2 <= summary["fidelity"][0]["tokens"] <= 2 * 4
