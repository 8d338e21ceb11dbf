"""`train.sharding: fsdp`: llmkd shards the student itself with torch FSDP2 (`fully_shard`).

Under a multi-process launch (`accelerate launch --multi_gpu`, torchrun) each decoder layer, then
the whole model, is sharded over the default process group's device mesh (gloo on CPU, NCCL on
GPUs); accelerate prepares only the optimizer, never the model. With one process nothing is
sharded, but the student is built the same way (`train.build_student`: no fp32 upcast).

Like DDP, FSDP averages the gradients over ranks (the trainer's loss normalisation relies on it).
Gradients and optimizer state are DTensors, so clipping sees the global norm. Saving gathers the
LoRA weights and the optimizer state into full tensors on every rank's call (collectives); rank 0
writes them in the unsharded formats, so an adapter is a plain PEFT folder.

accelerate's own FSDP and DeepSpeed configs are refused: on CPU accelerate silently runs them as
DDP, and its FSDP1 wrapping cannot flatten the student's mixed dtypes.
"""

from __future__ import annotations

import contextlib
import os

import torch

from llmkd.config import Recipe
from llmkd.errors import LlmkdError

FLOATING = ("bfloat16", "float16", "float32")


def check(recipe: Recipe) -> None:
    """One-line errors for launches and recipes the trainer cannot shard (called before loading)."""
    if any(os.environ.get(v, "").lower() in ("1", "true") for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")):
        raise LlmkdError("accelerate's FSDP and DeepSpeed configs are not supported: launch with a plain multi-process "
                         "config (accelerate launch --multi_gpu, or torchrun) and set train.sharding=fsdp")
    if recipe.train.sharding != "fsdp":
        return
    m, tr = recipe.model, recipe.train
    if m.quant not in ("nf4", "fp4"):
        raise LlmkdError(f"train.sharding fsdp shards bitsandbytes 4-bit students only (model.quant nf4 or fp4), "
                         f"not model.quant {m.quant}")
    if m.quant_storage not in FLOATING:
        raise LlmkdError(f"train.sharding fsdp needs a floating-point model.quant_storage, as the peft and TRL "
                         f"FSDP-QLoRA recipes use (e.g. model.quant_storage=bfloat16), not {m.quant_storage}")
    if tr.mixed_precision == "fp16":
        raise LlmkdError("train.sharding fsdp: train.mixed_precision fp16 is not supported (its loss scaler would "
                         "see only this rank's shards); use bf16")


def shard(model, device: torch.device, world: int):
    """`fully_shard` each decoder layer (the base model's `_no_split_modules`), then the root, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise LlmkdError(f"train.sharding fsdp: no decoder layers ({', '.join(sorted(names)) or 'none declared'}) "
                         f"found in {type(model.get_base_model()).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (a sharded gradient's norm, say) as the full tensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def no_sync(model, accelerator):
    """Accumulate gradients without reducing them over ranks: FSDP2's switch, or accelerate's (DDP)."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def adapter_state_dict(model) -> dict | None:
    """The trainable (LoRA) weights as full tensors, on rank 0, for `save_pretrained(state_dict=...)`;
    None when the model is not sharded (save_pretrained reads them itself). Every rank calls it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's state dict, gathered into full tensors (keyed by parameter name) when the model
    is sharded; every rank calls it, rank 0 holds the result."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_full_options())


def load_optimizer_state_dict(model, optimizer, state: dict) -> None:
    """The counterpart of `optimizer_state_dict`: each rank keeps its shards of the full state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _torch_optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _torch_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper (whose step() must not run outside training)."""
    return getattr(optimizer, "optimizer", optimizer)
