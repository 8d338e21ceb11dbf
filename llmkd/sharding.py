"""`train.sharding`: llmkd shards the student itself, with torch FSDP2 (`fsdp`) or DeepSpeed ZeRO-3 (`zero3`).

Under a multi-process launch (`accelerate launch --multi_gpu`, torchrun) the student's weights, LoRA's
gradients and the optimizer state are divided among the processes (gloo on CPU, NCCL on GPUs); the
student is built without the fp32 upcast of norms and embeddings, as the peft and TRL FSDP-QLoRA
recipes build it. With one process nothing is sharded, but the student is built the same way.

- fsdp: `fully_shard` each decoder layer, then the whole model; accelerate prepares only the optimizer.
  Gradients and optimizer state are DTensors, so clipping sees the global norm.
- zero3: `deepspeed.initialize` with llmkd's own config (`zero3_config`): ZeRO stage 3, the recipe's
  micro-batch and accumulation, clipping by DeepSpeed at the global norm, at most two decoder layers'
  parameters gathered at a time (what the dry run plans for both). The trainer marks the last
  micro-batch of each step as the accumulation boundary and steps the engine once, after its own
  non-finite check on the global gradient norm (gathered here), so a bad step never updates.

Both average the gradients over ranks like DDP (the trainer's loss normalisation relies on it).
Saving gathers the LoRA weights and the optimizer state into full tensors keyed by parameter name on
every rank's call (collectives); rank 0 writes them, so an adapter is a plain PEFT folder.

accelerate's own FSDP and DeepSpeed configs are refused: on CPU accelerate silently runs them as
DDP, its FSDP1 wrapping cannot flatten the student's mixed dtypes, and its DeepSpeed `backward` steps
the optimizer before the trainer's non-finite check.
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
                         "config (accelerate launch --multi_gpu, or torchrun) and set train.sharding=fsdp or zero3")
    m, tr = recipe.model, recipe.train
    if tr.sharding == "none":
        return
    what = f"train.sharding {tr.sharding}"
    if m.quant not in ("nf4", "fp4"):
        raise LlmkdError(f"{what} shards bitsandbytes 4-bit students only (model.quant nf4 or fp4), "
                         f"not model.quant {m.quant}")
    if m.quant_storage not in FLOATING:
        raise LlmkdError(f"{what} needs a floating-point model.quant_storage, as the peft and TRL "
                         f"FSDP-QLoRA recipes use (e.g. model.quant_storage=bfloat16), not {m.quant_storage}")
    if tr.mixed_precision == "fp16":
        raise LlmkdError(f"{what}: train.mixed_precision fp16 is not supported (its loss scaler would "
                         "see only this rank's shards); use bf16")
    if tr.sharding == "zero3":
        if tr.optimizer == "sgd" and tr.weight_decay > 0:
            raise LlmkdError("train.sharding zero3: train.weight_decay with train.optimizer sgd is applied by llmkd to "
                             "whole parameters, which ZeRO-3 partitions; use train.optimizer adamw or weight_decay 0")
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise LlmkdError("train.sharding zero3 needs DeepSpeed: pip install 'llmkd[zero3]' (or deepspeed)")


def decoder_layers(model, what: str) -> list:
    """The decoder layers (the base model's `_no_split_modules`): the units that are gathered whole."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise LlmkdError(f"train.sharding {what}: no decoder layers ({', '.join(sorted(names)) or 'none declared'}) "
                         f"found in {type(model.get_base_model()).__name__}")
    return layers


