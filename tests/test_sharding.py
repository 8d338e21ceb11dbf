"""train.sharding fsdp and zero3: two FSDP2 or DeepSpeed ZeRO-3 ranks (gloo, CPU) on a 2-layer random stand-in
of the embedded model, against one process accumulating the same batches; gathered adapter and checkpoints;
resume; refusals.

fp32 throughout (compute and the 4-bit storage): the sharded and the plain run compute the same function,
so their curves agree up to the order in which gloo sums the ranks' gradients.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, STAND_IN_INIT, STAND_IN_MODEL, STAND_IN_SET
from llmkd import checkpoint, sharding, train
from llmkd.config import load_recipe
from llmkd.errors import LlmkdError
from test_train import adapter_tensors, curve

RECIPE = REPO / "recipes/smollm2-cpu.yaml"
EXACT = ("step", "epoch", "tokens", "input_tokens")
CLOSE = ("loss", "ce", "lr", "grad_norm")  # equal up to the order in which gloo sums the ranks' gradients


def overrides(stand_in, transfer_set, out, *extra) -> list[str]:
    return [
        f"model.name={stand_in}", *STAND_IN_MODEL, *STAND_IN_INIT, "model.quant_storage=float32",
        *STAND_IN_SET, f"transfer_set.out={transfer_set}",
        "train.batch_size=1", "train.max_steps=3", "train.checkpoint_every=1", "train.optimizer=adamw",
        "train.lr=1e-3", "train.warmup_steps=1", f"train.out={out}",
        "train.loss.alpha=0.5",  # with CE: on random weights teacher and 4-bit student agree almost exactly
        *extra,
    ]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch_two_ranks(args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 llmkd/train.py RECIPE ARGS`: two gloo ranks on CPU."""
    with socket.socket() as sock:  # a free port: other jobs on the machine may use accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "llmkd/train.py", str(RECIPE), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels as this process
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def transfer_set(stand_in_transfer_set):
    """conftest's stand-in transfer set: the settings of overrides() below."""
    return stand_in_transfer_set


SHARDED_BY = {"fsdp": "FSDP2", "zero3": "ZeRO-3"}
# The adapter after 3 AdamW steps, against one process's: FSDP2 within 1e-5 (5.7e-7 measured). ZeRO-3
# reduces and clips in its own order, and where an element's gradient is at rounding level Adam's
# normalised step follows the rounding: 4.5e-6 measured on one machine, but 1.4e-3 for 3 elements of
# 24576 on another. So for ZeRO-3 all but 1 in 1000 elements must be within 1e-4, and every element
# within Adam's bound: two runs stepping apart by at most lr each (1.004 lr with bias correction) on 3 steps.
ADAPTER_ATOL = {"fsdp": 1e-5, "zero3": 1e-4}
ADAM_BOUND = 2 * 3 * 1e-3 * 1.01


