import json
from pathlib import Path

import pytest

from llmkd.agreement import GenerationAgreement
from llmkd.evaluate import Accuracy, EvalRun
from llmkd.fidelity import Fidelity
from llmkd.report import write_report


def _samples(correct):
    return [{"id": f"q{i}", "strict_correct": c, "flexible_correct": c} for i, c in enumerate(correct)]


def _acc(tag, k, n):
    return Accuracy(tag=tag, shots=0, backend="llmkd", questions=n, strict=k / n, flexible=k / n,
                    strict_ci95=(0.0, 1.0), flexible_ci95=(0.0, 1.0), generated_tokens=1, seconds=1.0, tokens_per_s=1.0)


def _agreement(tag, exact, flexible, vs_base=None):
    return GenerationAgreement(tag=tag, shots=0, questions=20, exact_match=exact, prefix_tokens_mean=12.5,
                               prefix_tokens_median=9.0, teacher_tokens_mean=40.0, strict_answer_agreement=0.1,
                               flexible_answer_agreement=flexible, vs_base=vs_base or {})


FIDELITY = [Fidelity("student", 10, 500, 0.27, 0.8), Fidelity("distilled", 10, 500, 0.06, 0.9),
            Fidelity("student", 10, 520, 0.29, 0.79, "plain_chat"), Fidelity("distilled", 10, 520, 0.12, 0.87, "plain_chat")]
AGREEMENT = [_agreement("student", 0.05, 0.2),
             _agreement("distilled", 0.35, 0.6, {"strict": {"only_a": 1, "only_b": 1, "p_value": 1.0},
                                                 "flexible": {"only_a": 0, "only_b": 8, "p_value": 2 / 256}})]


def _metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "ce": 2.0, "kl": 0.1 / s}) + "\n"
                               for s in range(1, 5)))
    return metrics


def test_report_leads_with_fidelity_and_agreement_and_writes_all_files(tmp_path):
    run = EvalRun(accuracy=[_acc("student", 0, 20), _acc("distilled", 12, 20)], fidelity=FIDELITY, agreement=AGREEMENT,
                  samples={("student", 0): _samples([False] * 20), ("distilled", 0): _samples([True] * 12 + [False] * 8)})
    report = write_report(run, tmp_path / "report", train_metrics=_metrics(tmp_path))
    text = report.read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert [s.split(" (")[0] for s in sections] == ["## Fidelity to the teacher", "## Generation agreement with the teacher",
                                                   "## GSM8K accuracy"]
    assert "| distilled | in-format (llmkd's prompt) | 500 | 0.0600 | 90.0% |" in text
    assert "| distilled | off-format (bare question, answer as shipped) | 520 | 0.1200 | 87.0% |" in text
    # gap closed, by hand: 1 - 0.06 / 0.27 = 77.8%, 1 - 0.12 / 0.29 = 58.6%
    assert "| in-format (llmkd's prompt) | 0.2700 | 0.0600 | 77.8% | 80.0% → 90.0% |" in text
    assert "| off-format (bare question, answer as shipped) | 0.2900 | 0.1200 | 58.6% | 79.0% → 87.0% |" in text
    assert "| distilled | 0 | 20 | 35.0% | 12.5 / 9 (40.0) | 10.0% | 60.0% | 1 / 0.00781 |" in text
    assert "| 0 | flexible | student → distilled | +40.0 pts | 0 / 8 | 0.00781 | significant |" in text
    assert "student → distilled | +60.0 pts | 0 / 12 |" in text  # accuracy, paired
    assert "0% under both filters" not in text
    assert "](loss.png)" in text and "](models.png)" in text
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["paired_tests"][0]["p_value"] == pytest.approx(2 / 4096)
    assert [g["tag"] for g in data["agreement"]] == ["student", "distilled"]
    assert data["agreement"][1]["vs_base"]["flexible"]["only_b"] == 8
    assert data["agreement_tests"][1]["b_minus_a"] == pytest.approx(0.4) and data["accuracy_at_floor"] is False
    for png in ("loss.png", "models.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_accuracy_at_the_floor_is_a_table_not_empty_bars(tmp_path, monkeypatch):
    from llmkd import report as report_module

    tags = ("teacher", "student", "distilled")
    run = EvalRun(accuracy=[_acc(t, 0, 20) for t in tags], fidelity=FIDELITY, agreement=AGREEMENT,
                  samples={(t, 0): _samples([False] * 20) for t in tags})
    drawn = []
    monkeypatch.setattr(report_module, "_accuracy_panel", lambda ax, run: drawn.append(run))
    text = write_report(run, tmp_path / "report").read_text()
    assert "Every model scores 0% under both filters" in text
    assert "| teacher | 0 | 20 | 0.0% [0.0, 100.0] |" in text  # the accuracy table is still there
    assert drawn == [] and (tmp_path / "report" / "models.png").exists()  # no accuracy bars in the figure
    assert not (tmp_path / "report" / "loss.png").exists() and "loss.png" not in text  # no metrics given
    assert json.loads((tmp_path / "report" / "report.json").read_text())["accuracy_at_floor"] is True


def test_figures_give_each_loss_part_an_axis_and_write_values_and_the_teacher_reference(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, path, **kw):
        saved[Path(path).name] = fig
        return original(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    write_report(EvalRun(fidelity=FIDELITY, agreement=AGREEMENT), tmp_path / "report",
                 train_metrics=_metrics(tmp_path))
    loss = saved["loss.png"]
    assert [ax.get_title() for ax in loss.axes] == ["loss", "kl", "ce"]  # each part on its own scale
    assert all(len(ax.lines) == 1 and ax.get_legend() is None for ax in loss.axes)  # no legend over a curve
    kl, top1, agreement, prefix = saved["models.png"].axes
    assert {"0.270", "0.060", "teacher = 0"} <= {t.get_text() for t in kl.texts}  # values on the bars
    assert {"80.0", "90.0", "teacher = 100%"} <= {t.get_text() for t in top1.texts}
    assert {"35.0", "60.0", "teacher = 100%"} <= {t.get_text() for t in agreement.texts}
    assert {"12.5", "teacher 40"} <= {t.get_text() for t in prefix.texts}
