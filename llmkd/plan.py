"""The dry run: what training a recipe would load and how much memory it would take, loading no weights.

The architecture comes from the model's config.json where it is local (a folder, the converted
embedded default, the hub cache) and from a small built-in table for known hub ids offline. The
memory model counts, per process: the quantised weights with their constants (`quantize`), what stays unquantised,
LoRA weights with gradients and optimizer state, activations at the backward's peak, and the
response-position logits with their gradient; and the device's peak while the student loads, alone
and beside an evaluation's resident teacher (`load_peak`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkd import models, quantize
from llmkd.config import Recipe
from llmkd.errors import LlmkdError
from llmkd.fastpath.dequantize import MAX_BYTES as MAX_DEQUANTIZED_BYTES
from llmkd.transfer_set import TransferSet, training_folder_state

# Architectures for a dry run when the hub is unreachable (and for the embedded default, whose
# config a dry run does not convert the GGUF to read). transformers config kwargs.
_LLAMA31_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                   tie_word_embeddings=False)
_SMOLLM2_135M = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                     tie_word_embeddings=True)
KNOWN_CONFIGS = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    models.EMBEDDED_ALIAS: _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
}


def model_config(cfg) -> tuple[Any, str]:
    """(transformers config, where it came from) without loading weights or converting the GGUF."""
    return _model_config(cfg.name, cfg.revision, cfg.trust_remote_code)


@functools.lru_cache(maxsize=8)  # a sweep plans several points of one model: ask the hub once
def _model_config(name: str, revision: str | None, trust_remote_code: bool) -> tuple[Any, str]:
    from transformers import AutoConfig

    if name == models.EMBEDDED_ALIAS:
        converted = models.embedded_model_dir(convert=False)
        if converted is None:
            return _table_config(name), "built-in table (the embedded default, not converted yet)"
        return AutoConfig.from_pretrained(str(converted)), str(converted)
    # Not models.resolve: it takes hub ids with a dot ("Llama-3.1-...") for missing folders.
    path = Path(name).expanduser()
    ref = str(path) if path.is_dir() else name
    try:
        return AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code), ref
    except (OSError, ValueError) as e:
        if name in KNOWN_CONFIGS:
            return _table_config(name), f"built-in table (hub unreachable: {type(e).__name__})"
        raise LlmkdError(
            f"cannot read the config of {name!r} ({type(e).__name__}) and it is not in the built-in table "
            f"({', '.join(KNOWN_CONFIGS)}); download it and set model.name to the folder"
        ) from None


def _table_config(name: str):
    from transformers import AutoConfig

    kwargs = dict(KNOWN_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


@dataclass
class ModelPlan:
    config: Any
    source: str
    total_params: int
    quantized_params: int  # in the Linear layers the quantizer converts (all but lm_head)
    quantized_bytes: float  # those layers' weights and constants as `quantize` plans them
    largest_linear: int  # the weights of the largest of those layers: the one in flight at a load's peak
    kept_params: int  # embeddings, lm_head, norms: not quantised
    lora_modules: int
    lora_params: int
    lora_targets_missing: list[str] = field(default_factory=list)


def plan_model(recipe: Recipe) -> ModelPlan:
    """Parameter counts and quantised bytes from the architecture on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    config, source = model_config(recipe.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    quantized = sum(m.weight.numel() for m in linears.values())
    compute_bytes = models.compute_dtype(recipe.model).itemsize
    quantized_bytes = sum(m.weight.numel() * quantize.planned_bytes_per_weight(recipe.model, m.in_features, compute_bytes)
                          for m in linears.values())
    targets = list(recipe.lora.target_modules)
    hit = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in hit)]
    lora = sum(recipe.lora.r * (m.in_features + m.out_features) for m in hit.values())
    largest = max(m.weight.numel() for m in linears.values())
    return ModelPlan(config, source, total, quantized, quantized_bytes, largest, total - quantized, len(hit), lora,
                     missing)


def sequence_plan(recipe: Recipe) -> tuple[int, int, int | None, str]:
    """(longest example, longest response, examples or None, how known): from the transfer set if built."""
    path = recipe.layout.transfer_set
    if training_folder_state(path) == "complete":
        tokens, responses = TransferSet.open(path).lengths()
        return int(tokens.max()), int(responses.max()), len(tokens), f"measured in {path}"
    ts = recipe.transfer_set
    if not recipe.data.is_gsm8k:
        return _measured_in_rows(recipe)
    prompt = 160 * (1 + ts.shots)  # GSM8K: ~160 tokens per question turn with the chat template
    response = ts.max_new_tokens if ts.response == "teacher" else 320
    return prompt + response, response, ts.count, f"estimated (no transfer set at {path} yet): " \
        f"~{prompt} prompt tokens ({ts.shots}-shot) + {response} response tokens"


