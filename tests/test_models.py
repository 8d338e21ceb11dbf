import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from llmkd import models, quantize
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


def test_teacher_is_loaded_in_the_recipe_dtype_in_eval_mode(smol_teacher, smol_recipe):
    assert smol_teacher.dtype == models.teacher_dtype(smol_recipe.model) == torch.float32
    assert not smol_teacher.training


def test_no_hub_kernels_are_swapped_in(smol_teacher, smol_student):
    # transformers' from_pretrained kernelizes by default (hub kernels on GPUs, nothing on CPU):
    # both models must compute with their own torch modules wherever they run.
    assert smol_teacher.use_kernels is False and smol_student.use_kernels is False


def test_student_is_nf4_with_the_recipe_settings(smol_student, smol_recipe):
    import bitsandbytes as bnb

    q_proj = smol_student.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.compute_dtype == models.compute_dtype(smol_recipe.model)
    # What runs, as the summaries report it: on CPUs with AVX512-BF16 bitsandbytes repacks the
    # layers at the first inference forward (double-quantised constants expanded to fp32), so the
    # report reads the settings the values were quantised with, not the storage of the moment.
    report = quantize.quantization_report(smol_student)
    assert report["linear4bit_layers"] == 7 * smol_student.config.num_hidden_layers
    assert report["quant_type"] == ["nf4"] and report["double_quant"] == [True]
    assert report["compute_dtype"] == [str(models.compute_dtype(smol_recipe.model)).removeprefix("torch.")]


def test_adapter_folder_must_hold_an_adapter(tmp_path, smol_student):
    with pytest.raises(LlmkdError, match="no adapter_config.json"):
        models.attach_adapter(smol_student, tmp_path)


def test_teacher_dtype_auto_and_explicit():
    assert models.teacher_dtype(ModelConfig(teacher_dtype="bfloat16")) == torch.bfloat16
    assert models.compute_dtype(ModelConfig(compute_dtype="float32")) == torch.float32
    probe = models.cpu_matmul_probe()
    expected = torch.bfloat16 if torch.cuda.is_available() else getattr(torch, probe["choice"])
    assert models.teacher_dtype(ModelConfig()) == models.compute_dtype(ModelConfig()) == expected


@pytest.mark.parametrize("bf16, fp32, choice", [(780.0, 220.0, "bfloat16"), (1.3, 144.0, "float32"),
                                                (230.0, 220.0, "float32")])
def test_auto_dtype_follows_the_cpu_probe_measured_once(tmp_path, monkeypatch, bf16, fp32, choice):
    # The two machines of this project: AMX (bf16 3-4x faster) and one where bf16 is 100x slower.
    monkeypatch.setenv("LLMKD_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_matmul_gflops", lambda dtype: bf16 if dtype == torch.bfloat16 else fp32)
    assert models.cpu_matmul_probe()["choice"] == choice
    monkeypatch.setattr(models, "_matmul_gflops", lambda dtype: 1 / 0)  # the recorded result is reused
    assert models.cpu_matmul_probe()["choice"] == choice
    if not torch.cuda.is_available():
        assert models.compute_dtype(ModelConfig()) == getattr(torch, choice)


def test_the_probe_is_recorded_per_bf16_instruction_set(tmp_path, monkeypatch):
    # Two machine kinds here are both "AMD EPYC": one with AVX512-BF16 (bf16 2.5x fp32), one without.
    monkeypatch.setenv("LLMKD_CACHE", str(tmp_path))
    cpuinfo = {"with": ["model name\t: AMD EPYC", "flags\t\t: fpu avx512f avx512_bf16"],
               "without": ["model name\t: AMD EPYC", "flags\t\t: fpu avx2"]}
    rates = {"with": {torch.bfloat16: 386.0, torch.float32: 152.0}, "without": {torch.bfloat16: 1.3, torch.float32: 144.0}}
    for kind, choice in [("with", "bfloat16"), ("without", "float32"), ("with", "bfloat16")]:
        monkeypatch.setattr(models, "_read_lines", lambda path, kind=kind: cpuinfo[kind])
        monkeypatch.setattr(models, "_matmul_gflops", lambda dtype, kind=kind: rates[kind][dtype])
        probe = models.cpu_matmul_probe()
        assert probe["choice"] == choice and ("avx512_bf16" in probe["cpu"]) == (kind == "with")


def test_hub_ids_with_dots_are_hub_ids_not_folders():
    assert models.resolve("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(LlmkdError, match="model folder not found"):
        models.resolve("a/b/c")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dequantizing_once_gives_bitwise_the_same_logits(smol_recipe, smol_tokenizer, mode):
    # Where bitsandbytes dequantizes per call, one dequantized copy must change nothing; where it runs
    # its own fused CPU kernel (AVX512-BF16, inference only) the fast path must stand aside, and say so.
    # A student of its own: bitsandbytes repacks a layer for that kernel at its first inference forward,
    # for good, so a shared student would have no layer left that dequantizes per call.
    from bitsandbytes.nn import Linear4bit

    from llmkd import fastpath

    smol_student = models.load_student(smol_recipe.model)
    ids = smol_tokenizer(["Natalia sold clips to 48 of her friends.", "A robe takes 2 bolts"], return_tensors="pt",
                         padding=True)
    layers = [m for m in smol_student.modules() if isinstance(m, Linear4bit)]
    fused = getattr(layers[0], "support_avx512bf16_for_cpu", False) and mode == "eval"
    smol_student.train(mode == "train")
    try:
        with torch.no_grad():
            per_call = smol_student(**ids).logits
            with fastpath.dequantized_once(smol_student) as status:
                assert status["dequantized_once"] == (0 if fused else len(layers)), status
                assert all(("forward" in vars(m)) == (not fused) for m in layers)  # the dense path is what ran
                once = smol_student(**ids).logits
            with fastpath.dequantized_once(smol_student, enabled=False) as off:
                assert off == {"dequantized_once": 0, "reason": "fast_paths off"}
                assert not any("forward" in vars(m) for m in layers)
    finally:
        smol_student.eval()
    assert torch.equal(once, per_call)
    assert not any("forward" in vars(m) for m in layers)  # restored


def test_file_hash_is_computed_once_per_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKD_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * (2 << 20))
    first = models.recorded_sha256(f)
    stat = f.stat()
    f.write_bytes(b"b" * (2 << 20))  # same size; put the old mtime back: the recorded digest is reused
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert models.recorded_sha256(f) == first
    assert models.sha256_file(f) == hashlib.sha256(b"b" * (2 << 20)).hexdigest()  # verification reads the bytes
    f.write_bytes(b"b" * (2 << 20))  # a new mtime: hashed again
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert models.recorded_sha256(f) == hashlib.sha256(b"b" * (2 << 20)).hexdigest() != first