def shard_fsdp(model, device: torch.device, world: int):
    """`fully_shard` each decoder layer (the base model's `_no_split_modules`), then the root, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model, "fsdp"):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def zero3_config(tr, world: int, layer_params: int) -> dict:
    """llmkd's DeepSpeed config: ZeRO-3 with the recipe's batch shape and clipping, gathering at most two
    decoder layers' parameters at a time (as FSDP2 here; what the dry run plans). Precision stays
    llmkd's: accelerate's autocast around the forward, the parameters in the compute dtype."""
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.batch_size * tr.grad_accum * world,
        "gradient_clipping": tr.max_grad_norm or 0.0,
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 2 * layer_params,
                              "stage3_prefetch_bucket_size": layer_params},
        "zero_allow_untested_optimizer": True,  # the recipe's torch AdamW or SGD, stepped on each rank's partition
        "steps_per_print": 2**31 - 1,
    }


def name_deepspeed_device() -> None:
    """Tell DeepSpeed this process's device before it is imported (accelerate imports it wherever it is
    installed): it otherwise guesses, with a warning on CPU."""
    from llmkd import models

    os.environ.setdefault("DS_ACCELERATOR", models.device().type)


def shard_zero3(model, optimizer, tr, world: int):
    """(engine, its ZeRO-3 optimizer): `model`'s parameters and `optimizer`'s state partitioned."""
    name_deepspeed_device()
    import deepspeed

    from llmkd import models

    if models.device().type == "cpu":
        # CPU ranks (the stand-ins) all-reduce through gloo; DeepSpeed would otherwise compile its
        # shared-memory op at first use, for each install (about 35 s, and it needs g++ and ninja).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    layer_params = max(sum(p.numel() for p in m.parameters()) for m in decoder_layers(model, "zero3"))
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                                        config=zero3_config(tr, world, layer_params))
    return engine, zero_optimizer


def is_zero3(model) -> bool:
    import sys

    ds = sys.modules.get("deepspeed")  # no engine exists before deepspeed is imported
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or is_zero3(model)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (a sharded gradient's norm, say) as the full tensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def no_sync(model, accelerator):
    """Accumulate gradients without reducing them over ranks: FSDP2's switch, or accelerate's (DDP).
    ZeRO-3 reduces every micro-batch's gradients into the partitions (the same sum)."""
    if is_zero3(model):
        yield
        return
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def backward(model, accelerator, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's loss; `last`: the step's last micro-batch (ZeRO-3's boundary)."""
    if not is_zero3(model):
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(last)
    model.backward(loss, scale_wrt_gas=False)  # the loss is already normalised by the step's tokens


def clip_grad_norm(model, accelerator, params, max_norm: float | None) -> float:
    """The global gradient norm before clipping; clips to max_norm (None: only measures). Under ZeRO-3
    the norm is gathered here and DeepSpeed clips inside `optimizer_step` (zero3_config)."""
    if is_zero3(model):
        from deepspeed.utils import safe_get_full_grad

        total = sum(float(safe_get_full_grad(p).double().pow(2).sum()) for p in params)
        return total ** 0.5
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(full(norm))  # sharded gradients: a DTensor of the global norm


def optimizer_step(model, optimizer) -> None:
    """The optimizer's update, then the gradients cleared (the ZeRO-3 engine does both)."""
    if is_zero3(model):
        model.step()
        return
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainable(model) -> dict:
    """{name: parameter} of the trainable (LoRA) parameters, named as in the PEFT model's state dict."""
    inner = model.module if is_zero3(model) else model
    return {n: p for n, p in inner.named_parameters() if p.requires_grad}


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def adapter_state_dict(model) -> dict | None:
    """The trainable (LoRA) weights as full tensors, on rank 0, for `save_pretrained(state_dict=...)`;
    None when the model is not sharded (save_pretrained reads them itself). Every rank calls it."""
    if is_zero3(model):
        import deepspeed

        params = trainable(model)
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().cpu().clone() for n, p in params.items()}
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's state dict, gathered into full tensors (keyed by parameter name) when the model
    is sharded; every rank calls it, rank 0 holds the result. Under ZeRO-3 each parameter's entry also
    holds its fp32 master copy (`fp32`), which DeepSpeed keeps apart from the model's weights."""
    if is_zero3(model):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner = optimizer.optimizer  # the torch optimizer under ZeRO-3's, on this rank's flat partitions
        keys = sorted({k for st in inner.state.values() for k in st if k != "step"})
        steps = {"step": st["step"] for st in inner.state.values() if "step" in st}  # one count for all
        params = trainable(model)
        return {
            "state": {n: {**steps, "fp32": safe_get_full_fp32_param(p).cpu(),
                          **{k: safe_get_full_optimizer_state(p, k).cpu() for k in keys}} for n, p in params.items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(params)}
                             for g in inner.param_groups],
        }
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_full_options())


def load_optimizer_state_dict(model, optimizer, state: dict) -> None:
    """The counterpart of `optimizer_state_dict`: each rank keeps its shards of the full state."""
    if is_zero3(model):
        _load_zero3(model, optimizer, state)
        return
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _torch_optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _load_zero3(model, optimizer, state: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = optimizer.optimizer
    params = trainable(model)
    entries = state.get("state", {})
    if set(entries) != set(params) or any("fp32" not in e for e in entries.values()):
        raise LlmkdError("the checkpoint's optimizer state is not a ZeRO-3 one of this model's LoRA parameters")
    for group, saved in zip(inner.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k in group and k != "params"})
    first = next(iter(entries.values()))
    keys = [k for k in first if k not in ("fp32", "step")]
    # Torch makes the state at the first step; DeepSpeed's setters fill this rank's partitions of it.
    for flat in optimizer.fp32_partitioned_groups_flat:
        entry = inner.state[flat]
        for k in keys:
            entry.setdefault(k, torch.zeros_like(flat))
        if "step" in first:
            entry["step"] = first["step"].clone()
    for n, p in params.items():
        safe_set_full_fp32_param(p, entries[n]["fp32"])
        for k in keys:
            safe_set_full_optimizer_state(p, entries[n][k], k)


def _torch_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper (whose step() must not run outside training)."""
    return getattr(optimizer, "optimizer", optimizer)
