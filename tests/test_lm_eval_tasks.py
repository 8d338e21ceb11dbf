"""eval.tasks (llmkd.lm_eval_tasks): task YAMLs of your own run through lm-eval with llmkd's decoding and
BOS rule, per-document results, and the tests that pair models on them."""

import json

import pytest

from llmkd.errors import LlmkdError
from llmkd.lm_eval_tasks import paired_task_tests, run_tasks, task_refs, tasks_table

DOCS = [
    {"question": "What does `len('abc')` return?", "answer": "3", "choices": ["3", "abc", "None"], "label": 0},
    {"question": "Which keyword defines a function in Python?", "answer": "def", "choices": ["func", "def", "lambda"],
     "label": 1},
    {"question": "What is the type of `{}`?", "answer": "dict", "choices": ["set", "list", "dict"], "label": 2},
]


def write_tasks(folder):
    """Two tasks on the same three documents: one generated and matched, one multiple choice."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
              "doc_to_text: \"{{question}}\"\nmetadata: {version: 1.0}\n")
    (folder / "gen.yaml").write_text("task: py_gen\noutput_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
                                     "generation_kwargs:\n  until: [\"\\n\\n\"]\n  do_sample: true\n  temperature: 5.0\n"
                                     "metric_list:\n  - metric: exact_match\n" + common)
    (folder / "choice.yaml").write_text("task: py_choice\noutput_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
                                        "doc_to_target: label\nmetric_list:\n  - metric: acc\n" + common)
    return [str(folder / "gen.yaml"), str(folder / "choice.yaml")]


def test_tasks_run_with_llmkds_greedy_decoding_and_give_every_documents_result(tmp_path, stand_in_teacher, smol_tokenizer):
    from llmkd.generation import generate

    tasks = write_tasks(tmp_path)
    scores, docs = run_tasks(stand_in_teacher, smol_tokenizer, tasks, tag="teacher", batch_size=3, max_new_tokens=4,
                             limit=None)
    assert {(s.task, s.metric) for s in scores} == {("py_gen", "exact_match,none"), ("py_choice", "acc,none")}
    assert all(s.documents == 3 for s in scores)
    assert [d["doc_id"] for d in docs["py_gen"]] == [0, 1, 2] and all("acc,none" in d for d in docs["py_choice"])
    # The task asks for sampling at temperature 5: llmkd's decoding overrides it. Independently, llmkd's own
    # greedy generation on lm-eval's prompt (rendered by the chat template) gives the same outputs.
    prompts_seen = [d["prompt"] for d in docs["py_gen"]]
    assert all(p.startswith("<|im_start|>") and d["question"] in p for p, d in zip(prompts_seen, DOCS))
    mine, _ = generate(stand_in_teacher, smol_tokenizer, prompts_seen, batch_size=3, max_new_tokens=4,
                       stop_strings=["\n\n"], progress=False)
    assert [d["output"].strip() for d in docs["py_gen"]] == [c.text.strip() for c in mine]  # llmkd strips its text
    scores_again, _ = run_tasks(stand_in_teacher, smol_tokenizer, tasks, tag="teacher", batch_size=3, max_new_tokens=4,
                                limit=2)
    assert all(s.documents == 2 for s in scores_again)  # eval.task_limit
    assert "| py_choice | acc,none | 3 |" in tasks_table(scores)


def test_paired_task_tests_pair_base_and_distilled_on_the_same_documents():
    docs = {("teacher", "t"): [{"doc_id": i, "acc,none": 1.0} for i in range(4)],
            ("student", "t"): [{"doc_id": i, "acc,none": float(i == 0)} for i in range(4)],
            ("distilled", "t"): [{"doc_id": i, "acc,none": 1.0, "output": "x"} for i in range(4)]}
    (test,) = paired_task_tests(docs)
    assert (test["a"], test["b"], test["metric"], test["only_a"], test["only_b"]) == ("student", "distilled", "acc,none", 0, 3)
    assert test["b_minus_a"] == pytest.approx(0.75) and test["p_value"] == pytest.approx(0.25)


def test_a_missing_task_file_or_unknown_task_is_one_line(tmp_path, stand_in_teacher, smol_tokenizer):
    with pytest.raises(LlmkdError, match="no such task file"):
        task_refs([str(tmp_path / "nope.yaml")])
    (tmp_path / "x.yaml").write_text("dataset_path: json\n")
    with pytest.raises(LlmkdError, match="no `task:` name"):
        task_refs([str(tmp_path / "x.yaml")])
    tasks = write_tasks(tmp_path)
    with pytest.raises(LlmkdError, match="lm-eval knows no task 'py_gen_typo'"):
        run_tasks(stand_in_teacher, smol_tokenizer, ["py_gen_typo", tasks[0]], tag="teacher", batch_size=1,
                  max_new_tokens=1, limit=1)
