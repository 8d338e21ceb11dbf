"""GGUF students (model.quant gguf-*) and `llmkd export --to gguf`: the student holds llama.cpp's own blocks,
the files llmkd writes load in llama.cpp (llama-cpp-python, built by `make setup`), and the gate checks
them there."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, stand_in_overrides
from llmkd import builder, export, export_gguf, fastpath, gguf_quant, models, quantize, train
from llmkd.config import ModelConfig, load_recipe
from llmkd.errors import LlmkdError


def _weights(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 3.0  # an outlier
    return w


@pytest.mark.parametrize("qtype", gguf_quant.TYPES)
def test_dequantize_is_the_gguf_package_bit_for_bit(qtype):
    from gguf import quants

    w = _weights()
    packed = gguf_quant.quantize_rows(w, qtype)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 256 // 32 * gguf_quant.BLOCK_BYTES[qtype])
    theirs = quants.dequantize(packed.numpy(), gguf_quant.ggml_type(qtype))  # what llama.cpp multiplies with
    ours = gguf_quant.dequantize(packed, qtype, (64, 256))
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32)))
    error = (ours - w).abs().mean() / w.abs().mean()
    assert 0 < error < {4: 0.2, 5: 0.1, 8: 0.01}[gguf_quant.BITS[qtype]]  # quantised, and not garbage


def test_a_row_that_is_not_whole_blocks_is_refused():
    with pytest.raises(LlmkdError, match="not a multiple of GGUF's 32-weight blocks"):
        gguf_quant.quantize_rows(torch.zeros(4, 40), "q4_0")


@pytest.fixture(scope="module")
def gguf_student(stand_in):
    cfg = ModelConfig(name=str(stand_in), quant="gguf-q4_0", teacher_dtype="float32", compute_dtype="float32")
    return cfg, models.load_student(cfg)


def test_the_student_computes_with_llama_cpps_weights_and_holds_only_their_bytes(stand_in, gguf_student):
    from gguf import quants

    cfg, student = gguf_student
    teacher = models.load_teacher(cfg)
    layers = [m for m in student.modules() if isinstance(m, gguf_quant.GGUFLinear)]
    assert len(layers) == 2 * 7 and layers[0].weight.dtype == torch.uint8
    # An independent reference: the teacher with each decoder weight replaced by gguf's own round trip.
    with torch.no_grad():
        for name, m in teacher.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not teacher.get_output_embeddings():
                q = quants.quantize(m.weight.numpy(), gguf_quant.ggml_type("q4_0"))
                m.weight.copy_(torch.from_numpy(quants.dequantize(q, gguf_quant.ggml_type("q4_0"))))
    ids = models.load_tokenizer(cfg)("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids
    with torch.no_grad():
        reference, ours = teacher(input_ids=ids).logits, student(input_ids=ids).logits
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
        with fastpath.dequantized_once(student) as fast:  # the CPU fast path: the same numbers
            assert fast["dequantized_once"] == 14 and "GGUF" in fast["reason"]
            assert torch.equal(student(input_ids=ids).logits, ours)
    held = quantize.weight_bytes(student)
    params = sum(m.in_features * m.out_features for m in layers)
    assert held["quantized_linears"] == params * quantize.planned_bytes_per_weight(cfg, 576, 4) == params * 18 / 32
    report = quantize.quantization_report(student)
    assert report["quant_type"] == ["gguf-q4_0"] and report["gguf_layers"] == 14


DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft's
# "all-linear" finds nn.Linear subclasses only: GGUF's layers, not HQQ's


def _random_adapter(student, folder):
    """A LoRA on every decoder linear with random A and B (a real adapter's shape, a visible effect)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules=DECODER_LINEARS, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return model


def _llama_cpp_logits(path, lora, ids, f32=False):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=64, n_threads=1,
                verbose=False, **({"type_k": 0, "type_v": 0} if f32 else {}))
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def test_the_files_load_in_llama_cpp_and_the_f32_copy_is_llmkds_forward(stand_in, tmp_path):
    from gguf import GGUFReader

    cfg = ModelConfig(name=str(stand_in), quant="gguf-q4_0", teacher_dtype="float32", compute_dtype="float32")
    model = _random_adapter(models.load_student(cfg), tmp_path / "adapter").eval()
    base = model.get_base_model()
    metadata = models.embedded_gguf()
    export_gguf.write_base(base, tmp_path / "f32.gguf", metadata, "q4_0", f32=True)
    export_gguf.write_base(base, tmp_path / "q4_0.gguf", metadata, "q4_0")
    export_gguf.write_lora(tmp_path / "adapter", tmp_path / "lora.gguf", base.config)
    # The Q4_0 file holds the student's very bytes (attn_q's rows in llama.cpp's order).
    tensors = {t.name: t for t in GGUFReader(tmp_path / "q4_0.gguf").tensors}
    q = base.model.layers[1].self_attn.q_proj.weight.numpy()
    assert tensors["blk.1.attn_q.weight"].tensor_type.name == "Q4_0"
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(q.shape), export_gguf.permute_rows(q, 9))
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(-1),
                          base.model.layers[0].mlp.down_proj.weight.numpy().reshape(-1))
    assert "output.weight" not in tensors  # tied to token_embd, as in the model

    ids = models.load_tokenizer(cfg)("Natalia sold clips to 48 of her friends in April.").input_ids
    with torch.no_grad():
        ours = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        with model.disable_adapter():
            ours_base = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    exact = torch.log_softmax(_llama_cpp_logits(tmp_path / "f32.gguf", tmp_path / "lora.gguf", ids, f32=True), -1)
    torch.testing.assert_close(exact, ours, rtol=0, atol=1e-3)  # llama.cpp + its LoRA == llmkd + peft
    exact_base = torch.log_softmax(_llama_cpp_logits(tmp_path / "f32.gguf", None, ids, f32=True), -1)
    torch.testing.assert_close(exact_base, ours_base, rtol=0, atol=1e-3)
    assert (ours - ours_base).abs().max() > 0.05  # the adapter is visible: the check above could fail
    # The quantised file runs too, near llmkd's forward (llama.cpp rounds activations to 8 bits against Q4_0).
    served = torch.log_softmax(_llama_cpp_logits(tmp_path / "q4_0.gguf", tmp_path / "lora.gguf", ids), -1)
    assert (served.argmax(-1) == ours.argmax(-1)).float().mean() > 0.8


