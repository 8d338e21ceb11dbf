"""Stage 2 trainer: the real SmolLM2 NF4 student on a 4-example transfer set built by the real builder.

The transfer set holds 4 short GSM8K train questions (136-150 tokens, prompt + gold solution: the
shortest window of 4 in the split) so that a training step takes about a second on 2 CPU cores.
The student computes in fp32 here (model.compute_dtype=float32): CPUs without AVX512-BF16 run bf16
matmuls tens of times slower than fp32, and nothing these tests check depends on the dtype.

The two tests of mechanics across processes (a run killed and resumed equals the uninterrupted one;
two ranks equal one process accumulating their batches) run on conftest's 2-layer random stand-in of
the same model and the same 4 questions: what they compare does not depend on the weights.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import stand_in_overrides
from faults import fault_seed, kill_at_random_moment
from llmkd import checkpoint, plan, train
from llmkd.cli import main
from llmkd.config import load_recipe
from llmkd.errors import LlmkdError

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    # peft's initialisation: the activation init would load the teacher in every training run here
    # (tests/test_lora_init.py has it; the stand-in's pipeline and FSDP tests run it).
    "lora.init=default",
    "transfer_set.start=746", "transfer_set.count=4", "transfer_set.batch_size=4",
    "model.compute_dtype=float32",
    "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=1",
    "train.optimizer=adamw", "train.lr=1e-3", "train.warmup_steps=1", "train.schedule=cosine",
]
CURVE_KEYS = ("step", "epoch", "loss", "ce", "kl", "lr", "grad_norm", "tokens", "input_tokens")


@pytest.fixture(scope="module")
def transfer_set(tmp_path_factory, smol_tokenizer):
    from llmkd.builder import build

    out = tmp_path_factory.mktemp("transfer-set") / "set"
    build(load_recipe("recipes/smollm2-cpu.yaml", SMALL), out=out, progress=False, tokenizer=smol_tokenizer)
    return out


def small_overrides(transfer_set, out, *extra) -> list[str]:
    return [*SMALL, f"transfer_set.out={transfer_set}", f"train.out={out}", *extra]


def small_recipe(transfer_set, out, *extra):
    return load_recipe("recipes/smollm2-cpu.yaml", small_overrides(transfer_set, out, *extra))


@pytest.fixture(scope="module")
def on_stand_in(stand_in, stand_in_transfer_set):
    """SMALL on the random stand-in and its transfer set (the same 4 questions): (overrides, recipe) of (out, *extra).

    With CE on the gold tokens (loss.alpha 0.5): on random weights teacher and 4-bit student agree almost
    exactly, so a KL-only loss would hardly move the adapter."""
    def overrides(out, *extra):
        return stand_in_overrides(stand_in, *small_overrides(stand_in_transfer_set, out, "train.loss.alpha=0.5", *extra))

    return overrides, lambda out, *extra: load_recipe("recipes/smollm2-cpu.yaml", overrides(out, *extra))


def curve(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in CURVE_KEYS) for r in rows]


def adapter_tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def session(transfer_set, tmp_path_factory):
    """A set-up (not yet trained) student with LoRA dropout 0.1."""
    s = train.setup(small_recipe(transfer_set, tmp_path_factory.mktemp("session") / "run", "lora.dropout=0.1"),
                progress=False)
    yield s
    s.accelerator.end_training()


# --- Data order -----------------------------------------------------------------------------------


def test_grouping_by_length_keeps_each_epoch_a_permutation_and_cuts_padding():
    import numpy as np

    lengths = tuple(int(n) for n in np.random.default_rng(0).integers(100, 500, size=203))
    plain, grouped = (train.DataPlan(203, 4, 2, 2, 7, lens) for lens in (None, lengths))
    assert grouped.steps_per_epoch == plain.steps_per_epoch == 12

    def waste(plan, epoch):
        steps = [plan.step_examples(epoch * plan.steps_per_epoch + s) for s in range(plan.steps_per_epoch)]
        micro = [mb for step in steps for rank in step for mb in rank]
        real = sum(lengths[i] for mb in micro for i in mb)
        return 1 - real / sum(len(mb) * max(lengths[i] for i in mb) for mb in micro)

    for epoch in (0, 1):
        order = grouped.order(epoch)
        assert sorted(order.tolist()) == list(range(203))  # every example once per epoch
        used = 203 - 203 % 16
        assert set(order[:used].tolist()) == set(plain.order(epoch)[:used].tolist())  # same examples used
        assert waste(grouped, epoch) < waste(plain, epoch) / 3
    assert not np.array_equal(grouped.order(0), grouped.order(1))
    assert np.array_equal(grouped.order(1), train.DataPlan(203, 4, 2, 2, 7, lengths).order(1))  # a function of (seed, epoch)


# --- Set-up -------------------------------------------------------------------------------------


def test_lora_dropout_is_active_in_training(session):
    dropouts = [m for n, m in session.model.named_modules() if n.endswith("lora_dropout.default")]
    assert len(dropouts) == 30 * 7  # every targeted module of every layer
    assert all(isinstance(m, torch.nn.Dropout) and m.p == 0.1 and m.training for m in dropouts)
    batch = train.collate(session.data.examples.rows([0]), session.tokenizer.pad_token_id)
    with torch.no_grad():
        # LoRA B starts at zero, so dropout cannot show in the logits yet: give B a value first.
        lora_b = [p for n, p in session.model.named_parameters() if "lora_B" in n]
        saved = [p.clone() for p in lora_b]
        for p in lora_b:
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
        try:
            losses = [train.loss_step(session.model, batch, session.recipe.train.loss, 1).loss for _ in range(2)]
            session.model.eval()
            frozen = [train.loss_step(session.model, batch, session.recipe.train.loss, 1).loss for _ in range(2)]
        finally:
            session.model.train()
            for p, v in zip(lora_b, saved):
                p.copy_(v)
    assert losses[0] != losses[1]  # different dropout masks
    assert frozen[0] == frozen[1]


def test_dry_run_lora_count_matches_peft(session):
    model_plan = plan.plan_model(session.recipe)
    assert model_plan.lora_params == sum(p.numel() for p in session.params) == 4_884_480


def test_gradient_accumulation_matches_one_big_batch(session):
    """batch_size 2 x grad_accum 1 and batch_size 1 x grad_accum 2 give the same gradient and loss."""
    s, pad = session, session.tokenizer.pad_token_id
    a, b = s.data.examples.rows([0]), s.data.examples.rows([3])
    tokens = int(s.data.examples.response_lengths[[0, 3]].sum())
    assert s.data.examples.response_lengths[0] != s.data.examples.response_lengths[3]  # a per-micro-batch mean would differ

    def gradient(batches):
        s.model.zero_grad(set_to_none=True)
        totals = train.accumulate_gradients(s.model, batches, s.recipe.train.loss, tokens, accelerator=s.accelerator)
        return totals, torch.cat([p.grad.flatten() for p in s.params])

    s.model.eval()  # dropout off: both paths must see the same function
    try:
        big_loss, big = gradient([train.collate(a + b, pad)])
        acc_loss, acc = gradient([train.collate(a, pad), train.collate(b, pad)])
    finally:
        s.model.zero_grad(set_to_none=True)
        s.model.train()
    assert big.norm() > 0
    torch.testing.assert_close(acc_loss, big_loss, rtol=1e-4, atol=1e-6)
    assert (acc - big).norm() / big.norm() < 1e-4


# --- Training runs --------------------------------------------------------------------------------


def test_training_killed_at_a_random_moment_resumes_to_the_uninterrupted_run(on_stand_in, tmp_path):
    # 3 steps of 2 examples: step 3 starts the second epoch. Dropout on: the RNG must be restored too.
    extra = ["lora.dropout=0.1", "train.max_steps=3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    overrides, recipe = on_stand_in

    def script(out):  # the launcher's entry point, as `accelerate launch llmkd/train.py` runs it
        return [sys.executable, "llmkd/train.py", "recipes/smollm2-cpu.yaml", *overrides(out, *extra)]

    run = dict(cwd=REPO, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # the script finds llmkd
    # The uninterrupted run here, in this process: the killed script's steps and the resume (here too)
    # must match it bitwise.
    start = time.monotonic()
    train.train(recipe(whole, *extra), progress=False)
    span = time.monotonic() - start
    what = kill_at_random_moment(script(broken), out=broken, span=span, seed=fault_seed(), **run)
    last_complete = checkpoint.latest(broken / "checkpoints")

    # A crash mid-save leaves folders without COMPLETE: they must not count.
    ckpts = broken / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    if not (ckpts / "step-000003" / checkpoint.COMPLETE).exists():
        shutil.rmtree(ckpts / "step-000003", ignore_errors=True)
        (ckpts / "step-000003").mkdir()
        (ckpts / "step-000003" / "state.json").write_text("{}")
    (ckpts / ".tmp-step-000004").mkdir()

    with pytest.raises(LlmkdError, match="use --resume"):
        train.setup(recipe(broken, *extra))
    result = train.train(recipe(broken, *extra), resume=True, progress=False)
    assert result.resumed_from == last_complete, what
    start = int(last_complete.name[-6:]) if last_complete else 0
    assert result.steps == 3 and result.steps_this_run == 3 - start, what

    assert curve(broken) == curve(whole), what  # bitwise: floats compared with ==
    a, b = adapter_tensors(whole / "adapter"), adapter_tensors(broken / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), what
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"], what  # the last 2
    assert (ckpts / "step-000003" / checkpoint.COMPLETE).is_file(), what  # a fake was replaced by a real one

    # A resume with no step left writes no checkpoint, and still clears what a crash left.
    (ckpts / ".tmp-step-000004").mkdir()
    (ckpts / "step-000004").mkdir()
    again = train.train(recipe(broken, *extra), resume=True, progress=False)
    assert again.steps_this_run == 0 and curve(broken) == curve(whole)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]

    # A training setting that differs from the checkpoint's is refused, naming the key.
    with pytest.raises(LlmkdError, match=r"train\.lr was 0\.001, now 0\.002"):
        train.setup(recipe(broken, *extra, "train.lr=2e-3"), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(on_stand_in, tmp_path, monkeypatch, capsys):
    # On the random stand-in: the NaN is injected, what is checked is what the trainer does with it.
    overrides, _ = on_stand_in
    real, calls = train.sparse_kd_loss, []

    def poisoned(*args, **kwargs):  # NaN from the second optimizer step on (one micro-batch per step)
        terms = real(*args, **kwargs)
        calls.append(1)
        return terms if len(calls) < 2 else train.KDTerms(terms.loss * float("nan"), terms.ce, terms.kl)

    monkeypatch.setattr(train, "sparse_kd_loss", poisoned)
    out = tmp_path / "run"
    code = main(["train", "recipes/smollm2-cpu.yaml", *overrides(out, "train.batch_size=1", "train.max_steps=3")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "non-finite loss nan at step 2" in err and "step-000001 (intact)" in err, err
    kept = out / "checkpoints" / "step-000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert (kept / checkpoint.COMPLETE).is_file() and json.loads((kept / "state.json").read_text())["step"] == 1
    assert all(torch.isfinite(t).all() for t in adapter_tensors(kept).values())
    assert [row[0] for row in curve(out)] == [1]
    assert not (out / "adapter").exists()


# --- Command line ---------------------------------------------------------------------------------


def test_dry_run_of_the_reference_recipe_works_offline(capsys):
    assert main(["train", "recipes/gsm8k.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "built-in table (hub unreachable" in out
    assert "hidden 4096, 32 layers, intermediate 14336, 32 heads (8 KV, head dim 128), vocab 128,256" in out
    assert "parameters 8,030,261,248" in out and "10,485,760 trainable parameters" in out
    assert "memory estimate" in out and "| total |" in out


def test_an_out_folder_with_checkpoints_needs_resume(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-000020").mkdir(parents=True)
    assert main(["train", "recipes/smollm2-cpu.yaml", f"train.out={tmp_path / 'run'}"]) == 2
    assert "use --resume, or another train.out" in capsys.readouterr().err


def test_two_ranks_equal_one_process_accumulating_their_batches(on_stand_in, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 (two gloo ranks on CPU), batch 1 each, against one
    process with batch 1 x grad_accum 2: the same examples per step, the same token normalisation."""
    import socket

    with socket.socket() as sock:  # a free port: other jobs on the machine may use accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks, single = tmp_path / "ranks", tmp_path / "single"
    overrides, recipe = on_stand_in
    extra = ["train.batch_size=1", "train.max_steps=2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "llmkd/train.py", "recipes/smollm2-cpu.yaml", *overrides(ranks, *extra)]
    # Each rank runs as many threads as this process (torchrun would give it one): the same kernels.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "effective batch 1 x 1 x 2 = 2" in proc.stdout, proc.stdout
    assert (ranks / "checkpoints" / "step-000002" / "rng-rank1.pt").is_file()

    train.train(recipe(single, *extra, "train.grad_accum=2"), progress=False)
    for a, b in zip(curve(ranks), curve(single), strict=True):
        assert a[:2] == b[:2] and a[-2:] == b[-2:]  # step, epoch, tokens
        # loss, ce, kl, lr, grad_norm: gloo sums the ranks' gradients in its own order, so equal up to
        # float rounding (seen at rel 1.25e-6 on one CPU), not bitwise.
        assert a[2:-2] == pytest.approx(b[2:-2], rel=1e-5)
    x, y = adapter_tensors(ranks / "adapter"), adapter_tensors(single / "adapter")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-7)


