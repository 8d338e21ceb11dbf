import json

import pytest

from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.evaluate import fidelity_questions, format_table, run_eval, score_fidelity, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(40, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.3094, 0.4980)  # textbook value for 40/100
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_fidelity_of_a_model_to_itself_is_perfect(smol_teacher, smol_tokenizer):
    rows = select_range(load_gsm8k("test"), 1000, 2)
    (f,) = score_fidelity(smol_teacher, smol_teacher, smol_tokenizer, rows, tags=["self"], progress=False)
    assert f.kl == pytest.approx(0.0, abs=1e-6) and f.top1_agreement == 1.0 and f.tokens > 100


@pytest.fixture(scope="module")
def random_adapter(smol_recipe, tmp_path_factory):
    """A LoRA adapter with non-zero weights for the NF4 student (what training would save)."""
    from peft import LoraConfig, get_peft_model

    from llmkd import models

    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(models.load_student(smol_recipe.model),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path)
    return path


def test_real_evaluation_of_teacher_student_and_distilled(smol_recipe, smol_teacher, smol_student, smol_tokenizer,
                                                          random_adapter, tmp_path):
    short = smol_recipe.model_copy(update={"eval": smol_recipe.eval.model_copy(update={"max_new_tokens": 16,
                                                                                     "fidelity_count": 2})})
    run = run_eval(short, shots=[0, 2], tags=["teacher", "student", "distilled"], adapter=random_adapter, limit=2,
                   with_fidelity=True, out_dir=tmp_path, progress=False)
    assert [(a.tag, a.shots) for a in run.accuracy] == [
        ("teacher", 0), ("teacher", 2), ("student", 0), ("student", 2), ("distilled", 0), ("distilled", 2)]
    for a in run.accuracy:
        assert a.questions == 2
        assert a.generated_tokens > 0 and a.tokens_per_s > 0
        folder = tmp_path / f"{a.tag}-{a.shots}shot"
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert [s["id"] for s in samples] == ["gsm8k-test-00000", "gsm8k-test-00001"]
        assert {"prompt", "output", "strict", "flexible", "gold", "strict_correct", "flexible_correct"} <= set(samples[0])
        assert samples[0]["gold"] == "18"
        assert a.strict == sum(s["strict_correct"] for s in samples) / 2
        assert a.flexible == sum(s["flexible_correct"] for s in samples) / 2
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["metrics"]["questions"] == 2 and summary["versions"]["torch"]
        assert summary["prompt_format"]["style"] == "chat template"
        assert len(summary["prompt_format"]["exemplar_ids"]) == a.shots
        decoding = summary["decoding"]  # what ran, whatever the checkpoint's generation_config says
        assert decoding["do_sample"] is False and decoding["repetition_penalty"] == 1.0
        assert decoding["checkpoint_generation_config"] == "ignored"
        assert samples[0]["prompt"].count("Question:") == a.shots + 1
    # One student model serves both tags: adapter off it must score exactly as a plain NF4 student,
    # and the NF4 copy differs from its parent, but not wildly (measured here: KL ~0.3, agreement ~80%).
    base, distilled = run.fidelity
    (plain,) = score_fidelity(smol_teacher, smol_student, smol_tokenizer, fidelity_questions(short),
                              tags=["student"], progress=False)
    assert (base.tag, distilled.tag) == ("student", "distilled")
    assert base.tokens == distilled.tokens == plain.tokens > 100
    assert base.kl == pytest.approx(plain.kl, rel=1e-6) and base.top1_agreement == plain.top1_agreement
    assert 0.05 < base.kl < 1.0 and 0.6 < base.top1_agreement < 0.97
    assert abs(distilled.kl - base.kl) > 1e-3  # the adapter is on for "distilled"
    overall = json.loads((tmp_path / "eval-summary.json").read_text())
    assert len(overall["accuracy"]) == 6 and len(overall["fidelity"]) == 2
    table = format_table(run)
    assert "| teacher | 0 | 2 |" in table and "| distilled | 2 | 2 |" in table and "KL(teacher‖model)" in table