def test_lora_alpha_gives_peft_scaling():
    assert export_gguf.lora_alpha({"lora_alpha": 8, "r": 4}, 4) == 8
    assert export_gguf.lora_alpha({"lora_alpha": 8, "r": 4, "use_rslora": True}, 4) == pytest.approx(16)
    with pytest.raises(LlmkdError, match="per-module ranks"):
        export_gguf.lora_alpha({"lora_alpha": 8, "rank_pattern": {"q_proj": 8}}, 4)


TINY = ["name=tiny-gguf", "model.quant=gguf-q4_0", "transfer_set.out=", "transfer_set.start=746", "transfer_set.count=4",
        "transfer_set.batch_size=4", "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=0",
        "train.schedule=constant", "train.lr=1e-5", "train.loss.alpha=0.5", "eval.limit=1", "eval.batch_size=1",
        "eval.max_new_tokens=4", "eval.shots=[0]", "eval.fidelity_count=2", "eval.fidelity_start=1000",
        "lora.init_steps=16"]  # its merged file then lowers the held-out KL by 20%, clear of llama.cpp's 8-bit noise


def test_export_to_gguf_is_gated_in_llama_cpp(stand_in, tmp_path):
    recipe = load_recipe(REPO / "recipes/smollm2-cpu.yaml", stand_in_overrides(stand_in, *TINY))
    builder.build(recipe, progress=False)  # export needs the adapter, not the run's evaluation
    train.train(recipe, progress=False)
    with pytest.raises(LlmkdError, match="give --gguf-metadata FILE"):
        export.export(recipe, out=tmp_path / "x", check=2, say=lambda _: None)
    with pytest.raises(LlmkdError, match="a GGUF student goes to llama.cpp; export --to gguf"):
        export.export(recipe, to="transformers", out=tmp_path / "x", check=2, say=lambda _: None)
    assert not (tmp_path / "x").exists()

    out = export.export(export.recipe_of(["runs/tiny-gguf"]), out=tmp_path / "served", check=2,
                        gguf_metadata=models.embedded_gguf(), say=lambda _: None)
    record = json.loads((out / "export.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.gguf", "export.json", "model.gguf"]
    engine, ours = record["engine"], record["llmkd"]
    assert engine["distilled_f32"]["max_logprob_difference"] < 1e-3  # the exact check
    assert engine["distilled"]["tokens"] == ours["distilled"]["tokens"] > 0
    assert abs(engine["gap_closed"] - ours["gap_closed"]) * 100 <= 5 and engine["distilled"]["kl"] < engine["student"]["kl"]
    assert len(engine["distilled"]["outputs"]) == 2 and "same_output_as_llmkd" in engine["distilled"]
    assert "llama-cli -m model.gguf --lora adapter.gguf" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".served*"))  # nothing left beside it, the F32 copy included

    # --to merged: one GGUF file at the base's size, gated in llama.cpp against the base.
    with pytest.raises(LlmkdError, match="--recovery-steps: only with --to merged"):
        export.export(recipe, out=tmp_path / "x", check=2, recovery_steps=4, say=lambda _: None)
    with pytest.raises(LlmkdError, match=r"--merge-tokens must be > 0 \(or 0\), got -1"):
        export.export(recipe, to="merged", out=tmp_path / "x", check=2, merge_tokens=-1, say=lambda _: None)
    merged = export.export(recipe, to="merged", out=tmp_path / "merged", check=2, gguf_metadata=models.embedded_gguf(),
                           recovery_steps=4, say=lambda _: None)
    record = json.loads((merged / "export.json").read_text())
    assert sorted(p.name for p in merged.iterdir()) == ["README.md", "export.json", "model.gguf"]
    assert record["files"]["model.gguf"] == (out / "model.gguf").stat().st_size  # the base's exact size
    assert record["recovery"]["steps"] == 4 and len(record["recovery"]["losses"]) == 4
    assert set(record["llmkd"]) >= {"student", "distilled", "requantized", "merged"}
    engine = record["engine"]
    assert engine["distilled_f32"]["max_logprob_difference"] < 1e-3 and engine["distilled"]["kl"] < engine["student"]["kl"]
    assert "merged + block scales recovered: this file" in (merged / "README.md").read_text()
    assert not list(tmp_path.glob(".merged*"))


