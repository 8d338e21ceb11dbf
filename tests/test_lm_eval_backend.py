"""The lm-eval backend: lm-eval must show the model exactly `prompts.render_prompt(...)`.

Most tests run lm-eval end to end (task YAML → datasets → HFLM → filters → metrics) on a tiny
scripted model that needs no files: a 2-layer random Llama with a byte-level tokenizer whose greedy
continuation of any prompt is a fixed text. The last test runs both evaluator backends on the real
embedded model: the same prompts, and the same extracted answers on at least 95% of questions.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from llmkd.data import prompts  # noqa: E402
from llmkd.data.gsm8k import load_gsm8k  # noqa: E402
from llmkd.errors import LlmkdError  # noqa: E402
from llmkd.lm_eval_backend import TASK_NAME, LmEvalResult, run_lm_eval, task_config, write_task  # noqa: E402

from test_prompts import SMOLLM2_TEMPLATE  # noqa: E402  (it adds a default system turn)
# What the scripted model writes after any prompt: a strict answer (12), a different last number
# (7) for the flexible filter, then a stop string whose tail lm-eval must cut off.
SCRIPT = "6 + 6 = 12\n#### 12\nor 7 Question: never shown"
SCRIPT_OUTPUT = "6 + 6 = 12\n#### 12\nor 7 "


def _byte_tokenizer(chat_template=None):
    """Byte-level BPE without merges: every string round-trips, so the scripted text decodes exactly."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=chat_template,
    )


