import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmkd.data.answer import extract_strict
from llmkd.data import prompts
from llmkd.errors import LlmkdError
from llmkd.data.prompts import (
    INSTRUCTION,
    STOP_STRINGS,
    assistant_turn,
    build_messages,
    has_chat_template,
    render_plain,
    render_prompt,
    render_response,
    select_exemplars,
    teacher_forced_batch,
    user_turn,
)

# SmolLM2-Instruct's chat template, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)


def _tiny_tokenizer(chat_template=None):
    """A word-level tokenizer: rendering text through a chat template needs no real vocabulary."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def chat_tokenizer():
    return _tiny_tokenizer(SMOLLM2_TEMPLATE)


@pytest.fixture
def plain_tokenizer():
    return _tiny_tokenizer()


# select_exemplars


def test_select_exemplars_deterministic_per_seed(train):
    first = select_exemplars(train, 8, seed=1234)
    assert first == select_exemplars(train, 8, seed=1234)
    # Pinned: a change here silently changes every k-shot prompt (and every stored transfer set).
    assert [ex["index"] for ex in first] == [6374, 3610, 957, 61, 742, 7462, 6610, 4769]


def test_select_exemplars_differs_across_seeds(train):
    picks = {tuple(ex["index"] for ex in select_exemplars(train, 8, seed)) for seed in range(5)}
    assert len(picks) == 5


def test_select_exemplars_shapes():
    pool = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
    assert select_exemplars(pool, 0, seed=0) == []
    everything = select_exemplars(pool, 3, seed=0)
    assert sorted(ex["question"] for ex in everything) == ["q0", "q1", "q2"]  # no repeats


def test_select_exemplars_errors():
    pool = [{"question": "q", "answer": "#### 1"}] * 3
    with pytest.raises(LlmkdError, match="only 3"):
        select_exemplars(pool, 4, seed=0)
    with pytest.raises(LlmkdError, match=">= 0"):
        select_exemplars(pool, -1, seed=0)


# turns and messages


def test_assistant_turn_strips_calculator_notes(train):
    assert assistant_turn(train[0]["answer"]) == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "#### 72"
    )
    for answer in (r["answer"] for r in train):
        turn = assistant_turn(answer)
        assert "<<" not in turn and ">>" not in turn
        assert turn.splitlines()[-1] == answer.splitlines()[-1]  # the "#### N" line is kept


def test_user_turn():
    assert user_turn("  How many?\n") == f"{INSTRUCTION}\n\nQuestion: How many?"


def test_build_messages_zero_shot():
    assert build_messages("How many?") == [{"role": "user", "content": user_turn("How many?")}]


def test_build_messages_eight_shots(train, test_split):
    exemplars = select_exemplars(train, 8, seed=0)
    question = test_split[0]["question"]
    messages = build_messages(question, exemplars)
    assert len(messages) == 17
    assert [m["role"] for m in messages] == ["user", "assistant"] * 8 + ["user"]
    assert messages[-1]["content"] == user_turn(question)
    for ex, user, assistant in zip(exemplars, messages[0::2], messages[1::2]):
        assert user["content"] == user_turn(ex["question"])
        assert user["content"].startswith(INSTRUCTION)  # every user turn asks the same thing
        assert assistant["content"] == assistant_turn(ex["answer"])
        assert extract_strict(assistant["content"]) == ex["gold"]


# rendering


def test_render_prompt_chat_zero_shot(chat_tokenizer):
    assert has_chat_template(chat_tokenizer)
    prompt = render_prompt(chat_tokenizer, "How many?")
    assert prompt == (
        SMOLLM2_SYSTEM
        + f"<|im_start|>user\n{INSTRUCTION}\n\nQuestion: How many?<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )


def test_render_prompt_chat_eight_shots(chat_tokenizer, train, test_split):
    exemplars = select_exemplars(train, 8, seed=0)
    prompt = render_prompt(chat_tokenizer, test_split[0]["question"], exemplars)
    assert prompt.startswith(SMOLLM2_SYSTEM)
    assert prompt.count("<|im_start|>user\n") == 9
    assert prompt.count("<|im_start|>assistant\n") == 9  # 8 exemplar answers + the open turn
    question = test_split[0]["question"].strip()
    assert prompt.endswith(f"Question: {question}<|im_end|>\n<|im_start|>assistant\n")
    assert "<<" not in prompt


@pytest.mark.parametrize("shots", [0, 8])
def test_render_response_chat(chat_tokenizer, train, test_split, shots):
    exemplars = select_exemplars(train, shots, seed=0)
    question, response = test_split[3]["question"], assistant_turn(test_split[3]["answer"])
    prompt = render_prompt(chat_tokenizer, question, exemplars)
    completion = render_response(chat_tokenizer, question, response, exemplars)
    full = chat_tokenizer.apply_chat_template(
        build_messages(question, exemplars) + [{"role": "assistant", "content": response}],
        tokenize=False,
    )
    # The full rendering, minus the whitespace the template puts after the final end-of-turn.
    assert prompt + completion == full.rstrip() and full.endswith("<|im_end|>\n")
    assert completion == response + "<|im_end|>"  # ends at the marker: the model learns to stop
    assert "<|im_end|>" in STOP_STRINGS


def test_render_response_rejects_template_that_does_not_extend_prompt():
    # The generation prompt opens a thinking block that the rendered assistant turn lacks.
    template = SMOLLM2_TEMPLATE.replace(
        "'<|im_start|>assistant\n' }}", "'<|im_start|>assistant\n<think>\n' }}"
    )
    with pytest.raises(ValueError, match="does not extend the prompt"):
        render_response(_tiny_tokenizer(template), "How many?", "#### 3")


def test_render_plain(plain_tokenizer):
    assert not has_chat_template(plain_tokenizer)
    exemplar = {"question": "How many legs?", "answer": "2 * 2 = <<2*2=4>>4\n#### 4"}
    prompt = render_prompt(plain_tokenizer, " How many? ", [exemplar])
    assert prompt == (
        f"{INSTRUCTION}\n\nQuestion: How many legs?\n\n"
        "Answer: 2 * 2 = 4\n#### 4\n\n"
        f"{INSTRUCTION}\n\nQuestion: How many?\n\n"
        "Answer:"
    )
    assert prompt == render_plain(build_messages(" How many? ", [exemplar]))
    zero_shot = render_prompt(plain_tokenizer, "How many?")
    assert zero_shot == f"{INSTRUCTION}\n\nQuestion: How many?\n\nAnswer:"


def test_render_response_plain(plain_tokenizer):
    completion = render_response(plain_tokenizer, "How many?", " 3 + 4 = 7\n#### 7\n")
    assert completion == " 3 + 4 = 7\n#### 7\n\n"
    messages = build_messages("How many?") + [{"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]
    prompt = render_prompt(plain_tokenizer, "How many?")
    assert prompt + completion == render_plain(messages) + "\n\n"


def test_teacher_forced_batch_marks_the_positions_that_predict_response_tokens():
    # Row 0: 3 prompt + 2 response tokens; row 1: 2 prompt + 1 response token, padded by 2.
    ids, attention, predict = teacher_forced_batch([[5, 6, 7, 8, 9], [3, 4, 2]], [3, 2], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [3, 4, 2, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Position p predicts token p + 1: row 0 predicts 8, 9 at 2, 3; row 1 predicts 2 at 1.
    assert predict.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]
    assert ids[:, 1:][predict[:, :-1]].tolist() == [8, 9, 2]


# --- BOS: one rule for every stage and both backends ----------------------------------------------

LLAMA3_LIKE_TEMPLATE = (  # writes BOS itself, as Llama 3's template does
    "{{ '<s>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def bos_tokenizer(chat_template=None):
    """A tokenizer that puts BOS before every text by itself, like Llama's and Mistral's."""
    from tokenizers import processors

    words = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "Question:", "Answer:", "2+2?", "4"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("template", [None, LLAMA3_LIKE_TEMPLATE], ids=["plain", "chat writes BOS"])
def test_a_tokenizer_that_adds_bos_gets_exactly_one(template):
    from llmkd.data.prompts import adds_bos, encode, tokenize_example

    tok = bos_tokenizer(template)
    assert adds_bos(tok)
    prompt = render_prompt(tok, "2+2?")
    ids = encode(tok, prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    full, mask = tokenize_example(tok, prompt, render_response(tok, "2+2?", "4"))
    assert full[: len(ids)] == ids and full.count(tok.bos_token_id) == 1 and mask[0] == 0


def test_a_tokenizer_without_bos_gets_none(chat_tokenizer, plain_tokenizer):
    from llmkd.data.prompts import adds_bos, encode

    for tok in (chat_tokenizer, plain_tokenizer):
        text = render_prompt(tok, "What is 2+2?")
        assert not adds_bos(tok) and encode(tok, text) == tok(text, add_special_tokens=False)["input_ids"]


def test_the_off_format_rendering_is_the_bare_question_and_the_answer_as_shipped(smol_tokenizer):
    row = {"question": "Natalia sold 48 clips in April. How many in May, half as many?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 24"}
    prompt, response = prompts.render_example(smol_tokenizer, row["question"], row["answer"], "plain_chat")
    assert prompts.INSTRUCTION not in prompt and "Question:" not in prompt and row["question"] in prompt
    assert "<<48/2=24>>" in response and response.lstrip().startswith("Natalia sold")
    ours = prompts.render_example(smol_tokenizer, row["question"], row["answer"])
    assert ours == (prompts.render_prompt(smol_tokenizer, row["question"]),
                    prompts.render_response(smol_tokenizer, row["question"], prompts.assistant_turn(row["answer"])))
    assert "<<" not in ours[1]
    with pytest.raises(ValueError, match="rendering must be one of"):
        prompts.render_example(smol_tokenizer, row["question"], row["answer"], "nope")


@pytest.mark.parametrize("rendering", list(prompts.RENDERINGS))
def test_each_rendering_shows_what_it_says(smol_tokenizer, rendering):
    """The instruction, the calculator notes and the chat template are each there exactly when the
    rendering's row says so; the prompt is what a model answering it would see."""
    instructed, notes, chat, _ = prompts.RENDERINGS[rendering]
    row = {"question": "Natalia sold 48 clips in April. How many in May, half as many?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 24"}
    prompt, response = prompts.render_example(smol_tokenizer, row["question"], row["answer"], rendering)
    assert prompt == prompts.render_example_prompt(smol_tokenizer, row["question"], rendering)
    assert (prompts.INSTRUCTION in prompt) == instructed and row["question"] in prompt
    assert ("<<48/2=24>>" in response) == notes and response.strip().startswith("Natalia sold")
    assert ("<|im_start|>" in prompt) == chat and ("<|im_end|>" in response) == chat
    assert extract_strict(response) == "24"  # every rendering keeps the final answer line


def test_the_recipe_accepts_exactly_the_renderings_prompts_defines():
    import typing

    from llmkd.config import Rendering

    assert typing.get_args(Rendering) == tuple(prompts.RENDERINGS)
