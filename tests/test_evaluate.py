import json
from dataclasses import asdict

import pytest
import torch

from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.agreement import agreement_rows, answers_agree, common_prefix_length, generation_agreement, summarise_agreement
from llmkd.evaluate import Accuracy, EvalRun, format_table, run_eval
from llmkd.fidelity import fidelity_questions, score_fidelity
from llmkd.stats import mcnemar_exact, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(40, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.3094, 0.4980)  # textbook value for 40/100
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)


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


# -- generation agreement, on hand-built samples: a whitespace "tokenizer" is the reference ----------


def words(text):
    return text.split()


def sample(i, output, strict="[invalid]", flexible="[invalid]"):
    return {"id": f"q{i}", "prompt": "p", "output": output, "strict": strict, "flexible": flexible, "gold": "1"}


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2  # one output is the other's start
    assert common_prefix_length([1, 2], [2, 1]) == 0 and common_prefix_length([], [1]) == 0


def test_answers_agree_on_the_number_and_never_on_a_failed_extraction():
    assert answers_agree("18", "18") and answers_agree("$18.", "18")  # lm-eval's raw extraction
    assert not answers_agree("18", "19")
    assert not answers_agree("[invalid]", "[invalid]")


def test_identical_outputs_agree_fully():
    teacher = [sample(0, "a b c #### 5", "5", "5"), sample(1, "d e", flexible="7")]
    g = summarise_agreement("distilled", 0, agreement_rows(teacher, [dict(t) for t in teacher], words))
    assert (g.questions, g.exact_match) == (2, 1.0)
    assert g.prefix_tokens_mean == g.teacher_tokens_mean == (5 + 2) / 2 and g.prefix_tokens_median == 3.5
    assert g.strict_answer_agreement == 0.5  # question 1 has no strict answer: nothing to agree on
    assert g.flexible_answer_agreement == 1.0 and g.vs_base == {}


def test_disjoint_outputs_agree_in_nothing():
    teacher = [sample(0, "a b #### 5", "5", "5"), sample(1, "c d 6", flexible="6")]
    other = [sample(0, "x y #### 4", "4", "4"), sample(1, "z 9", flexible="9")]
    g = summarise_agreement("student", 0, agreement_rows(teacher, other, words))
    assert (g.exact_match, g.prefix_tokens_mean, g.prefix_tokens_median) == (0.0, 0.0, 0.0)
    assert (g.strict_answer_agreement, g.flexible_answer_agreement) == (0.0, 0.0)
    assert g.teacher_tokens_mean == 3.5


def test_partial_agreement_and_the_paired_test_against_the_base():
    # Four questions; by hand: distilled shares 4, 1, 0, 2 leading words with the teacher (teacher
    # lengths 4, 3, 2, 4), matches it whole once, and agrees on the flexible answer on q0, q1, q3.
    teacher = [sample(0, "a b c 5", flexible="5"), sample(1, "a b 6", flexible="6"),
               sample(2, "x 7", flexible="7"), sample(3, "p q r 8", flexible="8")]
    distilled = [sample(0, "a b c 5", flexible="5"), sample(1, "a c 6", flexible="6"),
                 sample(2, "y 3", flexible="3"), sample(3, "p q s 8", flexible="8")]
    base = [sample(i, "w 0", flexible="0") for i in range(4)]  # agrees nowhere
    base_rows = agreement_rows(teacher, base, words)
    g = summarise_agreement("distilled", 0, agreement_rows(teacher, distilled, words), base_rows)
    assert g.exact_match == 0.25
    assert g.prefix_tokens_mean == (4 + 1 + 0 + 2) / 4 and g.prefix_tokens_median == 1.5
    assert g.teacher_tokens_mean == (4 + 3 + 2 + 4) / 4
    assert (g.strict_answer_agreement, g.flexible_answer_agreement) == (0.0, 0.75)
    assert g.vs_base["flexible"] == {"only_a": 0, "only_b": 3, "p_value": pytest.approx(0.25)}
    assert g.vs_base["strict"] == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    with pytest.raises(ValueError):
        agreement_rows(teacher, distilled[:3], words)


