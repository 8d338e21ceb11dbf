import json
import subprocess
import sys

import pytest
import torch

from llmkd import models
from llmkd.config import ModelConfig
from llmkd.errors import LlmkdError


def test_alias_resolves_to_a_complete_converted_folder():
    folder = models.embedded_model_dir()
    assert (folder / ".llmkd-complete").exists()
    assert (folder / "model.safetensors").stat().st_size > 200e6  # ~269 MB of bf16 weights
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # the GGUF marker must not follow the weights
    assert not list(folder.parent.glob(".tmp-*")), "a temporary conversion folder was left behind"
    assert models.resolve("smollm2-135m-instruct") == str(folder)


def test_local_folder_and_missing_folder(tmp_path):
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(LlmkdError, match="model folder not found: ./no/such"):
        models.resolve("./no/such")


def test_hub_id_offline_fails_in_one_line():
    # conftest sets HF_HUB_OFFLINE=1; a fresh process proves the message reaches the CLI as one line.
    proc = subprocess.run(
        [sys.executable, "-m", "llmkd", "eval", "model.name=nobody/no-such-model", "--teacher", "--limit", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-model" in lines[0] and "local" in lines[0], proc.stderr


def test_teacher_is_full_precision_on_cpu(smol_teacher):
    assert smol_teacher.dtype == torch.float32 and not smol_teacher.training


def test_student_is_nf4_with_the_recipe_settings(smol_student, smol_recipe):
    import bitsandbytes as bnb

    q_proj = smol_student.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantisation
    assert q_proj.compute_dtype == getattr(torch, smol_recipe.model.compute_dtype)


def test_adapter_folder_must_hold_an_adapter(tmp_path, smol_student):
    with pytest.raises(LlmkdError, match="no adapter_config.json"):
        models.attach_adapter(smol_student, tmp_path)


def test_teacher_dtype_auto_and_explicit():
    assert models.teacher_dtype(ModelConfig(teacher_dtype="bfloat16")) == torch.bfloat16
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert models.teacher_dtype(ModelConfig()) == expected


def test_hub_ids_with_dots_are_hub_ids_not_folders():
    assert models.resolve("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(LlmkdError, match="model folder not found"):
        models.resolve("a/b/c")


def test_dequantizing_once_gives_bitwise_the_same_logits(smol_student, smol_tokenizer):
    # bitsandbytes' CPU path dequantizes per call; reusing one dequantized copy must change nothing.
    from bitsandbytes.nn import Linear4bit

    ids = smol_tokenizer(["Natalia sold clips to 48 of her friends.", "A robe takes 2 bolts"], return_tensors="pt",
                         padding=True)
    with torch.no_grad():
        per_call = smol_student(**ids).logits
        with models.dequantized_once(smol_student):
            layers = [m for m in smol_student.modules() if isinstance(m, Linear4bit)]
            assert layers and all("forward" in vars(m) for m in layers)  # the dense path is what ran
            once = smol_student(**ids).logits
    assert torch.equal(once, per_call)
    assert not any("forward" in vars(m) for m in layers)  # restored
