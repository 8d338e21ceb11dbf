import json

import pytest

from llmkd.evaluate import Accuracy, EvalRun, Fidelity
from llmkd.report import mcnemar_exact, write_report


def test_mcnemar_exact_known_values():
    # 10 discordant pairs split 9/1: p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11/1024
    a = [True] * 9 + [False] + [True] * 5
    b = [False] * 9 + [True] + [True] * 5
    t = mcnemar_exact(a, b)
    assert (t["only_a"], t["only_b"]) == (9, 1) and t["p_value"] == pytest.approx(22 / 1024)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pairs
    assert mcnemar_exact([True] * 3, [False] * 3)["p_value"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def _write_samples(eval_dir, tag, shots, correct):
    folder = eval_dir / f"{tag}-{shots}shot"
    folder.mkdir(parents=True)
    rows = [{"id": f"q{i}", "strict_correct": c, "flexible_correct": c} for i, c in enumerate(correct)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _acc(tag, k, n):
    return Accuracy(tag=tag, shots=0, backend="llmkd", questions=n, strict=k / n, flexible=k / n,
                    strict_ci95=(0.0, 1.0), flexible_ci95=(0.0, 1.0), generated_tokens=1, seconds=1.0, tokens_per_s=1.0)


def test_report_marks_significance_and_writes_all_files(tmp_path):
    eval_dir = tmp_path / "eval"
    _write_samples(eval_dir, "student", 0, [False] * 20)
    _write_samples(eval_dir, "distilled", 0, [True] * 12 + [False] * 8)
    run = EvalRun(accuracy=[_acc("student", 0, 20), _acc("distilled", 12, 20)],
                  fidelity=[Fidelity("student", 10, 500, 0.27, 0.8), Fidelity("distilled", 10, 500, 0.06, 0.9)])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "kl": 1 / s}) + "\n" for s in range(1, 5)))
    report = write_report(run, eval_dir, tmp_path / "report", train_metrics=metrics)
    text = report.read_text()
    assert "student → distilled | +60.0 pts | 0 / 12 |" in text and "significant" in text
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["paired_tests"][0]["p_value"] == pytest.approx(2 / 4096)
    for png in ("loss.png", "models.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
