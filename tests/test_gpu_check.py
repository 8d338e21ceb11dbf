"""`make gpu-check` (benchmarks/gpu_check.py): what of it can run without a GPU."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr, proc.stderr


def test_the_random_stand_in_loads_and_runs_through_llmkd(stand_in):
    # Without the embedded wheel the check builds this: the embedded tokenizer, random weights
    # (conftest's session-wide `stand_in` is gpu_check.random_stand_in's, 2 layers).
    from llmkd import models
    from llmkd.config import ModelConfig

    cfg = ModelConfig(name=str(stand_in), teacher_dtype="float32")
    tok, model = models.load_tokenizer(cfg), models.load_teacher(cfg)
    ids = tok("Question: 2+2?", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok) and model.config.num_hidden_layers == 2


def test_the_wheelhouse_keeps_only_the_wanted_cuda_kernels_and_pip_installs_the_result(tmp_path):
    # A wheel laid out as bitsandbytes' is (a library per CUDA/ROCm version, RECORD naming each file).
    import base64
    import hashlib
    import zipfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    import wheelhouse

    files = {f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 100 for v in ("cpu", "cuda126", "cuda128", "rocm72")}
    files["bitsandbytes/__init__.py"] = b"x = 1\n"
    info = "bitsandbytes-0.0.1.dist-info"
    files[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.0.1\n"
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"

    def record_line(name, data):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}"

    record = "".join(record_line(n, d) + "\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    wheel = tmp_path / "bitsandbytes-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{info}/RECORD", record)

    wheelhouse.slim_bitsandbytes(wheel, ["12.8"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read(f"{info}/RECORD").decode()
    libs = {n.rsplit("/", 1)[-1] for n in names if n.endswith(".so")}
    assert libs == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so"}
    assert "cuda126" not in kept_record and "rocm72" not in kept_record and "cuda128" in kept_record
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--target", str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "site/bitsandbytes").glob("*.so")) == sorted(libs)

    with pytest.raises(SystemExit, match="no libbitsandbytes_cuda130.so"):
        wheelhouse.slim_bitsandbytes(wheel, ["13.0"])
