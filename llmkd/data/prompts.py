"""The one prompt format of llmkd: what the builder, the trainer and both evaluator backends show a model.

A prompt is a list of chat turns. k-shot prompts are multi-turn: each exemplar is a user turn (its
question) followed by an assistant turn (its worked solution); the question being asked is the last
user turn. Every user turn carries the instruction, so 0-shot and k-shot ask the same thing.

    user:      <INSTRUCTION>\n\nQuestion: <exemplar question>
    assistant: <exemplar solution, calculator notes removed>\n#### <answer>
    ... (k exemplars)
    user:      <INSTRUCTION>\n\nQuestion: <question>

Chat models get these turns through their own chat template (`tokenizer.apply_chat_template`).
Base models (no template) get the same text joined plainly: turns separated by a blank line, each
assistant turn prefixed with "Answer:" (see `render_plain`).

A 0-shot example (question + GSM8K answer) can also be rendered otherwise (`render_example`), to
train on varied text (`transfer_set.renderings`) and to measure fidelity on text unlike the
training data (`eval.fidelity_renderings`). RENDERINGS holds each rendering and what it is; the
off-format yardstick is `plain_chat`, the bare question as the user turn (no instruction, no
"Question:") and the answer as shipped (calculator notes kept).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch

from llmkd.errors import LlmkdError

# rendering -> (instruction and "Question:" in the user turn, calculator notes kept, chat template, label)
RENDERINGS = {
    "llmkd": (True, False, True, "in-format (llmkd's prompt)"),
    "bare": (False, False, True, "bare question, notes removed"),
    "notes": (True, True, True, "llmkd's prompt, answer with calculator notes"),
    "plain_chat": (False, True, True, "off-format (bare question, answer as shipped)"),
    "plain_text": (False, True, False, "no chat template: Question:/Answer: text, answer as shipped"),
}

INSTRUCTION = (
    "Solve the math problem step by step. "
    "Write the final answer on the last line, as '#### <number>'."
)

# Generation stops at any of these (besides the tokenizer's end-of-sequence token): the start of
# a new user turn (instruction or "Question:") means the model began inventing the next exemplar.
STOP_STRINGS = (INSTRUCTION.split(".")[0], "Question:", "</s>", "<|im_end|>", "<|eot_id|>")

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def user_turn(question: str) -> str:
    return f"{INSTRUCTION}\n\nQuestion: {question.strip()}"


def assistant_turn(solution: str) -> str:
    """A GSM8K `answer` field as the model should write it: calculator notes (`<<48/2=24>>`) removed."""
    return _CALCULATOR_NOTE.sub("", solution).strip()


def select_exemplars(train: Sequence[dict], shots: int, seed: int) -> list[dict]:
    """`shots` train examples, the same for every question and every run with this seed."""
    if shots < 0:
        raise LlmkdError(f"shots must be >= 0, got {shots}")
    if shots > len(train):
        raise LlmkdError(f"{shots} shots asked, but the exemplar pool (GSM8K train) has only {len(train)} examples")
    indices = random.Random(seed).sample(range(len(train)), shots)
    return [train[i] for i in indices]


def build_messages(question: str, exemplars: Sequence[dict] = ()) -> list[dict]:
    messages = []
    for ex in exemplars:
        messages.append({"role": "user", "content": user_turn(ex["question"])})
        messages.append({"role": "assistant", "content": assistant_turn(ex["answer"])})
    messages.append({"role": "user", "content": user_turn(question)})
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: Sequence[dict]) -> str:
    parts = []
    for m in messages:
        parts.append(m["content"] if m["role"] == "user" else f"Answer: {m['content']}")
    return "\n\n".join(parts) + ("\n\nAnswer:" if messages[-1]["role"] == "user" else "")


def render_prompt(tokenizer, question: str, exemplars: Sequence[dict] = ()) -> str:
    """The prompt text, ending where the model's answer begins.

    Turn it into token ids with `encode` (every stage does), never with the tokenizer's defaults.
    """
    return render_messages(tokenizer, build_messages(question, exemplars))


def render_messages(tokenizer, messages: Sequence[dict]) -> str:
    """Chat turns as the prompt text, ending where the assistant's reply begins."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_plain(messages)


