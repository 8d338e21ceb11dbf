"""The model cards (README.md) of `llmkd export`'s folders: what the folder holds, how to load or serve
it, and the fidelity gate's figures from its export.json record (`llmkd/export.py`)."""

from __future__ import annotations

from llmkd.config import Recipe, recovered_parameters
from llmkd.data import sources


# How a user loads an HQQ folder (llmkd/export_hqq.py writes it; export_check.py loads it the same way).
HQQ_LOAD = """from hqq.core.quantize import HQQLinear
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

config = AutoConfig.from_pretrained("DIR")
del config.quantization_config  # transformers 5.2x loads no HQQ config: hqq loads the layers below
model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
weights = load_file("DIR/model.safetensors")
for name in {k.removesuffix(".W_q") for k in weights if k.endswith(".W_q")}:  # each quantised linear
    layer = HQQLinear(None, None, compute_dtype=config.dtype, device="cpu", initialize=False)
    layer.load_state_dict({k.removeprefix(name + "."): weights.pop(k) for k in list(weights) if k.startswith(name + ".")})
    model.set_submodule(name, layer)
model.load_state_dict(weights, strict=False)  # the rest (a tied lm_head is loaded through the embeddings)"""


def hqq_student(recipe: Recipe) -> bool:
    return recipe.model.quant.startswith("hqq")


def engine_name(recipe: Recipe, *more: str) -> str:
    """Who loads a transformers-side folder in the export's gate: transformers, or hqq's layers in a
    transformers model."""
    return " + ".join(["hqq + transformers" if hqq_student(recipe) else "plain transformers", *more])


def _vllm(recipe: Recipe, lora: bool) -> str:
    """The card's vLLM advice for a transformers-side folder (unchecked here: vLLM runs these formats on GPUs)."""
    adapter = " --enable-lora --lora-modules distilled=DIR/adapter" if lora else ""
    if not hqq_student(recipe):
        return f"A pre-quantized bitsandbytes checkpoint:\n\n    vllm serve DIR --quantization bitsandbytes{adapter}"
    if recipe.model.quant == "hqq4" and recipe.model.hqq_group_size == 64:
        return f"vLLM's HQQ loader (HQQ Marlin, GPUs):\n\n    vllm serve DIR --quantization hqq{adapter}"
    return (f"vLLM serves HQQ at 4 bits with group size 64 only; this folder is {recipe.model.quant} with group size "
            f"{recipe.model.hqq_group_size}: load it with hqq as above.")


def model_card(recipe: Recipe, record: dict) -> str:
    e, o = record["engine"], record["llmkd"]
    gap = 1 - e["distilled"]["kl"] / e["student"]["kl"] if e["student"]["kl"] > 0 else float("nan")
    if hqq_student(recipe):
        what = f"HQQ {recipe.model.quant[3:]}-bit, group size {recipe.model.hqq_group_size}, in HQQ's own serialization"
        load = f"## Load it (hqq + transformers + peft)\n\n```python\n{HQQ_LOAD}\nmodel = PeftModel.from_pretrained(model, \"DIR/adapter\")"
        load = load.replace("from safetensors", "from peft import PeftModel\nfrom safetensors", 1)
    else:
        what = f"bitsandbytes {recipe.model.quant}, serialized with its quantization config"
        load = """## Load it (transformers + peft)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("DIR"), "DIR/adapter")"""
    return f"""# {recipe.name}: {recipe.model.name}, distilled into its {recipe.model.quant} copy

The quantised student exactly as llmkd trained against it, {what},
and the distilled LoRA adapter in `adapter/`, unmerged: merging a LoRA into quantised weights re-rounds
them and loses most of its correction. Trained on {recipe.data.source}.

{load}
tokenizer = AutoTokenizer.from_pretrained("DIR")  # generation_config.json holds llmkd's greedy decoding
```

## Serve it (vLLM)

{_vllm(recipe, lora=True)}

## Measured at export

On {record['rows']} held-out rows, teacher-forced, per response token against the 16-bit teacher; this folder
loaded in a fresh process by {engine_name(recipe, 'peft')} (llmkd's own evaluator in brackets):

| model | KL(teacher‖model) | top-1 agreement | greedy output as llmkd's |
|---|---:|---:|---:|
| base ({recipe.model.quant}, adapter off) | {e['student']['kl']:.4f} ({o['student']['kl']:.4f}) | {100 * e['student']['top1_agreement']:.1f}% ({100 * o['student']['top1_agreement']:.1f}%) | {100 * e['student']['same_output_as_llmkd']:.0f}% |
| distilled | {e['distilled']['kl']:.4f} ({o['distilled']['kl']:.4f}) | {100 * e['distilled']['top1_agreement']:.1f}% ({100 * o['distilled']['top1_agreement']:.1f}%) | {100 * e['distilled']['same_output_as_llmkd']:.0f}% |

Greedy outputs: `generate` with this folder's generation_config.json, against llmkd's own generation.

The adapter closes {100 * gap:.1f}% of the base's KL to the teacher. Tolerance of the gate: {record['tolerance']}.
"""


