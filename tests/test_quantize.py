"""Every student quantizer (`model.quant`) on a small random model of the embedded default's shape
(2 layers, the embedded tokenizer): it loads, reports what runs and the bytes it holds as planned,
its dequantized-once fast path changes no number; `llmkd sweep` trains and scores HQQ and NF4 points."""

import math

import pytest
import torch

from conftest import REPO
from llmkd import fastpath, models, plan, quantize
from llmkd.config import ModelConfig, load_recipe


def config(stand_in, quant, **kw) -> ModelConfig:
    return ModelConfig(name=str(stand_in), quant=quant, teacher_dtype="float32", compute_dtype="float32", **kw)


@pytest.mark.parametrize("quant", list(quantize.QUANTIZERS))
def test_each_quantizer_loads_reports_itself_and_holds_the_planned_bytes(stand_in, quant):
    cfg = config(stand_in, quant)
    student = models.load_student(cfg)
    report = quantize.quantization_report(student)
    assert report["quant_type"] == [quant]
    linears = [m for m in models.load_teacher(cfg).modules() if isinstance(m, torch.nn.Linear)][:-1]  # not lm_head
    assert report["weight_bytes"]["quantized_layers"] == len(linears) == 14
    planned = sum(m.weight.numel() * quantize.planned_bytes_per_weight(cfg, m.in_features, 4) for m in linears)
    # The plan counts weights and constants; the measurement adds small per-layer tensors (quant maps, biases).
    # Within 2%: far closer than one bit width to the next (hqq2 0.38, hqq3 0.53, hqq4 0.63 B/weight at fp32).
    assert report["weight_bytes"]["quantized_linears"] == pytest.approx(planned, rel=0.02), report
    ids = torch.tensor([[1, 200, 3000, 40]])
    assert torch.isfinite(student(input_ids=ids).logits).all()


def test_a_group_size_that_does_not_divide_a_layer_is_a_one_line_error(stand_in):
    from llmkd.errors import LlmkdError

    with pytest.raises(LlmkdError, match="model.hqq_group_size: 40 does not divide"):
        models.load_student(config(stand_in, "hqq4", hqq_group_size=40))


def test_an_hqq_student_reaches_the_device_one_layer_at_a_time(stand_in, monkeypatch):
    """The device never holds the 16-bit student: as each linear layer starts quantising, it holds the
    layers quantised so far and that one. `meta` stands in for the GPU (shapes without values: each layer
    is quantised from a CPU stand-in of its shape, then moved there); a spy on HQQLinear counts its bytes."""
    from hqq.core.quantize import HQQLinear

    loaded, held, full, made = [], [], [], []
    load, init = models.load_pretrained, HQQLinear.__init__
    monkeypatch.setattr(models, "load_pretrained", lambda *a, **kw: loaded.append(load(*a, **kw)) or loaded[-1])

    def on_device() -> int:
        tensors = {id(t): t for m in loaded[0].modules() for t in quantize._held_tensors(m)}
        return sum(t.nbytes for t in tensors.values() if t.device.type == "meta")

    def spy(self, linear, quant_config, del_orig=True, compute_dtype=torch.float16, device="cuda", initialize=True):
        held.append(on_device())
        full.append(linear.weight.nbytes)
        shaped = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, dtype=linear.weight.dtype)
        init(self, shaped, quant_config, del_orig, compute_dtype, "cpu", initialize)
        self.W_q = torch.nn.Parameter(self.W_q.to(device), requires_grad=False)  # hqq's move sets .data: no meta
        self.meta.update(scale=self.meta["scale"].to(device), zero=self.meta["zero"].to(device))
        made.append(sum(t.nbytes for t in quantize._held_tensors(self)))

    monkeypatch.setattr(HQQLinear, "__init__", spy)
    model = models.load_quantized(config(stand_in, "hqq4"), {"": "meta"})
    assert len(held) == 14
    for k in range(14):
        assert held[k] <= sum(made[:k]) + full[k], (k, held[k], sum(made[:k]), full[k])
    # The rest (embeddings, norms, lm_head, rotary buffers) follows at the end.
    assert {t.device.type for m in model.modules() for t in quantize._held_tensors(m)} == {"meta"}