def _measured_in_rows(recipe: Recipe) -> tuple[int, int, int, str]:
    """sequence_plan for data other than GSM8K before its transfer set exists: the selected rows rendered
    and tokenized (gold responses as written; teacher responses at transfer_set.max_new_tokens)."""
    from llmkd import builder
    from llmkd.data import prompts

    ts, tok = recipe.transfer_set, models.load_tokenizer(recipe.model)
    rows = builder.select_questions(recipe, allow_eval_split=True, tokenizer=tok)[0]
    longest, longest_response = 0, 0
    for row in rows:
        prompt, response = prompts.render_row(tok, row)
        r = len(tok(response, add_special_tokens=False)["input_ids"]) if response is not None else ts.max_new_tokens
        n = len(prompts.encode(tok, prompt)) + r
        if recipe.data.max_length is not None:
            n = min(n, recipe.data.max_length)
        longest, longest_response = max(longest, n), max(longest_response, r)
    return longest, longest_response, len(rows), f"measured in {len(rows)} rows of {recipe.data.source} " \
        f"(no transfer set yet{'; teacher responses at max_new_tokens' if ts.response == 'teacher' else ''})"


def memory_estimate(recipe: Recipe, plan: ModelPlan, seq_len: int, response_len: int,
                    processes: int = 1) -> list[tuple[str, float, str]]:
    """(part, bytes, how) rows of a per-process training memory estimate. Under train.sharding fsdp or
    zero3 with `processes` > 1 each process holds 1/processes of the student's weights and of LoRA's
    weights, gradients and optimizer state, plus the whole of the layers being computed."""
    c, tr, lora = plan.config, recipe.train, recipe.lora
    hidden, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    vocab = c.vocab_size
    act = 2 if tr.mixed_precision in ("bf16", "fp16") else 4  # activation bytes under autocast, else fp32
    tokens = tr.batch_size * seq_len
    opt_bytes = 8 if tr.optimizer == "adamw" else (4 if tr.momentum > 0 else 0)
    # Activations per token per layer at the backward's peak, Llama-like block with SwiGLU: what
    # autograd saves (norm outputs, q/k/v, rotated q/k, GQA-expanded k/v, attention output, gate, up,
    # act, product: ~11H + 4kv + 4I) plus the gradients alive next to it at the start of the backward:
    # 12H + 4kv + 8I elements at `act` bytes, plus the two fp32 RMSNorm inputs (peft upcasts the norms).
    # Calibrated on SmolLM2-135M (fp32, batch 4 x 210 tokens): estimate 2.18 GiB, measured peak RSS
    # increase of a training step 2.08 GiB. LoRA dropout adds its output and a bool mask per input.
    per_token_layer = (12 * hidden + 4 * kv + 8 * inter) * act + 2 * hidden * 4
    if lora.dropout > 0:
        per_token_layer += (3 * hidden + heads * head_dim + 2 * hidden + inter) * (act + 1)
    full = tokens * layers * per_token_layer
    if tr.gradient_checkpointing:  # layer inputs (fp32 residual stream) + one layer recomputed at a time
        activations = tokens * layers * hidden * 4 + tokens * per_token_layer
        how_act = f"checkpointing on: {tokens:,} tokens x {layers} layer inputs fp32 + one layer recomputed"
    else:
        activations = full
        how_act = f"{tokens:,} tokens x {layers} layers x ~{per_token_layer / 1024:.0f} KiB"
    logits_rows = tr.batch_size * response_len
    logits_bytes = act if tr.mixed_precision in ("bf16", "fp16") else 4
    # On the CPU the fast path keeps one dequantized copy of the 4-bit or HQQ weights for the run.
    q, compute = quantize.quantizer(recipe.model), models.compute_dtype(recipe.model).itemsize
    dense = compute if recipe.fast_paths and models.device().type == "cpu" and q.name != "int8" else 0
    if plan.quantized_params * dense > MAX_DEQUANTIZED_BYTES:
        dense = 0  # the fast path stands aside for a copy this big
    extra = [(f"{q.name} weights dequantized once (CPU fast path)", plan.quantized_params * dense,
              f"{plan.quantized_params:,} params x {dense} B (fast_paths: false drops it)")] if dense else []
    # peft's prepare_model_for_kbit_training upcasts what bitsandbytes leaves unquantised to fp32; HQQ's it
    # leaves, and train.sharding fsdp or zero3 skips it.
    kept = 4 if q.library == "bitsandbytes" and tr.sharding == "none" else compute
    shards = processes if tr.sharding != "none" and processes > 1 else 1
    per = f" / {shards} processes" if shards > 1 else ""
    # FSDP2 (llmkd/sharding.py) all-gathers a decoder layer for its forward and backward and prefetches
    # the next one: two whole layers at a time; llmkd's ZeRO-3 config caps its live parameters at the
    # same. The root's own parameters (embeddings, lm_head, final norm) stay gathered from the forward
    # through the backward under FSDP2 (ZeRO-3 gathers them per use: this counts them whole for both).
    gathered = [("decoder layers all-gathered (2 at a time)", 2 * plan.quantized_bytes / layers,
                 f"2 x {plan.quantized_bytes / layers / 2**20:.0f} MiB of one layer's {q.name} weights")] if shards > 1 else []
    return [
        (f"{q.name} weights + quant constants{per}", plan.quantized_bytes / shards,
         f"{plan.quantized_params:,} params x {plan.quantized_bytes / plan.quantized_params:.4f} B{per}"),
        *gathered,
        (f"embeddings, lm_head, norms ({'fp32' if kept == 4 else f'{kept} B'})", plan.kept_params * kept,
         f"{plan.kept_params:,} params" + ("; prepare_model_for_kbit_training upcasts them to fp32" if kept == 4 else "")
         + ("; gathered whole (the root's)" if shards > 1 else "")),
        (f"LoRA weights + grads + optimizer{per}", plan.lora_params * (4 + 4 + opt_bytes) / shards,
         f"{plan.lora_params:,} fp32 params x (4 + 4 + {opt_bytes} {tr.optimizer}) B{per}"),
        ("activations", activations, how_act),
        ("logits + their gradient", 2 * logits_rows * vocab * logits_bytes + (32 << 20),
         f"{logits_rows:,} response positions x {vocab:,} x {logits_bytes} B x 2, + loss tiles"),
        *extra,
    ]