MIXED_PRECISION_SCRIPT = """
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM
from llmkd import train
from llmkd.config import LossConfig

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
acc = Accelerator(cpu=True, mixed_precision="bf16")
model, opt = train.prepare(acc, model, torch.optim.SGD(model.parameters(), lr=0.1))
seen, real = [], train.sparse_kd_loss
train.sparse_kd_loss = lambda logits, *a, **k: (seen.append(logits.dtype), real(logits, *a, **k))[1]
row = {"id": "x", "input_ids": [1, 5, 7, 9, 11, 13], "response_start": 3,
       "topk_ids": [[9, 1, 2, 3], [11, 1, 2, 3], [13, 1, 2, 3]],
       "topk_logprobs": [[-0.5, -2.0, -3.0, -4.0]] * 3, "tail_logmass": [-1.5] * 3}
batch = train.collate([row], pad_id=0)
terms = train.loss_step(model, batch, LossConfig(), batch.response_tokens, acc)
terms.loss.backward()
assert seen == [torch.bfloat16], seen
assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
print("ok")
"""


def test_mixed_precision_keeps_the_logits_in_the_compute_dtype():
    # accelerate's bf16 wrapper would hand the loss an fp32 (N, V) copy; the trainer keeps bf16 logits.
    # In a process of its own: accelerate's state is one per process and the other tests' is fp32.
    proc = subprocess.run([sys.executable, "-c", MIXED_PRECISION_SCRIPT], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the row is the CPU fast path's")
def test_dry_run_counts_the_cpu_fast_paths_dense_copy_only_when_it_is_on():
    rows = {}
    for fast in ("true", "false"):
        recipe = load_recipe("recipes/smollm2-cpu.yaml", [f"fast_paths={fast}", "model.compute_dtype=float32"])
        rows[fast] = dict((name, b) for name, b, _ in plan.memory_estimate(recipe, plan.plan_model(recipe), 400, 200))
    dense = "nf4 weights dequantized once (CPU fast path)"
    assert rows["true"][dense] == plan.plan_model(recipe).quantized_params * 4 and dense not in rows["false"]


def test_cakld_gamma_is_the_teachers_mean_probability_of_the_response_tokens(transfer_set, smol_tokenizer, tmp_path):
    from llmkd.transfer_set import Examples, write_shard

    # Two examples by hand: responses [3, 4] and [6, 7]; the teacher gives them 0.5, 0.3, nothing (6 is
    # outside its top-2) and 0.9: gamma = 1.7 / 4.
    ln = np.log
    write_shard(tmp_path / "shard.safetensors", {
        "id": ["a", "b"], "question_hash": ["x", "y"], "finish": ["gold", "gold"],
        "input_ids": [[1, 2, 3, 4], [5, 6, 7]], "response_start": [2, 1],
        "topk_ids": [[[3, 7], [9, 4]], [[8, 9], [7, 6]]],
        "topk_logprobs": [[[ln(0.5), ln(0.25)], [ln(0.6), ln(0.3)]], [[ln(0.7), ln(0.2)], [ln(0.9), ln(0.05)]]],
        "tail_logmass": [[ln(0.25), ln(0.1)], [ln(0.1), ln(0.05)]],
    }, k=2)
    by_hand = train.TrainingData(examples=Examples.read([tmp_path / "shard.safetensors"]), transfer_set=None)
    assert by_hand.teacher_confidence() == pytest.approx(1.7 / 4, rel=1e-3)  # log-probs are stored in fp16
    data = train.TrainingData.open(small_recipe(transfer_set, Path("unused")), smol_tokenizer)
    assert 0.3 < data.teacher_confidence() < 1.0  # gold text the teacher mostly agrees with