def test_an_hqq_student_quantised_layer_by_layer_is_bitwise_the_one_quantised_whole(stand_in):
    """The old build, written out: the whole model loaded where it runs (the CPU here), then each linear
    layer but lm_head replaced there. Same packed weights, scales, zeros and logits."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = config(stand_in, "hqq3")
    new = models.load_quantized(cfg, {"": "cpu"})
    old = models.load_pretrained(cfg, dtype=torch.float32, device_map={"": "cpu"})
    head = old.get_output_embeddings()
    for parent in list(old.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(parent, name, HQQLinear(child, quant_config=BaseQuantizeConfig(nbits=3, group_size=64),
                                                compute_dtype=torch.float32, device="cpu", del_orig=True))
    new_state, old_state = new.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(v, new_state[k]) for k, v in old_state.items() if isinstance(v, torch.Tensor))
    ids = torch.tensor([[1, 200, 3000, 40, 5]])
    with torch.no_grad():
        assert torch.equal(new(input_ids=ids).logits, old(input_ids=ids).logits)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hqq_dequantized_once_gives_bitwise_the_same_logits_and_gradients(stand_in, mode):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(models.load_quantized(config(stand_in, "hqq3"), {"": "cpu"}),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.train(mode == "train")
    ids = torch.tensor([[1, 200, 3000, 40, 5], [1, 7, 8, 9, 10]])

    def run():
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    per_call = run()
    with fastpath.dequantized_once(model) as status:
        assert status["dequantized_once"] == 14 and status["reason"].startswith("HQQ"), status
        once = run()
    assert torch.equal(once[0], per_call[0])
    for a, b in zip(once[1], per_call[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # autograd's matmul backward vs hqq's own
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "HQQLinear")


def test_the_dry_run_plans_the_students_load_peak_and_evaluations_beside_the_teacher_at_8b(capsys):
    """Llama-3.1-8B, bf16 (14.96 GiB): an HQQ student used to be built whole in bf16 beside the resident
    teacher (~31 GiB); now its load peaks well under the bf16 model, as NF4's does."""
    import re

    from llmkd.cli import main

    bf16 = 8_030_261_248 * 2 / 2**30
    for quant in ("hqq4", "nf4"):
        assert main(["train", "recipes/gsm8k.yaml", f"model.quant={quant}", "--dry-run"]) == 0
        out = capsys.readouterr().out
        student = float(re.search(r"student load: peak ([\d.]+) GiB", out)[1])
        evaluation = float(re.search(r"teacher's weights \(14.96 GiB\) stay while the student loads: peak ([\d.]+)",
                                     out)[1])
        assert 4 < student < 0.6 * bf16 and evaluation == pytest.approx(bf16 + student, abs=0.01), out
    recipe = load_recipe("recipes/gsm8k.yaml", ["model.quant=hqq4"])
    model_plan = plan.plan_model(recipe)
    assert model_plan.largest_linear == 14336 * 4096  # an MLP projection
    peak, how = plan.load_peak(recipe, model_plan)
    assert peak > model_plan.quantized_bytes + model_plan.kept_params * 2 + 14336 * 4096 * 2 and "layer by layer" in how


