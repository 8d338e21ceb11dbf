import json

import pytest

from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.evaluate import format_table, run_eval, score_fidelity, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(40, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.3094, 0.4980)  # textbook value for 40/100
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_fidelity_of_a_model_to_itself_is_perfect(smol_teacher, smol_tokenizer):
    rows = select_range(load_gsm8k("test"), 1000, 2)
    f = score_fidelity(smol_teacher, smol_teacher, smol_tokenizer, rows, tag="self", progress=False)
    assert f.kl == pytest.approx(0.0, abs=1e-6) and f.top1_agreement == 1.0 and f.tokens > 100


def test_real_evaluation_of_teacher_and_student(smol_recipe, tmp_path):
    run = run_eval(smol_recipe, shots=[0, 2], tags=["teacher", "student"], with_fidelity=True,
                   out_dir=tmp_path, progress=False)
    assert [(a.tag, a.shots) for a in run.accuracy] == [("teacher", 0), ("teacher", 2), ("student", 0), ("student", 2)]
    for a in run.accuracy:
        assert a.questions == 3
        assert a.generated_tokens > 0 and a.tokens_per_s > 0
        folder = tmp_path / f"{a.tag}-{a.shots}shot"
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert [s["id"] for s in samples] == ["gsm8k-test-00000", "gsm8k-test-00001", "gsm8k-test-00002"]
        assert {"prompt", "output", "strict", "flexible", "gold", "strict_correct", "flexible_correct"} <= set(samples[0])
        assert samples[0]["gold"] == "18"
        assert a.strict == sum(s["strict_correct"] for s in samples) / 3
        assert a.flexible == sum(s["flexible_correct"] for s in samples) / 3
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["metrics"]["questions"] == 3 and summary["versions"]["torch"]
        assert summary["prompt_format"]["style"] == "chat template"
        assert len(summary["prompt_format"]["exemplar_ids"]) == a.shots
        assert samples[0]["prompt"].count("Question:") == a.shots + 1
    # The NF4 copy differs from its parent, but not wildly (measured here: KL ~0.3, agreement ~80%).
    (fid,) = run.fidelity
    assert fid.tag == "student" and fid.tokens > 100
    assert 0.05 < fid.kl < 1.0 and 0.6 < fid.top1_agreement < 0.97
    overall = json.loads((tmp_path / "eval-summary.json").read_text())
    assert len(overall["accuracy"]) == 4 and len(overall["fidelity"]) == 1
    table = format_table(run)
    assert "| teacher | 0 | 3 |" in table and "KL(teacher‖model)" in table