def render_response(tokenizer, question: str, response: str, exemplars: Sequence[dict] = ()) -> str:
    """The text that follows `render_prompt(...)` when the assistant answers `response`.

    For chat models this ends with the template's end-of-turn marker, so a model trained on it
    learns to stop; whitespace the template puts after the marker is dropped (generation ends at
    the marker, so nothing after it is ever predicted). Derived from the template itself, not
    hard-coded per model family.
    """
    return render_reply(tokenizer, build_messages(question, exemplars), response)


# The fidelity "rendering" of data other than GSM8K: its held-out rows as written, through the chat template.
DATA_RENDERING = "data"


def rendering_label(rendering: str) -> str:
    return "held-out rows of your data" if rendering == DATA_RENDERING else RENDERINGS[rendering][3]


def _example_messages(question: str, rendering: str) -> list[dict]:
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering must be one of {', '.join(RENDERINGS)}, got {rendering!r}")
    instructed = RENDERINGS[rendering][0]
    return [{"role": "user", "content": user_turn(question) if instructed else question.strip()}]


def render_example_prompt(tokenizer, question: str, rendering: str = "llmkd") -> str:
    """The prompt of a 0-shot example in `rendering`, ending where the answer begins."""
    messages = _example_messages(question, rendering)
    if not RENDERINGS[rendering][2]:
        return f"Question: {question.strip()}\nAnswer:"
    return render_messages(tokenizer, messages)


def render_example(tokenizer, question: str, answer: str, rendering: str = "llmkd") -> tuple[str, str]:
    """(prompt, response) of a 0-shot example with GSM8K's `answer` in `rendering` (RENDERINGS).
    `llmkd` is exactly `render_prompt` + `render_response`, the format every stage uses."""
    messages = _example_messages(question, rendering)
    _, notes, chat, _ = RENDERINGS[rendering]
    reply = answer.strip() if notes else assistant_turn(answer)
    if not chat:
        return render_example_prompt(tokenizer, question, rendering), " " + reply + "\n\n"
    return render_messages(tokenizer, messages), render_reply(tokenizer, messages, reply)


def render_reply(tokenizer, messages: Sequence[dict], response: str) -> str:
    """The text that follows `render_messages(messages)` when the assistant answers `response`."""
    if not has_chat_template(tokenizer):
        return " " + response.strip() + "\n\n"
    prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response.strip()}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template renders an assistant turn that does not extend the prompt")
    return full[len(prompt):].rstrip()


def render_row(tokenizer, row: dict, rendering: str = "llmkd", exemplars: Sequence[dict] = ()) -> tuple[str, str | None]:
    """(prompt, gold response or None) of an example: a GSM8K row (question, answer) in `rendering`
    with `exemplars`, or a row of other data (`llmkd.data.sources`: messages, response) as its turns."""
    if "messages" in row:
        if not has_chat_template(tokenizer):
            raise LlmkdError("the model's tokenizer has no chat template: rows of your own data are rendered "
                             "by it; give one with model.chat_template (a Jinja template or a file holding it)")
        prompt = render_messages(tokenizer, row["messages"])
        return prompt, None if row["response"] is None else render_reply(tokenizer, row["messages"], row["response"])
    if rendering == "llmkd":  # k-shot too
        return (render_prompt(tokenizer, row["question"], exemplars),
                render_response(tokenizer, row["question"], assistant_turn(row["answer"]), exemplars))
    return render_example(tokenizer, row["question"], row["answer"], rendering)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts its BOS token before a text (Llama, Mistral: yes; SmolLM2,
    Qwen: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def encode(tokenizer, prompt: str) -> list[int]:
    """The token ids of a rendered prompt: the one BOS rule of every stage and both backends.

    The text's own tokens (no special tokens added), with the tokenizer's BOS first where the
    tokenizer adds one and the text does not already begin with it (chat templates that write
    BOS themselves; lm-eval's HFLM follows the same rule with `add_bos_token=adds_bos(tokenizer)`).
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def tokenize_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response and a 0/1 mask marking the response tokens.

    The two parts are tokenized separately so the mask boundary is exact; the prompt by `encode`,
    the response as its own tokens (it continues the prompt).
    """
    prompt_ids = encode(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def teacher_forced_batch(sequences: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int):
    """Right-padded (input_ids, attention_mask, predict) of prompt + response rows, response i starting
    at token starts[i]: `predict` marks the positions whose next token is a response token (s - 1 up
    to the row's second-to-last token), the only positions whose logits a teacher-forced loss or
    metric reads. Right padding keeps every row's positions 0..L-1 without position ids."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    predict = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
        predict[row, start - 1 : len(seq) - 1] = True
    return input_ids, attention, predict