def estimated_peak_bytes(recipe: Recipe, model_plan: ModelPlan | None = None, processes: int = 1) -> float:
    """The per-process training memory estimate's total (what `dry_run` prints), in bytes."""
    seq_len, response_len, _, _ = sequence_plan(recipe)
    return sum(b for _, b, _ in memory_estimate(recipe, model_plan or plan_model(recipe), seq_len, response_len,
                                                processes))


def load_peak(recipe: Recipe, plan: ModelPlan) -> tuple[float, str]:
    """(bytes, how) on the device at the peak of loading the student: its quantised weights, what stays
    unquantised (in the compute dtype: training upcasts bitsandbytes' later), and the largest linear layer in flight.
    bitsandbytes quantises each weight as transformers moves it to the device; HQQ's 16-bit model loads
    on the CPU and each layer is quantised on the device in turn (`quantize`)."""
    q, compute = quantize.quantizer(recipe.model), models.compute_dtype(recipe.model).itemsize
    # hqq 0.2.8 quantises a layer from an fp32 copy with ~9 buffers of its proximal solver, fp16 on a GPU,
    # fp32 on the CPU (measured there at 3584 x 4096: 37 B per weight beside a bf16 layer, 33 beside fp32).
    working = 4 + 9 * (2 if models.device().type == "cuda" else 4) if q.library == "hqq" else 0
    kept, flight = plan.kept_params * compute, plan.largest_linear * (compute + working)
    gib = 2**30
    how = (f"{q.name} weights + constants {plan.quantized_bytes / gib:.2f} + unquantised parts {kept / gib:.2f} "
           f"+ the largest linear layer in flight {flight / gib:.2f}: {plan.largest_linear:,} params x "
           + (f"({compute} B + {working} B of hqq's working copies); loaded on the CPU, quantised onto the device "
              "layer by layer" if working else f"{compute} B; transformers quantises each weight as it loads"))
    return plan.quantized_bytes + kept + flight, how


