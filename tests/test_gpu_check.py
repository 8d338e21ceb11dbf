"""`make gpu-check` (benchmarks/gpu_check.py): what of it can run without a GPU."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, stand_in_overrides


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


def test_the_stand_in_takes_the_wheelhouses_compressed_tokenizer(tmp_path):
    import lzma
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    from llmkd import models
    from llmkd.transfer_set import tokenizer_sha256

    packed = tmp_path / "smollm2-tokenizer"  # as `make wheelhouse` writes it
    packed.mkdir()
    for f in models.embedded_model_dir().iterdir():
        if f.name == "tokenizer.json":
            (packed / "tokenizer.json.xz").write_bytes(lzma.compress(f.read_bytes()))
        elif f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, packed / f.name)
    out = gpu_check.random_stand_in(packed, tmp_path / "stand-in", layers=1)
    tok = models.load_tokenizer(models.ModelConfig(name=str(out)))
    assert tokenizer_sha256(tok) == tokenizer_sha256(models.load_tokenizer(models.ModelConfig(name="smollm2-135m-instruct")))


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
    files["bitsandbytes/tests/test_x.py"] = files["bitsandbytes/nn/tests/test_y.py"] = b"assert True\n"
    files["bitsandbytes/testing.py"] = b"y = 2\n"  # a module, not a test suite
    wheel, info = fake_wheel(tmp_path, "bitsandbytes", files)

    wheelhouse.slim_bitsandbytes(wheel, ["12.8"])
    assert wheelhouse.has_tests(wheel)
    wheelhouse.slim_wheel(wheel, wheelhouse.TESTS.match)
    assert not wheelhouse.has_tests(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read(f"{info}/RECORD").decode()
    libs = {n.rsplit("/", 1)[-1] for n in names if n.endswith(".so")}
    assert "bitsandbytes/testing.py" in names and not any("tests/" in n for n in names)
    assert libs == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so"}
    assert "cuda126" not in kept_record and "rocm72" not in kept_record and "cuda128" in kept_record
    pip_install(wheel, tmp_path / "site")
    assert sorted(p.name for p in (tmp_path / "site/bitsandbytes").glob("*.so")) == sorted(libs)

    with pytest.raises(SystemExit, match="no libbitsandbytes_cuda130.so"):
        wheelhouse.slim_bitsandbytes(wheel, ["13.0"])


# The check's stages (benchmarks/gpu_check.py's build, train, eval with fidelity and 8B dry run), shrunk
# to the stand-in on CPU, in a process where the wheelhouse's NEVER_IMPORTED modules cannot be imported.
STAGES_WITHOUT = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None  # `import name` raises ImportError, find_spec says not installed
from llmkd import builder, plan, train
from llmkd.config import load_recipe
from llmkd.evaluate import run_eval
recipe = load_recipe("recipes/smollm2-cpu.yaml", json.loads(sys.argv[2]))
builder.build(recipe, progress=False)
train.train(recipe, progress=False)
run = run_eval(recipe, shots=recipe.eval.shots, tags=["teacher", "student", "distilled"],
               adapter=recipe.layout.adapter, with_fidelity=True, progress=False)
print(plan.dry_run(load_recipe("recipes/gsm8k.yaml")).splitlines()[0])
print("stages done:", [a.tag for a in run.accuracy], [name for name in json.loads(sys.argv[1]) if sys.modules[name]])
"""


def test_the_checks_stages_run_without_what_the_wheelhouse_leaves_out(stand_in, scratch_dir):
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import wheelhouse

    overrides = stand_in_overrides(
        stand_in, "name=check", "transfer_set.out=", "transfer_set.response=teacher", "transfer_set.start=746", "transfer_set.count=4",
        "transfer_set.max_new_tokens=8", "train.batch_size=2", "train.max_steps=2",
        "eval.limit=1", "eval.batch_size=1", "eval.max_new_tokens=4", "eval.shots=[0]", "eval.fidelity_count=1",
        "eval.fidelity_start=1000")
    proc = subprocess.run([sys.executable, "-c", STAGES_WITHOUT, json.dumps(sorted(wheelhouse.NEVER_IMPORTED.values())),
                           json.dumps(overrides)], capture_output=True, text=True, timeout=600, cwd=scratch_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stages done: ['teacher', 'student', 'distilled'] []" in proc.stdout, proc.stdout[-2000:]


def test_the_wheelhouse_leaves_out_what_the_target_has_at_an_accepted_version(tmp_path):
    import importlib.metadata as md

    sys.path.insert(0, str(REPO / "benchmarks"))
    import wheelhouse

    needed, wanted = wheelhouse.closure(wheelhouse.CORE)
    assert {"transformers", "numpy", "bitsandbytes"} <= set(needed)
    assert not {"torch", "datasets", "pyarrow", "pandas", "hf-xet"} & set(needed)
    freeze = tmp_path / "freeze.txt"
    # numpy as installed here (accepted by every requirement); transformers older than llmkd's pin;
    # a package nothing here needs; pip's comment and editable lines.
    freeze.write_text(f"# a comment\nnumpy=={md.version('numpy')}\ntransformers==5.17.0\nrequests==2.32.0\n"
                      "-e git+https://example.org/x#egg=x\n")
    assert wheelhouse.already_there(freeze, wanted) == {"numpy": md.version("numpy")}