@pytest.fixture(scope="module", params=["fsdp", "zero3"])
def sharded_run(request, stand_in, transfer_set, tmp_path_factory):
    """(sharding, run folder): 3 steps on 2 ranks, each accumulating 2 micro-batches of 1 example,
    gradient checkpointing on, a checkpoint after every step."""
    kind = request.param
    out = tmp_path_factory.mktemp(kind) / "run"
    proc = launch_two_ranks(overrides(stand_in, transfer_set, out, f"train.sharding={kind}", "train.grad_accum=2",
                                      "train.gradient_checkpointing=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"(MULTI_CPU, the student sharded by {SHARDED_BY[kind]}); effective batch 1 x 2 x 2 = 4" in proc.stdout, \
        proc.stdout
    assert "shm_comm_op" not in proc.stdout  # gloo all-reduces: DeepSpeed compiles and loads no op of its own
    return kind, out


@pytest.fixture(scope="module")
def single_run(stand_in, transfer_set, tmp_path_factory):
    """The same 3 steps in one process (sharding none), accumulating the two ranks' batches."""
    single = tmp_path_factory.mktemp("single") / "run"
    train.train(load_recipe(RECIPE, overrides(stand_in, transfer_set, single, "train.grad_accum=4")), progress=False)
    return single


def test_two_sharded_ranks_equal_one_process_accumulating_their_batches(stand_in, sharded_run, single_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kind, sharded_run = sharded_run
    single = single_run
    for a, b in zip(rows(sharded_run), rows(single), strict=True):
        assert [a[k] for k in EXACT] == [b[k] for k in EXACT]
        assert [a[k] for k in CLOSE] == pytest.approx([b[k] for k in CLOSE], rel=1e-5)  # grad_norm: the global norm
        # kl is tiny here (teacher and student nearly agree): a difference of two losses, so as close as they are
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5 * b["loss"])
    x, y = adapter_tensors(sharded_run / "adapter"), adapter_tensors(single / "adapter")
    assert x.keys() == y.keys() and len(x) == 2 * 7 * 2  # lora_A and lora_B of 7 modules in 2 layers
    for k in x:
        assert x[k].shape == y[k].shape, k  # gathered, not a shard
        diff = (x[k] - y[k]).abs()
        if kind == "fsdp":
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=ADAPTER_ATOL[kind])
        else:
            assert (diff > ADAPTER_ATOL[kind]).float().mean() < 1e-3, (k, diff.max())
            assert diff.max() <= ADAM_BOUND, (k, diff.max())
    summary = json.loads((sharded_run / "summary.json").read_text())
    assert summary["fast_paths"]["dequantized_once"] == 0 and "sharded" in summary["fast_paths"]["reason"]
    assert summary["student_quantization"]["quant_type"] == ["nf4"]

    # Checkpoints hold full tensors too: the last one's adapter is the final adapter, its optimizer state whole.
    last = sharded_run / "checkpoints" / "step-000003"
    ckpt = adapter_tensors(last)
    assert ckpt.keys() == x.keys() and all(torch.equal(ckpt[k], x[k]) for k in x)
    state = torch.load(last / "optimizer.pt", weights_only=True)["state"]
    assert len(state) == len(x)
    for name, s in state.items():  # keyed by parameter name: the adapter's key with peft's adapter name
        assert s["exp_avg"].shape == s["exp_avg_sq"].shape == x[name.replace(".default.", ".")].shape, name
        assert float(s["step"]) == 3
        if kind == "zero3":  # DeepSpeed's fp32 master weights, which the adapter is a copy of here (fp32)
            assert torch.equal(s["fp32"], x[name.replace(".default.", ".")])

    # A plain PEFT adapter: it loads with peft on a freshly quantised base (default uint8 storage).
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(stand_in), quantization_config=nf4, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(sharded_run / "adapter"))
    files = load_file(str(sharded_run / "adapter" / "adapter_model.safetensors"))
    weights = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert weights.keys() == files.keys() and all(torch.equal(weights[k], files[k]) for k in files)