def test_the_gguf_gate_fails_on_either_check():
    def figures(base_kl, distilled_kl, logprobs):
        return {"student": {"kl": base_kl, "top1_agreement": 0.9, "tokens": 3},
                "distilled": {"kl": distilled_kl, "top1_agreement": 0.95, "tokens": 3},
                "distilled_f32": {"kl": distilled_kl, "top1_agreement": 0.95, "tokens": 3, "target_logprobs": logprobs}}

    ours = {"student": {"kl": 0.30}, "distilled": {"kl": 0.10}}  # closes 66.7%
    exact = [[-1.0, -2.0], [-0.5]]
    assert export.gate_gguf(dict(ours), exact, figures(0.32, 0.11, [[-1.0, -2.0004], [-0.5]])) == []
    problems = export.gate_gguf(dict(ours), exact, figures(0.32, 0.11, [[-1.0, -2.01], [-0.5]]))
    assert len(problems) == 1 and "differ from llmkd's fp32 forward by up to 1.00e-02" in problems[0]
    problems = export.gate_gguf(dict(ours), exact, figures(0.32, 0.16, [[-1.0, -2.0], [-0.5]]))  # closes 50%
    assert len(problems) == 1 and "closes 50.0% of the KL gap in llama.cpp, 66.7% in llmkd" in problems[0]
    problems = export.gate_gguf({"student": {"kl": 0.1}, "distilled": {"kl": 0.1}}, exact,
                                figures(0.1, 0.1, [[-1.0, -2.0], [-0.5]]))
    assert problems == ["in llama.cpp the adapter does not lower the KL (0.1000 -> 0.1000)"]


@pytest.mark.parametrize("qtype", gguf_quant.TYPES)
def test_new_scales_go_back_into_the_blocks(qtype):
    w = _weights(8, 64)
    packed = gguf_quant.quantize_rows(w, qtype)
    codes, d, m = gguf_quant.unpack(packed, qtype, (8, 64))
    assert torch.equal(gguf_quant.with_scales(packed, qtype, (8, 64), d, m), packed)  # unchanged: the same bytes
    changed = gguf_quant.with_scales(packed, qtype, (8, 64), d * 2, None if m is None else m * 2)
    codes2, d2, m2 = gguf_quant.unpack(changed, qtype, (8, 64))
    assert torch.equal(codes2, codes) and torch.equal(d2, (d * 2).half().float())
    assert torch.equal(gguf_quant.dequantize(changed, qtype, (8, 64)), gguf_quant.dequantize(packed, qtype, (8, 64)) * 2)


@pytest.mark.parametrize("qtype", gguf_quant.TYPES)
def test_new_codes_go_back_into_the_blocks(qtype):
    w = _weights(8, 64)
    packed = gguf_quant.quantize_rows(w, qtype)
    codes, d, m = gguf_quant.unpack(packed, qtype, (8, 64))
    lo, hi = gguf_quant.CODE_RANGE[qtype]
    assert lo <= codes.min() and codes.max() <= hi  # llama.cpp's quantizer stays in the range
    assert torch.equal(gguf_quant.with_codes(packed, qtype, (8, 64), codes), packed)  # unchanged: the same bytes
    new = torch.randint(lo, hi + 1, codes.shape, generator=torch.Generator().manual_seed(0)).float()
    changed = gguf_quant.with_codes(packed, qtype, (8, 64), new)
    codes2, d2, m2 = gguf_quant.unpack(changed, qtype, (8, 64))
    assert torch.equal(codes2, new) and torch.equal(d2, d) and (m is None or torch.equal(m2, m))
    # gguf's own dequantisation reads the new codes: an independent reader of the same bytes
    from gguf import quants

    expected = d * new if m is None else d * new + m
    theirs = quants.dequantize(changed.numpy(), gguf_quant.ggml_type(qtype))
    torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32)), expected.view(8, 64),
                               rtol=0, atol=0)
