"""`llmkd run` (llmkd.pipeline) on the embedded model, shrunk to seconds: every stage, its outputs
where the layout says, the reuse of finished stages, and the fast paths off against on."""

import json

import pytest

from conftest import REPO
from llmkd import pipeline
from llmkd.config import load_recipe

TINY = [
    "name=tiny", "transfer_set.out=", "transfer_set.start=746", "transfer_set.count=4", "transfer_set.batch_size=4",
    "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=1", "train.warmup_steps=0",
    "eval.limit=1", "eval.batch_size=1", "eval.max_new_tokens=6", "eval.shots=[0]",
    "eval.fidelity_count=1", "eval.fidelity_start=1000",
]


def test_main_job_runs_every_stage_reuses_finished_ones_and_fast_paths_change_no_result(scratch_dir):
    said = []
    slow = load_recipe(REPO / "recipes/smollm2-cpu.yaml", [*TINY, "fast_paths=false"])
    report = pipeline.run(slow, progress=False, say=said.append)
    layout = slow.layout
    assert report == layout.report / "report.md" and report.is_file()
    assert (scratch_dir / "runs/tiny/transfer_set/manifest.json").is_file()  # all under the recipe's name
    assert (layout.adapter / "adapter_config.json").is_file() and layout.metrics.is_file()
    assert [s[:5] for s in said if s.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    summary = json.loads((layout.eval / "eval-summary.json").read_text())
    assert summary["fast_paths"]["reason"] == "fast_paths off"
    outputs = {tag: (layout.eval / f"{tag}-0shot/samples.jsonl").read_text() for tag in ("teacher", "student", "distilled")}
    steps = len(layout.metrics.read_text().splitlines())
    adapter = (layout.adapter / "adapter_model.safetensors").read_bytes()

    fast = load_recipe(REPO / "recipes/smollm2-cpu.yaml", TINY)
    said.clear()
    pipeline.run(fast, progress=False, say=said.append)
    assert any("trained 2 steps (resumed at step 2)" in s for s in said), said  # nothing trained again
    assert len(layout.metrics.read_text().splitlines()) == steps
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
