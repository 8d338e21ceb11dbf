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


def fake_wheel(folder, name, files):
    """A wheel holding `files` ({path: bytes}) and a RECORD naming each, as pip checks it."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-0.0.1.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}

    def record_line(path, data):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    record = "".join(record_line(n, d) + "\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    wheel = folder / f"{name}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{info}/RECORD", record)
    return wheel, info


def pip_install(wheel, site):
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_wheelhouse_keeps_only_the_wanted_cuda_kernels_and_pip_installs_the_result(tmp_path):
    # A wheel laid out as bitsandbytes' is (a library per CUDA/ROCm version).
    import zipfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    import wheelhouse

    files = {f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 100 for v in ("cpu", "cuda126", "cuda128", "rocm72")}
    files["bitsandbytes/__init__.py"] = b"x = 1\n"
    wheel, info = fake_wheel(tmp_path, "bitsandbytes", files)

    wheelhouse.slim_bitsandbytes(wheel, ["12.8"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read(f"{info}/RECORD").decode()
    libs = {n.rsplit("/", 1)[-1] for n in names if n.endswith(".so")}
    assert libs == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so"}
    assert "cuda126" not in kept_record and "rocm72" not in kept_record and "cuda128" in kept_record
    pip_install(wheel, tmp_path / "site")
    assert sorted(p.name for p in (tmp_path / "site/bitsandbytes").glob("*.so")) == sorted(libs)

    with pytest.raises(SystemExit, match="no libbitsandbytes_cuda130.so"):
        wheelhouse.slim_bitsandbytes(wheel, ["13.0"])


def test_the_wheelhouse_drops_pyarrow_parts_llmkd_never_loads_and_keeps_what_it_links(tmp_path):
    # pyarrow 26's layout: what the extension modules link (readelf NEEDED) is the .so.2600 of each library.
    import zipfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    import wheelhouse

    kept = ["pyarrow/__init__.py", "pyarrow/fs.py", "pyarrow/lib.cpython-312-x86_64-linux-gnu.so",
            "pyarrow/_parquet.cpython-312-x86_64-linux-gnu.so", "pyarrow/libarrow.so.2600", "pyarrow/libparquet.so.2600",
            "pyarrow/libarrow_python.so.2600", "pyarrow/libarrow_python_parquet_encryption.so.2600",
            "pyarrow/includes/libarrow.pxd", "pyarrow/vendored/version.py"]
    dropped = ["pyarrow/libarrow_flight.so.2600", "pyarrow/_flight.cpython-312-x86_64-linux-gnu.so", "pyarrow/flight.py",
               "pyarrow/libarrow_python_flight.so.2600", "pyarrow/libarrow_s3.so.2600", "pyarrow/_s3fs.pyx",
               "pyarrow/_s3fs.cpython-312-x86_64-linux-gnu.so", "pyarrow/libarrow_python.so",
               "pyarrow/libarrow_python.so.2600.1.0", "pyarrow/include/arrow/api.h", "pyarrow/src/arrow/python/io.cc",
               "pyarrow/tests/test_io.py", "pyarrow/_pyarrow_cpp_tests.cpython-312-x86_64-linux-gnu.so"]
    wheel, info = fake_wheel(tmp_path, "pyarrow", {n: n.encode() for n in kept + dropped})
    wheelhouse.slim_pyarrow(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert sorted(n for n in z.namelist() if not n.startswith(info)) == sorted(kept)
        recorded = {line.split(",", 1)[0] for line in z.read(f"{info}/RECORD").decode().splitlines()}
        assert recorded == set(z.namelist())
    pip_install(wheel, tmp_path / "site")
    assert (tmp_path / "site/pyarrow/libarrow_python.so.2600").is_file()


def test_the_wheelhouse_leaves_out_what_the_target_has_at_an_accepted_version(tmp_path):
    import importlib.metadata as md

    sys.path.insert(0, str(REPO / "benchmarks"))
    import wheelhouse

    needed, wanted = wheelhouse.closure(wheelhouse.CORE)
    assert {"transformers", "numpy", "pyarrow"} <= set(needed) and "torch" not in needed
    freeze = tmp_path / "freeze.txt"
    # numpy as installed here (accepted by every requirement); transformers older than llmkd's pin;
    # a package nothing here needs; pip's comment and editable lines.
    freeze.write_text(f"# a comment\nnumpy=={md.version('numpy')}\ntransformers==5.17.0\nrequests==2.32.0\n"
                      "-e git+https://example.org/x#egg=x\n")
    assert wheelhouse.already_there(freeze, wanted) == {"numpy": md.version("numpy")}