class CharTokenizer:
    """One token per character: a tokenizer whose prefix lengths can be counted by eye."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _acc(tag, shots):
    return Accuracy(tag=tag, shots=shots, backend="llmkd", questions=2, strict=0.0, flexible=0.0,
                    strict_ci95=(0.0, 0.8), flexible_ci95=(0.0, 0.8), generated_tokens=1, seconds=1.0, tokens_per_s=1.0)


def test_generation_agreement_pairs_each_cell_with_the_teachers_and_skips_shots_without_teacher():
    cells = {("teacher", 0): ["abc 1", "de 2"], ("student", 0): ["abX 3", "zz 4"], ("distilled", 0): ["abc 1", "dX 2"],
             ("student", 2): ["q", "r"], ("distilled", 2): ["q", "r"]}  # no teacher at 2 shots
    samples = {cell: [sample(i, o, flexible=o.split()[-1]) for i, o in enumerate(outputs)] for cell, outputs in cells.items()}
    accuracy = [_acc(t, k) for t, k in cells]
    base, distilled = generation_agreement(samples, CharTokenizer())
    assert [(g.tag, g.shots) for g in (base, distilled)] == [("student", 0), ("distilled", 0)]
    assert (base.prefix_tokens_mean, distilled.prefix_tokens_mean) == ((2 + 0) / 2, (5 + 1) / 2)
    assert (base.exact_match, distilled.exact_match) == (0.0, 0.5)
    assert (base.flexible_answer_agreement, distilled.flexible_answer_agreement) == (0.0, 1.0)
    assert base.vs_base == {} and distilled.vs_base["flexible"]["only_b"] == 2
    table = format_table(EvalRun(accuracy=accuracy, agreement=[base, distilled]))
    assert "| distilled | 0 | 2 | 50.0% | 3.0 / 3 (4.5) | 0.0% | 100.0% | 1 / 0.5 |" in table


def test_fidelity_of_a_model_to_itself_is_perfect(stand_in_teacher, smol_tokenizer):
    # On the random stand-in of the embedded model (its tokenizer): identity does not depend on the weights.
    rows = select_range(load_gsm8k("test"), 1000, 2)
    (f,) = score_fidelity(stand_in_teacher, stand_in_teacher, smol_tokenizer, rows, tags=["self"], progress=False)
    assert f.kl == pytest.approx(0.0, abs=1e-6) and f.top1_agreement == 1.0 and f.tokens > 100


@pytest.fixture(scope="module")
def random_adapter(smol_teacher, tmp_path_factory):
    """A LoRA adapter with non-zero weights for the NF4 student (what training would save).

    Made on a copy of the session's 16-bit teacher rather than a freshly quantised student: the same
    base model, the same module names and shapes, so the same adapter file, without quantising again."""
    import copy

    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(smol_teacher),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stand_in_adapter(stand_in_teacher, tmp_path_factory):
    """A LoRA adapter with non-zero weights for the stand-in's 4-bit student."""
    import copy

    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("stand-in-adapter")
    torch.manual_seed(0)
    get_peft_model(copy.deepcopy(stand_in_teacher), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


def stand_in_eval_recipe(stand_in, *extra):
    from conftest import REPO, stand_in_overrides
    from llmkd.config import load_recipe

    return load_recipe(REPO / "recipes/smollm2-cpu.yaml", stand_in_overrides(
        stand_in, "eval.limit=2", "eval.batch_size=2", "eval.max_new_tokens=8", "eval.fidelity_count=2", *extra))


def test_evaluation_of_teacher_student_and_distilled(stand_in, stand_in_teacher, stand_in_adapter, smol_tokenizer,
                                                     tmp_path, monkeypatch):
    """What an evaluation writes and computes, on the random stand-in (the real model's NF4 gap: next test)."""
    from llmkd import models

    recipe = stand_in_eval_recipe(stand_in)
    real_load_teacher = models.load_teacher  # the session's teacher instead of a second copy
    monkeypatch.setattr(models, "load_teacher", lambda cfg, *a, **k: stand_in_teacher
                        if cfg == recipe.model and not (a or k) else real_load_teacher(cfg, *a, **k))
    run = run_eval(recipe, shots=[0, 2], tags=["teacher", "student", "distilled"], adapter=stand_in_adapter,
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
    # One student model serves both tags: adapter off it must score exactly as a plain 4-bit student.
    base, distilled, base_off, distilled_off = run.fidelity
    (plain,) = score_fidelity(stand_in_teacher, models.load_student(recipe.model), smol_tokenizer,
                              fidelity_questions(recipe), tags=["student"], progress=False)
    assert [(f.tag, f.rendering) for f in run.fidelity] == [
        ("student", "llmkd"), ("distilled", "llmkd"), ("student", "plain_chat"), ("distilled", "plain_chat")]
    assert base_off.tokens != base.tokens and abs(distilled_off.kl - base_off.kl) > 1e-4
    assert base.tokens == distilled.tokens == plain.tokens > 100
    assert base.kl == pytest.approx(plain.kl, rel=1e-6) and base.top1_agreement == plain.top1_agreement
    assert abs(distilled.kl - base.kl) > 1e-4  # the adapter is on for "distilled"
    overall = json.loads((tmp_path / "eval-summary.json").read_text())
    assert len(overall["accuracy"]) == 6 and len(overall["fidelity"]) == 4
    # Agreement with the teacher's greedy outputs, from the same generations: each student, each shot count.
    assert [(g.tag, g.shots) for g in run.agreement] == [("student", 0), ("student", 2), ("distilled", 0), ("distilled", 2)]
    assert overall["agreement"] == [asdict(g) for g in run.agreement]
    for g in run.agreement:
        assert g.questions == 2 and 0 <= g.exact_match <= 1 and 0 <= g.prefix_tokens_mean <= 8
        assert set(g.vs_base) == (set() if g.tag == "student" else {"strict", "flexible"})
    table = format_table(run)
    assert "| teacher | 0 | 2 |" in table and "| distilled | 2 | 2 |" in table and "KL(teacher‖model)" in table
    assert "same output as teacher" in table


def test_the_nf4_copy_of_the_embedded_model_is_near_its_teacher_but_not_equal(smol_recipe, smol_teacher,
                                                                              smol_tokenizer, random_adapter):
    """The real model's NF4 gap, in- and off-format (measured here: KL ~0.3, agreement ~80%), and an
    adapter that moves it."""
    from llmkd import models

    student = models.load_student(smol_recipe.model, adapter=random_adapter)
    questions = list(fidelity_questions(smol_recipe))[:2]
    base, distilled = score_fidelity(smol_teacher, student, smol_tokenizer, questions, tags=["student", "distilled"],
                                     progress=False)
    base_off, distilled_off = score_fidelity(smol_teacher, student, smol_tokenizer, questions,
                                             tags=["student", "distilled"], progress=False, rendering="plain_chat")
    assert 0.05 < base.kl < 1.0 and 0.6 < base.top1_agreement < 0.97 and base.tokens > 100
    assert abs(distilled.kl - base.kl) > 1e-3  # the adapter is on for "distilled"
    # Off-format: other tokens (calculator notes, no instruction), the same kind of gap.
    assert base_off.tokens != base.tokens and 0.05 < base_off.kl < 1.0 and abs(distilled_off.kl - base_off.kl) > 1e-3


def test_held_teacher_logits_give_the_same_fidelity_without_loading_the_teacher(stand_in, stand_in_teacher,
                                                                               stand_in_adapter, tmp_path, monkeypatch):
    """`llmkd sweep` scores many students on the same held-out batches: the second evaluation reads
    the teacher's logits the first one held, loads no teacher, and gets bitwise the same figures."""
    from llmkd import models
    from llmkd.fidelity import TeacherLogits

    recipe = stand_in_eval_recipe(stand_in, "eval.limit=1", "eval.max_new_tokens=2", "eval.fidelity_count=3")
    held = TeacherLogits()
    first = run_eval(recipe, shots=[0], tags=["student", "distilled"], adapter=stand_in_adapter, with_fidelity=True,
                     out_dir=tmp_path / "a", progress=False, teacher_logits=held)
    assert held.complete == {"llmkd", "plain_chat"} and held.held_bytes > 0

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its logits are held")

    monkeypatch.setattr(models, "load_teacher", no_teacher)
    again = run_eval(recipe, shots=[0], tags=["student", "distilled"], adapter=stand_in_adapter, with_fidelity=True,
                     out_dir=tmp_path / "b", progress=False, teacher_logits=held)
    assert [asdict(f) for f in again.fidelity] == [asdict(f) for f in first.fidelity]
    assert first.fidelity[0].kl != first.fidelity[1].kl  # base and distilled: the held logits serve both

    # Other questions are other batches: nothing held matches them, and without a teacher that is an error.
    other = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"fidelity_start": 1100})})
    with pytest.raises(ValueError, match="no held logits"):
        score_fidelity(None, stand_in_teacher, models.load_tokenizer(recipe.model), fidelity_questions(other),
                       tags=["student"], progress=False, teacher_logits=held)