def gguf_model_card(recipe: Recipe, record: dict) -> str:
    e, o = record["engine"], record["llmkd"]
    q = recipe.model.quant.removeprefix("gguf-").upper()
    stops = ", ".join(repr(s) for s in sources.stop_strings(recipe.data))
    return f"""# {recipe.name}: {recipe.model.name}, distilled into its {q} copy, for llama.cpp

`model.gguf` is the {q} base exactly as llmkd trained against it (the same bytes), `adapter.gguf` the
distilled LoRA as llama.cpp's adapter file, applied at run time: merging it into {q} weights would
re-round them and lose most of its correction. Trained on {recipe.data.source}.

## Run it

    llama-cli -m model.gguf --lora adapter.gguf
    llama-server -m model.gguf --lora adapter.gguf --port 8080
    printf 'FROM ./model.gguf\\nADAPTER ./adapter.gguf\\n' > Modelfile && ollama create distilled -f Modelfile

Decoding as llmkd measured it: greedy (`--temp 0`), at most {recipe.eval.max_new_tokens} new tokens, stop at {stops}.

## Measured at export

On {record['rows']} held-out rows, teacher-forced, per response token against the 16-bit teacher, in
llama.cpp through llama-cpp-python (llmkd's own evaluator in brackets):

| model | KL(teacher‖model) | top-1 agreement | greedy output as llmkd's |
|---|---:|---:|---:|
| base ({q}, no adapter) | {e['student']['kl']:.4f} ({o['student']['kl']:.4f}) | {100 * e['student']['top1_agreement']:.1f}% ({100 * o['student']['top1_agreement']:.1f}%) | {100 * e['student'].get('same_output_as_llmkd', float('nan')):.0f}% |
| distilled | {e['distilled']['kl']:.4f} ({o['distilled']['kl']:.4f}) | {100 * e['distilled']['top1_agreement']:.1f}% ({100 * o['distilled']['top1_agreement']:.1f}%) | {100 * e['distilled'].get('same_output_as_llmkd', float('nan')):.0f}% |

The adapter closes {100 * e['gap_closed']:.1f}% of the base's KL gap in llama.cpp ({100 * o['gap_closed']:.1f}% in llmkd).
llama.cpp's CPU kernels round activations to 8 bits against {q} weights, so its figures and greedy paths
differ from llmkd's dequantized forward; an all-F32 copy of these very weights and adapter matched llmkd's
fp32 forward to {e['distilled_f32']['max_logprob_difference']:.1e} in every response token's log-probability.
Tolerance of the gate: {record['tolerance']}.
"""


