"""The export's fidelity gate, engine side: an exported folder scored by plain transformers + peft, or
its GGUF files by llama.cpp (llama-cpp-python).

    python export_check.py --export DIR --teacher TEACHER_DIR --teacher-dtype float32 --rows rows.json --out out.json
    python export_check.py --export MERGED_DIR --base BASE_DIR --teacher ... --rows ... --out ...
    python export_check.py --engine llama.cpp --base B.gguf --distilled D.gguf [--distilled-lora L.gguf]
                           --exact E.gguf [--exact-lora EL.gguf] --max-new-tokens 256 --teacher ... --rows ... --out ...

Run by `llmkd export` in a fresh process, and it imports nothing of llmkd: it loads the folder exactly as a
user would (`AutoModelForCausalLM.from_pretrained(DIR)` with the quantization config saved there, then
`PeftModel.from_pretrained(model, DIR/adapter)`; a merged folder has no adapter and is scored beside
`--base`, the base's folder), and the 16-bit teacher from its folder. `rows.json`:
[{"input_ids": [...], "start": s, "generate": bool}, ...], the response starting at token s. Writes, for the base (adapter
disabled) and the distilled student: the mean per response token of KL(teacher || model) over the full
vocabulary, top-1 agreement with the teacher, the tokens counted, and the greedy output on the prompt of
each row marked `generate` as `generate` gives it with the folder's own generation_config.json (the decoding a user gets).

llama.cpp: the base file and the distilled student (a file, with a LoRA file or merged) give the same
figures, each greedy output decoded token by token from llama.cpp's own logits; the all-F32 copy of the
distilled student, run with an F32 KV cache, adds "distilled_f32" with each row's log-probabilities of its
response tokens, which the caller compares with llmkd's fp32 forward.
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


def llama_cpp_figures(path: str, lora: str | None, rows: list[dict], reference: list[torch.Tensor], *,
                      f32: bool = False, max_new_tokens: int = 0) -> dict:
    """KL / top-1 against `reference` of llama.cpp running `path` (+ `lora`), and its greedy outputs."""
    import os

    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(len(r["input_ids"]) for r in rows) + max_new_tokens + 8
    extra = {"type_k": 0, "type_v": 0} if f32 else {}  # GGML_TYPE_F32 KV cache: exact arithmetic
    llm = Llama(model_path=path, lora_path=lora, logits_all=True, n_ctx=n_ctx, n_threads=max(1, (os.cpu_count() or 2) // 2),
                verbose=False, **extra)
    logits, texts, target_logprobs = [], [], []
    for row in rows:
        llm.reset()
        llm.eval(row["input_ids"])
        scores = torch.from_numpy(np.array(llm.scores[: len(row["input_ids"])], dtype=np.float32))
        at = scores[row["start"] - 1 : len(row["input_ids"]) - 1]
        logits.append(at)
        targets = torch.tensor(row["input_ids"][row["start"]:])
        target_logprobs.append(torch.log_softmax(at, -1).gather(1, targets[:, None])[:, 0].tolist())
    figures = compare(reference, logits)
    if f32:
        figures["target_logprobs"] = target_logprobs
    if max_new_tokens:
        for row in [r for r in rows if r.get("generate", True)]:
            llm.reset()
            prompt = row["input_ids"][: row["start"]]
            llm.eval(prompt)
            new: list[int] = []
            while len(new) < max_new_tokens:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if token == llm.token_eos():
                    break
                new.append(token)
                llm.eval([token])
            texts.append(llm.detokenize(new).decode("utf-8", errors="replace"))
        figures["outputs"] = texts
    return figures


def load_folder(folder: str):
    """A model folder as a user loads it: `from_pretrained`, or, for HQQ's serialization (config.json's
    quantization_config says quant_method "hqq"), hqq itself: the model built from its config, each quantised
    linear an HQQLinear loaded from its state dict, every other weight loaded as saved (transformers 5.2x
    loads no HQQ config, and hqq's `from_quantized` reads a pickle)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    quantization = getattr(config, "quantization_config", None) or {}
    if quantization.get("quant_method") != "hqq":
        return AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file

    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    tensors = load_file(f"{folder}/model.safetensors")
    for name in sorted(k.removesuffix(".W_q") for k in list(tensors) if k.endswith(".W_q")):
        prefix = f"{name}."
        layer = HQQLinear(None, None, compute_dtype=config.dtype, device="cpu", initialize=False)
        layer.load_state_dict({k.removeprefix(prefix): tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    loaded = model.load_state_dict(tensors, strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"{folder}/model.safetensors: {len(loaded.unexpected_keys)} tensors the model has no "
                         f"place for ({loaded.unexpected_keys[0]}, ...)")
    state, hqq = model.state_dict(keep_vars=True), {n for n, m in model.named_modules() if isinstance(m, HQQLinear)}
    stored = {state[k].data_ptr() for k in tensors}
    unset = [k for k in loaded.missing_keys  # HQQ layers report their own keys; a tied weight is loaded through its twin
             if k.rpartition(".")[0] not in hqq and not (k in state and state[k].data_ptr() in stored)]
    if unset:
        raise ValueError(f"{folder}/model.safetensors: no tensor for {len(unset)} weights ({unset[0]}, ...)")
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", help="transformers: the exported folder")
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-dtype", default="float32")
    p.add_argument("--rows", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers")
    for name in ("base", "distilled", "distilled-lora", "exact", "exact-lora"):
        p.add_argument(f"--{name}", help=f"llama.cpp: the {name.replace('-', ' ')} GGUF file"
                       + ("; transformers: the base's folder, scored beside a merged --export folder" if name == "base" else ""))
    p.add_argument("--max-new-tokens", type=int, default=256, help="llama.cpp: greedy outputs' length limit")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    rows = json.loads(open(args.rows).read())
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=getattr(torch, args.teacher_dtype),
                                                   device_map={"": "cpu"}).eval()
    reference = logits_at_responses(teacher, rows)
    del teacher
    if args.engine == "llama.cpp":
        n = args.max_new_tokens
        figures = {"student": llama_cpp_figures(args.base, None, rows, reference, max_new_tokens=n),
                   "distilled": llama_cpp_figures(args.distilled, args.distilled_lora, rows, reference, max_new_tokens=n),
                   "distilled_f32": llama_cpp_figures(args.exact, args.exact_lora, rows, reference, f32=True)}
        with open(args.out, "w") as f:
            json.dump(figures, f)
        return 0

    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer, config = AutoTokenizer.from_pretrained(args.export), GenerationConfig.from_pretrained(args.export)
    if args.base:  # a merged folder (no adapter), scored beside the base's own folder
        figures = {}
        for tag, folder in (("student", args.base), ("distilled", args.export)):
            model = load_folder(folder).eval()
            figures[tag] = compare(reference, logits_at_responses(model, rows))
            figures[tag]["outputs"] = outputs(model, tokenizer, config, rows)
            del model
        with open(args.out, "w") as f:
            json.dump(figures, f)
        return 0
    base = load_folder(args.export)
    student = PeftModel.from_pretrained(base, f"{args.export}/adapter").eval()
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