def test_sweep_trains_and_scores_every_point_once_and_a_rerun_reuses_them(stand_in, tmp_path):
    """`llmkd sweep` over nf4 and hqq4: HQQ LoRA trains on the CPU through the real trainer, the
    recipe's method (activation init) beside its plain-KD baseline, scored against one base."""
    import json

    from llmkd import sweep

    recipe = load_recipe(REPO / "recipes/smollm2-sweep.yaml", [
        f"model.name={stand_in}", "model.teacher_dtype=float32", "model.compute_dtype=float32",
        "transfer_set.start=746", "transfer_set.count=4", "transfer_set.batch_size=4", f"transfer_set.out={tmp_path / 'set'}",
        "train.batch_size=4", "train.max_steps=2", "train.warmup_steps=0", "train.checkpoint_every=1",
        "lora.init_steps=2", "lora.init_tokens=512", "lora.init_batch=2",
        "eval.limit=2", "eval.batch_size=2", "eval.max_new_tokens=4", "eval.fidelity_count=2",
    ])
    said = []
    path = sweep.run(recipe, ["nf4", "hqq4"], progress=False, say=said.append)
    result = json.loads((path.parent / "sweep.json").read_text())
    assert [p["quant"] for p in result["points"]] == ["nf4", "hqq4"] and (path.parent / "frontier.png").is_file()
    for p in result["points"]:
        assert {"quant", "bits", "weight_bytes", "base", "distilled", "gap_closed"} <= p.keys()
        assert p["gap_closed"] == pytest.approx(1 - p["distilled"]["kl"] / p["base"]["kl"])
        assert {"kl", "top1", "gen_prefix_mean", "gen_exact"} <= p["base"].keys() and p["weight_bytes"] > 0
        assert (tmp_path / "runs" / p["name"] / "train" / "adapter" / "adapter_config.json").is_file()
    assert result["teacher"]["kl"] == 0.0 and {"recipe", "teacher", "points"} <= result.keys()
    for p in result["points"]:  # the baseline: trained without the init, scored against the point's base
        plain = p["baseline"]
        assert plain["name"] == p["name"] + "-plain-kd" and plain["method"] == "plain-kd" and "base" not in plain
        assert p["init_seconds"] > 0 and plain["init_seconds"] == 0.0
        assert plain["gap_closed"] == pytest.approx(1 - plain["distilled"]["kl"] / p["base"]["kl"])
        assert plain["distilled"]["kl"] not in (p["base"]["kl"], p["distilled"]["kl"])
        assert not (tmp_path / "runs" / plain["name"] / "eval" / "student-0shot").exists()  # the base scored once
        assert (tmp_path / "runs" / p["name"] / "eval" / "student-0shot").is_dir()
    table = path.read_text()
    assert "Beside it, `plain-kd` (sweep.baseline: lora.init=default, train.lr=1.0e-3)" in table
    assert f"| hqq4 | {100 * result['points'][1]['gap_closed']:.1f}% | {100 * plain['gap_closed']:.1f}% |" in table
    hqq = sweep.point_recipe(recipe, "hqq4")
    losses = [json.loads(line)["loss"] for line in hqq.layout.metrics.read_text().splitlines()]
    trained = json.loads(hqq.layout.train_summary.read_text())
    assert len(losses) == 2 and all(map(math.isfinite, losses)), losses
    assert trained["student_quantization"]["quant_type"] == ["hqq4"] and trained["fast_paths"]["dequantized_once"] == 14
    assert result["points"][1]["distilled"]["kl"] != result["points"][1]["base"]["kl"]  # the adapter loads and acts
    assert "-> hqq4 (HQQ 4-bit, group 64" in plan.dry_run(hqq)
    assert "| hqq4 | 4 |" in sweep.dry_run(recipe, ["nf4", "hqq4"])
    # The teacher generated once: each point's teacher cell is the sweep's copy.
    teacher_cell = path.parent / "teacher" / "teacher-0shot" / "samples.jsonl"
    for p in result["points"]:
        copied = tmp_path / "runs" / p["name"] / "eval" / "teacher-0shot" / "samples.jsonl"
        assert copied.read_bytes() == teacher_cell.read_bytes()

    said.clear()
    sweep.run(recipe, ["nf4", "hqq4"], progress=False, say=said.append)
    assert sum("finished earlier" in s for s in said) == 4, said
    assert json.loads((path.parent / "sweep.json").read_text())["points"] == result["points"]


def test_the_recipe_accepts_exactly_the_quantizers_llmkd_has():
    import typing

    from llmkd.config import Quant

    assert tuple(quantize.QUANTIZERS) == typing.get_args(Quant)
