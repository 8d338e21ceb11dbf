"""HQQ students in HQQ's own serialization, for `llmkd export`.

    config.json         the model's config with the quantization_config vLLM's HQQ loader reads
                        (transformers' HqqConfig layout: quant_method "hqq", weight_quant_params, skip_modules)
    model.safetensors   each HQQLinear's state dict as hqq encodes it for safetensors (its packed codes
                        W_q, the group scales and zeros, its settings as small tensors), and every other weight

Who loads it: vLLM on GPUs, at 4 bits with group size 64 only (HQQ Marlin); hqq itself, a layer at a time
(`HQQLinear.load_state_dict`), as `export_check.py` and the model card do. transformers 5.2x refuses
HQQ quantization configs ("not available yet"), and hqq's `from_quantized` reads a torch pickle
(qmodel.pt), which llmkd neither writes nor loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmkd.quantize import hqq_layers


def quantization_config(model) -> dict:
    """config.json's quantization_config for `model`'s HQQ layers (one setting for all: llmkd quantises so)."""
    layers = hqq_layers(model)
    settings = {json.dumps(m.quant_config["weight_quant_params"], sort_keys=True) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"HQQ layers with {len(settings)} different settings: one quantization_config cannot say them")
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {"quant_method": "hqq",
            "quant_config": {"weight_quant_params": json.loads(settings.pop()), "scale_quant_params": None,
                             "zero_quant_params": None, "offload_meta": False},
            "skip_modules": sorted({name.rsplit(".", 1)[-1] for name in linears})}  # e.g. lm_head: not quantised


def write(model, folder: Path) -> None:
    """`model` (HQQ layers, no adapter) as config.json and model.safetensors in `folder`."""
    if not hqq_layers(model):
        raise ValueError("no HQQ layer to write")
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():  # HQQLinear.state_dict: encoded, safetensors-safe
        same = (value.data_ptr(), value.shape, value.dtype)
        if same in seen and value.numel():  # a tied weight: lm_head after the embeddings it is, stored once
            continue
        seen.add(same)
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
