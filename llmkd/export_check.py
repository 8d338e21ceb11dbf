"""The export's fidelity gate, engine side: an exported folder scored by plain transformers + peft.

    python export_check.py --export DIR --teacher TEACHER_DIR --teacher-dtype float32 --rows rows.json --out out.json

Run by `llmkd export` in a fresh process, and it imports nothing of llmkd: it loads the folder exactly as a
user would (`AutoModelForCausalLM.from_pretrained(DIR)` with the quantization config saved there, then
`PeftModel.from_pretrained(model, DIR/adapter)`), and the 16-bit teacher from its folder. `rows.json`:
[{"input_ids": [...], "start": s, "generate": bool}, ...], the response starting at token s. Writes, for the base (adapter
disabled) and the distilled student: the mean per response token of KL(teacher || model) over the full
vocabulary, top-1 agreement with the teacher, the tokens counted, and the greedy output on the prompt of
each row marked `generate` as `generate` gives it with the folder's own generation_config.json (the decoding a user gets).
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def logits_at_responses(model, rows: list[dict]) -> list[torch.Tensor]:
    """Per row, the fp32 logits at the positions that predict its response tokens (start - 1 .. L - 2)."""
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]], dtype=torch.long)
        logits = model(input_ids=ids).logits[0].float()  # (L, V)
        out.append(logits[row["start"] - 1 : len(row["input_ids"]) - 1])
    return out


def compare(teacher: list[torch.Tensor], model: list[torch.Tensor]) -> dict:
    kl, agree, tokens = 0.0, 0, 0
    for t, m in zip(teacher, model):
        t_logp, m_logp = torch.log_softmax(t, -1), torch.log_softmax(m, -1)
        kl += float((t_logp.exp() * (t_logp - m_logp)).sum())
        agree += int((t.argmax(-1) == m.argmax(-1)).sum())
        tokens += t.shape[0]
    return {"kl": kl / max(tokens, 1), "top1_agreement": agree / max(tokens, 1), "tokens": tokens}


@torch.no_grad()
def outputs(model, tokenizer, config, rows: list[dict]) -> list[str]:
    """Each row's prompt completed by `generate` under `config`, the new text without special tokens."""
    texts = []
    for row in [r for r in rows if r.get("generate", True)]:
        prompt = torch.tensor([row["input_ids"][: row["start"]]])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                             tokenizer=tokenizer)
        texts.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-dtype", default="float32")
    p.add_argument("--rows", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    rows = json.loads(open(args.rows).read())
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=getattr(torch, args.teacher_dtype),
                                                   device_map={"": "cpu"}).eval()
    reference = logits_at_responses(teacher, rows)
    del teacher
    base = AutoModelForCausalLM.from_pretrained(args.export, device_map={"": "cpu"})
    student = PeftModel.from_pretrained(base, f"{args.export}/adapter").eval()
    tokenizer, config = AutoTokenizer.from_pretrained(args.export), GenerationConfig.from_pretrained(args.export)
    distilled = compare(reference, logits_at_responses(student, rows))
    distilled["outputs"] = outputs(student, tokenizer, config, rows)
    with student.disable_adapter():
        base_figures = compare(reference, logits_at_responses(student, rows))
        base_figures["outputs"] = outputs(student, tokenizer, config, rows)
    with open(args.out, "w") as f:
        json.dump({"student": base_figures, "distilled": distilled}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