class _ScriptedLlama(LlamaForCausalLM):
    """A random tiny Llama whose greedy continuation of every prompt is `script_ids`, then EOS."""

    script_ids: list[int] = []

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:  # the prefill of a new generate() call
            self._step = 0
        ids = self.script_ids
        token = ids[self._step] if self._step < len(ids) else self.config.eos_token_id
        self._step += 1
        forced = torch.full_like(out.logits, -1e4)
        forced[:, -1, token] = 0.0  # (B, T, V): only the last position is sampled
        out.logits = forced
        return out


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _byte_tokenizer(SMOLLM2_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return _byte_tokenizer(None)


@pytest.fixture(scope="module")
def scripted_model(chat_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    model = _ScriptedLlama(config)
    model.script_ids = chat_tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]
    return model


@pytest.fixture(scope="module")
def questions():
    return [dict(r) for r in load_gsm8k("test")[:3]]


@pytest.fixture(scope="module")
def train_rows():
    return [dict(r) for r in load_gsm8k("train")[:5]]


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_lm_eval_prompt_is_render_prompt(
    chat, shots, chat_tokenizer, plain_tokenizer, scripted_model, questions, train_rows, tmp_path
):
    tokenizer = chat_tokenizer if chat else plain_tokenizer
    exemplars = train_rows[3:3 + shots]  # not the first rows: lm-eval must take these, in this order
    result = run_lm_eval(scripted_model, tokenizer, questions, exemplars, batch_size=2,
                         max_new_tokens=64, workdir=tmp_path)

    assert isinstance(result, LmEvalResult)
    assert [s["id"] for s in result.samples] == [q["id"] for q in questions]
    for s, q in zip(result.samples, questions):
        assert s["prompt"] == prompts.render_prompt(tokenizer, q["question"], exemplars)
        assert s["output"] == SCRIPT_OUTPUT
        assert (s["strict"], s["flexible"]) == ("12", "7")


def test_scores_are_lm_evals_gsm8k_metric(chat_tokenizer, scripted_model, tmp_path):
    # Gold 12: the strict answer (12) is right, the flexible one (7, the last number) is wrong.
    question = {"id": 12, "question": "What is 6 + 6?", "answer": "6 + 6 = <<6+6=12>>12\n#### 12"}
    result = run_lm_eval(scripted_model, chat_tokenizer, [question], [], batch_size=1,
                         max_new_tokens=64, workdir=tmp_path)
    assert result.samples[0]["id"] == 12  # as given, not lm-eval's string copy
    assert result.metrics["strict_match"] == 1.0
    assert result.metrics["flexible_extract"] == 0.0
    assert result.lm_eval_version


def test_leaves_rng_and_train_mode_alone(chat_tokenizer, scripted_model, questions, tmp_path):
    # lm-eval reseeds random/numpy/torch and draws from `random`: a mid-training eval must not.
    scripted_model.train()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    run_lm_eval(scripted_model, chat_tokenizer, questions[:1], [], batch_size=1, max_new_tokens=8,
                workdir=tmp_path)
    assert scripted_model.training
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_quiet_hides_lm_eval_noise(chat_tokenizer, scripted_model, questions, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's `git describe` would print "fatal: ..."
    run_lm_eval(scripted_model, chat_tokenizer, questions[:1], [], batch_size=1, max_new_tokens=4,
                workdir=tmp_path)
    err = capfd.readouterr().err
    assert "fatal:" not in err
    assert "pretrained" not in err  # lm-eval's WARNING about a model object
    assert "Generating test split" not in err


def test_task_files(questions, train_rows, tmp_path):
    exemplars = train_rows[:2]
    path = write_task(tmp_path / "task", questions, exemplars, chat=True, max_new_tokens=48)
    config = yaml.safe_load(path.read_text())
    assert config["task"] == TASK_NAME
    assert config["fewshot_config"] == {"sampler": "first_n"}
    assert config["num_fewshot"] == 2
    assert "gen_prefix" not in config  # a chat gen_prefix would prefill the assistant turn
    assert config["generation_kwargs"]["until"] == list(prompts.STOP_STRINGS)
    assert config["generation_kwargs"]["max_gen_toks"] == 48

    def rows(name):
        return [json.loads(line) for line in (tmp_path / "task" / name).read_text().splitlines()]

    assert [r["user_turn"] for r in rows("test.jsonl")] == [
        prompts.user_turn(q["question"]) for q in questions
    ]
    assert [r["assistant_turn"] for r in rows("fewshot.jsonl")] == [
        prompts.assistant_turn(e["answer"]) for e in exemplars
    ]

    plain_yaml = write_task(tmp_path / "task", questions, [], chat=False, max_new_tokens=48)
    plain = yaml.safe_load(plain_yaml.read_text())
    assert plain["gen_prefix"] == "Answer:" and plain["target_delimiter"] == "\n\n"
    assert "fewshot_split" not in plain and not (tmp_path / "task" / "fewshot.jsonl").exists()


def test_filters_and_metric_are_lm_evals_gsm8k():
    import lm_eval

    shipped = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    ours = task_config(chat=True, num_fewshot=0, max_new_tokens=8, data_files={}, cache_dir="")
    assert ours["filter_list"] == shipped["filter_list"]
    assert ours["metric_list"] == shipped["metric_list"]
    assert {k: ours["generation_kwargs"][k] for k in ("do_sample", "temperature")} == {
        k: shipped["generation_kwargs"][k] for k in ("do_sample", "temperature")
    }


@pytest.mark.parametrize(
    "questions_, exemplars_, match",
    [
        ([], [], "no questions"),
        ([{"question": "q", "answer": "#### 1"}], [], r"questions\[0\] lacks id"),
        ([{"id": 1, "question": "q", "answer": "#### 1"}] * 2, [], "not unique"),
        ([{"id": 1, "question": "q", "answer": "#### 1"}], [{"question": "q"}],
         r"exemplars\[0\] lacks answer"),
    ],
)
def test_rejects_bad_rows(questions_, exemplars_, match, chat_tokenizer, tmp_path):
    with pytest.raises(LlmkdError, match=match):
        run_lm_eval(None, chat_tokenizer, questions_, exemplars_, batch_size=1, max_new_tokens=8,
                    workdir=tmp_path)


# -- the real embedded model: both backends, same prompts, same answers --------------------------


def test_both_backends_show_the_same_prompt_and_extract_the_same_answers(smol_recipe, smol_teacher, smol_tokenizer,
                                                                        tmp_path):
    from llmkd.data.answer import normalize_number
    from llmkd.evaluate import exemplars as pick_exemplars, score_accuracy
    from llmkd.data.gsm8k import load_gsm8k, select_range

    rows = select_range(load_gsm8k("test"), 0, 4)
    ex = pick_exemplars(smol_recipe, 2)
    recipe = smol_recipe.model_copy(update={"eval": smol_recipe.eval.model_copy(update={"batch_size": 4, "max_new_tokens": 32})})
    ours = score_accuracy(smol_teacher, smol_tokenizer, rows, ex, tag="ours", recipe=recipe, out_dir=tmp_path,
                          progress=False)
    theirs = score_accuracy(smol_teacher, smol_tokenizer, rows, ex, tag="lm", recipe=recipe, out_dir=tmp_path,
                            backend="lm-eval", progress=False)
    assert (ours.backend, theirs.backend, theirs.questions) == ("llmkd", "lm-eval", 4)
    read = lambda tag: [json.loads(x) for x in (tmp_path / f"{tag}-2shot" / "samples.jsonl").read_text().splitlines()]
    a, b = read("ours"), read("lm")
    assert [x["prompt"] for x in a] == [x["prompt"] for x in b]
    assert a[0]["prompt"] == prompts.render_prompt(smol_tokenizer, rows[0]["question"], ex)
    # lm-eval's flexible filter on its output vs ours on our output: the same answer on >= 95%.
    same = sum(x["flexible"] == (normalize_number(y["flexible"]) or "[invalid]") for x, y in zip(a, b))
    assert same / len(a) >= 0.95, (same, [(x["flexible"], y["flexible"]) for x, y in zip(a, b)])
    # One answer per backend: the table's figure and the per-question verdicts the paired tests read
    # are both the harness's; llmkd's own filters are kept beside them.
    for filt in ("strict", "flexible"):
        assert getattr(theirs, filt) == sum(y[f"{filt}_correct"] for y in b) / len(b)
        assert all(isinstance(y[f"llmkd_{filt}_correct"], bool) for y in b)


@pytest.mark.parametrize("template", [None, "llama3-like"], ids=["plain", "chat writes BOS"])
def test_lm_eval_feeds_the_same_token_ids_as_llmkd(template):
    """The harness's tokenization of a prompt equals `prompts.encode`, BOS included (issue: a tokenizer
    that adds BOS got it from lm-eval and not from llmkd)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_prompts import LLAMA3_LIKE_TEMPLATE, bos_tokenizer

    tok = bos_tokenizer(LLAMA3_LIKE_TEMPLATE if template else None)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, add_bos_token=prompts.adds_bos(tok))
    text = prompts.render_prompt(tok, "2+2?")
    assert lm.tok_encode(text) == prompts.encode(tok, text)
    batch, _ = lm.tok_batch_encode([text])
    assert batch[0].tolist() == prompts.encode(tok, text)
