"""`llmkd run` (llmkd.pipeline), shrunk to seconds: every stage, its outputs where the layout says, a
training that lowers the loss into an adapter plain peft loads, the reuse of finished stages, and the fast
paths off against on. All mechanics: it runs on the 2-layer random stand-in of the embedded model (its
tokenizer, its architecture), not on the real 30 layers."""

import json

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