def dry_run(recipe: Recipe, processes: int = 1) -> str:
    """The resolved recipe, the model plan and a memory estimate per process of `processes`; loads no weights."""
    import yaml

    tr, lora = recipe.train, recipe.lora
    plan = plan_model(recipe)
    c = plan.config
    seq_len, response_len, examples, seq_source = sequence_plan(recipe)
    rows = memory_estimate(recipe, plan, seq_len, response_len, processes)
    total = sum(b for _, b, _ in rows)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    gib = 2**30
    lines = [
        "llmkd train --dry-run: nothing loaded, nothing written",
        "",
        "resolved recipe:",
        *("  " + line for line in yaml.safe_dump(recipe.model_dump(), sort_keys=False).splitlines()),
        "",
        f"model plan: {recipe.model.name}",
        f"  config from {plan.source}",
        f"  {c.model_type}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, intermediate {c.intermediate_size}, "
        f"{heads} heads ({kv_heads} KV, head dim {head_dim}), vocab {c.vocab_size:,}, "
        f"tied embeddings {bool(getattr(c, 'tie_word_embeddings', False))}",
        f"  parameters {plan.total_params:,}: {plan.quantized_params:,} in linear layers -> {recipe.model.quant} "
        f"({_quant_detail(recipe.model)}, compute {recipe.model.compute_dtype}"
        f"{' = ' + str(models.compute_dtype(recipe.model)).removeprefix('torch.') if recipe.model.compute_dtype == 'auto' else ''}); "
        f"{plan.kept_params:,} not quantised",
        f"  LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {plan.lora_modules} modules "
        f"({', '.join(lora.target_modules)}): {plan.lora_params:,} trainable parameters "
        f"({100 * plan.lora_params / plan.total_params:.3f}%)",
    ]
    if plan.lora_targets_missing:
        lines.append(f"  WARNING: no module matches {', '.join(plan.lora_targets_missing)} (peft would refuse)")
    steps = f"{examples:,} examples" if examples else "examples unknown"
    lines += [
        f"  training: {steps}; effective batch {tr.batch_size} x {tr.grad_accum} x {processes} process(es), "
        f"sharding {tr.sharding}; "
        f"{tr.optimizer} lr {tr.lr:g}, {tr.schedule} after {tr.warmup_steps} warmup steps; "
        f"gradient checkpointing {tr.gradient_checkpointing}; mixed precision {tr.mixed_precision}",
        "",
        f"memory estimate per process of {processes}: micro-batch {tr.batch_size} x {seq_len} tokens ({seq_source})",
        "  | part | GiB | how |",
        "  |---|---:|---|",
        *(f"  | {name} | {b / gib:.2f} | {how} |" for name, b, how in rows),
        f"  | total | {total / gib:.2f} | plus framework overhead (CUDA context, allocator: ~1 GiB) |",
        f"  not counted: attention probabilities if SDPA falls back to its math kernel, "
        f"{tr.batch_size * heads * seq_len**2 * 4 / gib:.2f} GiB per layer (fp32)",
    ]
    teacher = plan.total_params * models.teacher_dtype(recipe.model).itemsize  # loaded by the init and by each round
    if lora.init == "activations":
        # lora_init holds four lists of calibration hidden states (student's, teacher's in and out, targets).
        states = 4 * lora.init_tokens * c.hidden_size * 4
        whole = f"{plan.quantized_bytes / gib + plan.kept_params * models.compute_dtype(recipe.model).itemsize / gib:.2f}"
        lines.append(f"  lora.init activations: before the first step the teacher's weights ({teacher / gib:.2f} GiB) "
                     f"and the calibration hidden states (~{states / gib:.2f} GiB) sit beside the student's weights, "
                     "instead of the activations and logits above"
                     + (f"; on the main process only (it computes the init and hands it to the others), beside the "
                        f"whole student ({whole} GiB, not yet sharded) on every process" if processes > 1 else ""))
    op = tr.on_policy
    if op.rounds:
        cache = 2 * c.num_hidden_layers * kv_heads * head_dim * op.batch_size * (seq_len + op.max_new_tokens) * 4
        lines.append(f"  train.on_policy: {op.rounds} round(s) of {op.questions} responses; during each, the teacher's "
                     f"weights ({teacher / gib:.2f} GiB) and the student's generation KV cache (~{cache / gib:.2f} GiB "
                     "at fp32) sit beside the student's weights, instead of the activations and logits above")
    peak, how = load_peak(recipe, plan)
    lines += [f"  student load: peak {peak / gib:.2f} GiB on the device ({how})",
              f"  evaluation scoring fidelity: the teacher's weights ({teacher / gib:.2f} GiB) stay while the student "
              f"loads: peak {(teacher + peak) / gib:.2f} GiB"]
    return "\n".join(lines)


def _quant_detail(cfg) -> str:
    q = quantize.quantizer(cfg)
    if q.library == "hqq":
        return f"HQQ {q.bits}-bit, group {cfg.hqq_group_size}"
    if q.library == "gguf":
        return f"llama.cpp's {q.ggml_type.upper()} blocks of 32"
    return f"bitsandbytes, double quant {cfg.double_quant}" if q.bits == 4 else "bitsandbytes LLM.int8"
