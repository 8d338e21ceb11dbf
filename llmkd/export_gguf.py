"""GGUF files of a GGUF student (`model.quant: gguf-*`) and its adapter, as llama.cpp loads them.

- The base: the student's linear layers as the very blocks it trained against (`GGUFLinear.weight`,
  written unchanged), the rest (embeddings, norms, an untied lm_head) in the student's own dtype, 1-D
  tensors in F32 as llama.cpp's converter writes them. `f32=True` writes every tensor in F32, the
  blocks dequantized: the same weights in exact arithmetic, for the gate's exact check.
- The adapter: peft's lora_A / lora_B as llama.cpp's `--lora` file (`general.type = adapter`,
  `adapter.lora.alpha`), applied at run time on the quantised base, so its correction survives.
- Metadata: the hyperparameters from the model's config (what llmkd ran), the chat template llmkd
  rendered with, and the tokenizer copied from a GGUF of the same model: the embedded default's own
  file, or `--gguf-metadata FILE` for other models (llama.cpp's `convert_hf_to_gguf.py` writes one).

Llama-architecture models only. llama.cpp permutes the rows of attn_q and attn_k against
transformers' order (its rotary embedding pairs neighbouring dimensions); the base's rows and
lora_B's rows are permuted as its converter does. Quantisation blocks run along a row, so a
permutation of rows moves whole rows of blocks and changes no byte.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from llmkd.errors import LlmkdError
from llmkd.gguf_quant import GGUFLinear, ggml_type

ARCHITECTURE = "llama"
# transformers' Llama names (after "model.layers.N.") -> llama.cpp's (after "blk.N.")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# llama.cpp's file type per block type ("mostly", 1-D tensors excepted)
_FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a transformers Llama module path (without ".weight"), or None."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def permute_rows(rows, n_head: int):
    """llama.cpp's order of attn_q / attn_k rows from transformers' (its converter's `permute`)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _heads(config, gguf: str) -> int | None:
    """Heads whose rows `gguf` (a base tensor name) permutes, or None."""
    if gguf.endswith(".attn_q"):
        return config.num_attention_heads
    if gguf.endswith(".attn_k"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def check_architecture(config) -> None:
    if getattr(config, "model_type", None) != ARCHITECTURE:
        raise LlmkdError(f"--to gguf: llmkd writes Llama-architecture GGUF files; this model is "
                         f"{getattr(config, 'model_type', '?')!r}")


def _write_metadata(writer, source: Path, config, chat_template: str | None) -> None:
    """The model's hyperparameters, from its config (what llmkd ran), and its tokenizer, from `source`."""
    from gguf import GGUFReader, GGUFValueType

    writer.add_name(str(getattr(config, "_name_or_path", "") or "llmkd student").rstrip("/").split("/")[-1])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)

    reader = GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise LlmkdError(f"{source}: holds no tokenizer (tokenizer.ggml.tokens); give a GGUF of this very model")
    if len(tokens.data) != config.vocab_size:
        raise LlmkdError(f"{source}: its tokenizer has {len(tokens.data):,} tokens, the model {config.vocab_size:,}; "
                         "give a GGUF of this very model")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or (key == "tokenizer.chat_template" and chat_template):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
    if chat_template:  # the template llmkd rendered the data with (model.chat_template or the tokenizer's)
        writer.add_chat_template(chat_template)


def _rope(config) -> dict:
    """The config's rope parameters (transformers 5: `rope_parameters`), refusing what llama.cpp's Llama lacks."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "llama3"):
        raise LlmkdError(f"--to gguf: rope_type {kind!r} is not written by llmkd (default and llama3 are)")
    return rope


def rope_factors(config) -> np.ndarray | None:
    """Llama 3.1's frequency factors (rope_type llama3), the `rope_freqs` tensor llama.cpp's converter writes."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _array(t: torch.Tensor):
    """(numpy array, raw GGML type or None) for a float tensor as stored: bf16 as its raw bits."""
    from gguf import GGMLQuantizationType

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), GGMLQuantizationType.BF16
    if t.dtype == torch.float16:
        return t.numpy(), None
    return t.float().numpy(), None


def write_base(model, path: Path, metadata: Path, qtype: str, *, chat_template: str | None = None,
               f32: bool = False) -> None:
    """The GGUF student `model` (its base layers: a LoRA injected by peft is left out) as one GGUF file at
    `path`, its tokenizer from the GGUF `metadata`."""
    from gguf import GGUFWriter

    config = model.config
    check_architecture(config)
    writer = GGUFWriter(str(path), ARCHITECTURE)
    _write_metadata(writer, metadata, config, chat_template)
    writer.add_file_type(0 if f32 else _FILE_TYPES[qtype])
    writer.add_quantization_version(2)
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    for name, module in model.named_modules():
        gguf = gguf_name(name)
        if gguf is None or (module is head and tied):
            continue
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under a LoRA layer
        heads = _heads(config, gguf)
        if isinstance(module, GGUFLinear):
            if f32:
                data, raw = module.dequantize().numpy(), None
            else:
                data, raw = module.weight.cpu().numpy(), ggml_type(module.qtype)
        else:
            weight = module.weight.detach()
            data, raw = (weight.float().cpu().numpy(), None) if f32 or weight.dim() == 1 else _array(weight)
        if heads is not None:
            data = permute_rows(data, heads)
        writer.add_tensor(f"{gguf}.weight", np.ascontiguousarray(data), raw_dtype=raw)
        if getattr(module, "bias", None) is not None:
            writer.add_tensor(f"{gguf}.bias", module.bias.detach().float().cpu().numpy())
    _write(writer)


def lora_alpha(adapter_config: dict, rank: int) -> float:
    """llama.cpp scales an adapter by alpha / rank: the alpha that gives peft's own scaling."""
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern") or adapter_config.get("use_dora"):
        raise LlmkdError("--to gguf: the adapter has per-module ranks or alphas, or DoRA, which llama.cpp's LoRA "
                         "files do not hold")
    alpha = float(adapter_config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
    return scaling * rank


def write_lora(adapter: Path, path: Path, config, *, f32: bool = True) -> None:
    """The peft adapter folder `adapter` as llama.cpp's LoRA file at `path` (tensors in F32)."""
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    check_architecture(config)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        gguf = gguf_name(m.group(1)) if m else None
        if gguf is None:
            raise LlmkdError(f"--to gguf: the adapter holds {key}, which llama.cpp's LoRA files cannot apply "
                             "(LoRA on the decoder's linear layers only)")
        pairs.setdefault(gguf, {})[m.group(2)] = value.float()
    ranks = {int(p["A"].shape[0]) for p in pairs.values()}
    if len(ranks) != 1:
        raise LlmkdError(f"--to gguf: the adapter mixes ranks {sorted(ranks)}")
    writer = GGUFWriter(str(path), ARCHITECTURE)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", lora_alpha(adapter_config, ranks.pop()))
    for gguf, pair in sorted(pairs.items()):
        b = pair["B"].numpy()
        heads = _heads(config, gguf)
        if heads is not None:
            b = permute_rows(b, heads)
        writer.add_tensor(f"{gguf}.weight.lora_a", np.ascontiguousarray(pair["A"].numpy()))
        writer.add_tensor(f"{gguf}.weight.lora_b", np.ascontiguousarray(b))
    _write(writer)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