def test_two_sharded_ranks_resume_to_the_uninterrupted_run(stand_in, transfer_set, sharded_run, tmp_path):
    kind, sharded_run = sharded_run
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded_run, resumed)  # as if killed after the checkpoint of step 2
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "adapter")
    (resumed / "summary.json").unlink()
    args = overrides(stand_in, transfer_set, resumed, f"train.sharding={kind}", "train.grad_accum=2",
                     "train.gradient_checkpointing=true")
    proc = launch_two_ranks([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout
    assert curve(resumed) == curve(sharded_run)  # bitwise: the same ranks and kernels
    a, b = adapter_tensors(resumed / "adapter"), adapter_tensors(sharded_run / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # What cannot resume is refused in one line: another process count, another sharding.
    with pytest.raises(LlmkdError, match="processes was 2, now 1"):
        train.setup(load_recipe(RECIPE, args), resume=True)
    last = checkpoint.latest(resumed / "checkpoints")
    recipe = load_recipe(RECIPE, overrides(stand_in, transfer_set, resumed, "train.grad_accum=2"))
    with pytest.raises(LlmkdError, match=f"train.sharding was '{kind}', now 'none'"):
        checkpoint.check_resumable(checkpoint.read_state(last), recipe, checkpoint.read_state(last)["transfer_set"], 2,
                                   last)


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
@pytest.mark.parametrize("override, message", [
    ("model.quant_storage=uint8", "needs a floating-point model.quant_storage"),
    ("model.quant=hqq4", "model.quant nf4 or fp4"),
    ("train.mixed_precision=fp16", "fp16 is not supported"),
])
def test_what_sharding_cannot_shard_is_a_one_line_error(kind, override, message):
    recipe = load_recipe(RECIPE, [f"train.sharding={kind}", "model.quant_storage=bfloat16", override])
    with pytest.raises(LlmkdError, match=f"train.sharding {kind}.*{message}"):
        sharding.check(recipe)
    sharding.check(load_recipe(RECIPE, [f"train.sharding={kind}", "model.quant_storage=bfloat16"]))


def test_zero3_refuses_what_it_cannot_do_in_one_line(monkeypatch):
    base = ["train.sharding=zero3", "model.quant_storage=bfloat16"]
    with pytest.raises(LlmkdError, match="weight_decay with train.optimizer sgd"):
        sharding.check(load_recipe(RECIPE, [*base, "train.optimizer=sgd", "train.weight_decay=0.01"]))
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(LlmkdError, match=r"needs DeepSpeed: pip install 'llmkd\[zero3\]'"):
        sharding.check(load_recipe(RECIPE, base))


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerates_own_sharding_configs_are_refused(monkeypatch, variable):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch --config_file` sets for them
    with pytest.raises(LlmkdError, match="set train.sharding=fsdp"):
        sharding.check(load_recipe(RECIPE))


def test_the_dry_run_divides_what_fsdp_shards_among_the_processes(capsys, monkeypatch):
    """Per process under FSDP: 1/N of the student's weights and of LoRA's state, two whole layers
    gathered, the rest whole; plain DDP replicates everything, so N does not change its estimate."""
    from llmkd import cli, plan

    fsdp = load_recipe(REPO / "recipes/gsm8k.yaml", ["train.sharding=fsdp", "model.quant_storage=bfloat16"])
    model = plan.plan_model(fsdp)

    def rows(recipe, n):
        return {name.split(" / ")[0]: b for name, b, _ in plan.memory_estimate(recipe, model, 600, 300, n)}

    one, four = rows(fsdp, 1), rows(fsdp, 4)
    weights = "nf4 weights + quant constants"
    assert four[weights] == pytest.approx(one[weights] / 4)
    assert four["LoRA weights + grads + optimizer"] == pytest.approx(one["LoRA weights + grads + optimizer"] / 4)
    layer = model.quantized_bytes / model.config.num_hidden_layers
    assert four["decoder layers all-gathered (2 at a time)"] == pytest.approx(2 * layer)
    assert "decoder layers all-gathered (2 at a time)" not in one
    zero3 = load_recipe(REPO / "recipes/gsm8k.yaml", ["train.sharding=zero3", "model.quant_storage=bfloat16"])
    assert rows(zero3, 4) == four  # llmkd's ZeRO-3 config gathers as FSDP2 does
    for part in ("activations", "logits + their gradient"):
        assert four[part] == one[part]
    ddp = load_recipe(REPO / "recipes/gsm8k.yaml")
    assert rows(ddp, 4) == rows(ddp, 1)

    assert cli.main(["train", "recipes/gsm8k.yaml", "train.sharding=fsdp", "model.quant_storage=bfloat16",
                     "--dry-run", "--processes", "4"]) == 0
    assert "memory estimate per process of 4" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")  # under a launcher, its world size
    assert cli.main(["sweep", "recipes/gsm8k.yaml", "--quant", "nf4", "--dry-run"]) == 0
    assert "per process (of 2, sharding none)" in capsys.readouterr().out