def merged_model_card(recipe: Recipe, record: dict) -> str:
    e, o, closed = record["engine"], record["llmkd"], record["gap_closed"]
    gguf = "model.gguf" in record["files"]
    q = recipe.model.quant.removeprefix("gguf-").upper() if gguf else recipe.model.quant
    r = record["recovery"]
    what = recovered_parameters(recipe.model.quant)
    n = r.get("merge_calibration_tokens", 0)
    codes = f" (codes chosen GPTQ's way on {n:,} transfer-set tokens)" if n else ""
    rows = "\n".join(
        f"| {label} | {o[tag]['kl']:.4f} | {100 * o[tag]['top1_agreement']:.1f}% | "
        f"{'' if tag == 'student' else f'{100 * closed[tag]:.1f}%'} |"
        for tag, label in (("student", f"base ({q})"), ("distilled", "base + adapter (unmerged)"),
                           ("requantized", f"adapter merged, quantized again to {q}"),
                           ("merged", f"merged + {what} recovered: this {'file' if gguf else 'folder'}")))
    if gguf:
        head = f"""# {recipe.name}: {recipe.model.name}, distilled into one {q} file, for llama.cpp

`model.gguf` holds no adapter and has the base's exact size: the distilled adapter was merged into the
weights, which were quantized again to {q}{codes}, and then each block's scale was trained against the teacher"""
        run = """## Run it

    llama-cli -m model.gguf
    llama-server -m model.gguf --port 8080
    printf 'FROM ./model.gguf\\n' > Modelfile && ollama create distilled -f Modelfile"""
        engine = (f"In llama.cpp (llama-cpp-python), the base scores KL {e['student']['kl']:.4f} and this file "
                  f"{e['distilled']['kl']:.4f} ({100 * e['gap_closed']:.1f}% of the gap closed); an all-F32 copy of this "
                  f"file matched llmkd's fp32 forward to {e['distilled_f32']['max_logprob_difference']:.1e} in every "
                  "response token's log-probability.")
    else:
        b = record["weight_bytes"]
        head = f"""# {recipe.name}: {recipe.model.name}, distilled into one {q} checkpoint, for {'hqq + transformers' if hqq_student(recipe) else 'transformers'} and vLLM

This folder holds no adapter, and its tensors take the base's bytes ({b['merged']:,} of them): the
distilled adapter was merged into the weights, which {'hqq' if hqq_student(recipe) else 'bitsandbytes'} quantized again to
{q}{codes}, and then its {what} were trained against the teacher"""
        load = HQQ_LOAD if hqq_student(recipe) else (
            'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
            'model = AutoModelForCausalLM.from_pretrained("DIR")  # bitsandbytes\' quantization config is in config.json')
        run = f"""## Load it

```python
{load}
tokenizer = AutoTokenizer.from_pretrained("DIR")  # generation_config.json holds llmkd's greedy decoding
```

{_vllm(recipe, lora=False)}"""
        engine = (f"Loaded in a fresh process by {engine_name(recipe)}, the base scores KL {e['student']['kl']:.4f} and this "
                  f"folder {e['distilled']['kl']:.4f}; its greedy outputs are llmkd's on "
                  f"{100 * e['distilled']['same_output_as_llmkd']:.0f}% of {len(e['distilled']['outputs'])} prompts.")
    return f"""{head}
for {r['steps']} steps (lr {r['lr']:g}) with the quantized codes fixed, to win back what the re-rounding lost.
Trained on {recipe.data.source}.

{run}

## Measured at export

On {record['rows']} held-out rows, teacher-forced, per response token against the 16-bit teacher, in llmkd:

| model | KL(teacher‖model) | top-1 agreement | KL gap closed |
|---|---:|---:|---:|
{rows}

This {'file' if gguf else 'folder'} keeps {100 * record['adapter_gain_kept']:.0f}% of the adapter's share of the gap. {engine}
Tolerance of the gate: {record['tolerance']}.
"""
