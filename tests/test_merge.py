"""llmkd.merge: the adapter merged into a GGUF, bitsandbytes 4-bit or HQQ student and quantised again by
the layer's own quantizer, then the format's continuous parameters (GGUF block scales, bitsandbytes block
absmax, HQQ group scales and zeros) trained with the integer codes fixed."""

import bitsandbytes as bnb
import pytest
import torch

from conftest import REPO, stand_in_overrides
from llmkd import gguf_quant, merge, models
from llmkd.builder import build
from llmkd.config import ModelConfig, load_recipe
from test_gguf import TINY, _random_adapter


def _layers(model, kind):
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def _gguf_expected(layer, delta):
    return gguf_quant.quantize_rows(layer.dequantize() + delta, "q4_0")


def _bnb_expected(layer, delta):
    """An independent reference: bitsandbytes' own Params4bit quantising the merged weight."""
    p = layer.weight
    w = _dequantized(layer) + delta
    return bnb.nn.Params4bit(w.to(p.quant_state.dtype), requires_grad=False, blocksize=p.blocksize,
                             compress_statistics=p.compress_statistics, quant_type=p.quant_type)._quantize("cpu")


def _dequantized(layer) -> torch.Tensor:
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.dequantize()


def _hqq_expected(layer, delta):
    """An independent reference: hqq quantising the merged weight from a plain nn.Linear."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantize() + delta)
    return HQQLinear(linear, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32,
                     device="cpu")


@pytest.mark.parametrize("quant, double_quant", [("gguf-q4_0", True), ("hqq4", True), ("nf4", True), ("fp4", False)])
def test_merge_quantizes_again_and_recovery_trains_only_the_scales(stand_in, tmp_path, quant, double_quant):
    from hqq.core.quantize import HQQLinear

    kind = {"gguf": gguf_quant.GGUFLinear, "hqq4": HQQLinear}.get(quant[:4], bnb.nn.Linear4bit)
    cfg = ModelConfig(name=str(stand_in), quant=quant, teacher_dtype="float32", compute_dtype="float32",
                      double_quant=double_quant)
    student = _random_adapter(models.load_student(cfg), tmp_path / "adapter").eval()
    q_proj = student.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        delta = q_proj.get_delta_weight("default")
        reference = {gguf_quant.GGUFLinear: _gguf_expected, HQQLinear: _hqq_expected}.get(kind, _bnb_expected)
        expected = reference(q_proj.get_base_layer(), delta)
        before_merge = _dequantized(q_proj.get_base_layer()).clone()
    merged = merge.merge_requantized(student)
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, kind) and not any("lora" in name for name, _ in merged.named_parameters())
    if kind is gguf_quant.GGUFLinear:
        assert torch.equal(layer.weight, expected)
    elif kind is HQQLinear:
        assert torch.equal(layer.W_q, expected.W_q) and torch.equal(layer.dequantize(), expected.dequantize())
    else:
        assert torch.equal(layer.weight.data, expected.data) and layer.weight.quant_state.nested == double_quant
        assert torch.equal(_dequantized(layer), bnb.functional.dequantize_4bit(expected.data, expected.quant_state).float())
    # The merge moved the weights by the delta, up to one re-rounding (a random adapter's delta is large)
    moved = _dequantized(layer) - before_merge
    assert torch.nn.functional.cosine_similarity(moved.flatten(), delta.flatten(), dim=0) > 0.8

    recipe = load_recipe(REPO / "recipes/smollm2-cpu.yaml", stand_in_overrides(stand_in, *TINY, f"model.quant={quant}"))
    build(recipe, progress=False)
    before = {name: (_dequantized(m).clone(), _codes(m)) for name, m in _layers(merged, kind).items()}
    bytes_before = sum(t.numel() * t.element_size() for m in _layers(merged, kind).values() for t in _stored(m))
    recovery = merge.recover(merged, recipe, models.load_tokenizer(cfg), steps=6, lr=1e-4, progress=False)
    assert len(recovery.losses) == 6 and recovery.losses[-1] < recovery.losses[0]
    after = _layers(merged, kind)
    assert after.keys() == before.keys() and not any(p.requires_grad for p in merged.parameters())
    for name, m in after.items():  # the same codes, new scales, the same bytes
        assert torch.equal(_codes(m), before[name][1]) and not torch.equal(_dequantized(m), before[name][0]), name
    assert sum(t.numel() * t.element_size() for m in after.values() for t in _stored(m)) == bytes_before
    assert not _layers(merged, (merge.ScaledBlocks, merge.ScaledGroups, merge.ScaledAbsmax))

    # What trains is what ships: a wrapper's forward with changed scales is the settled layer's own forward.
    layer = merged.model.layers[1].mlp.down_proj
    wrapper = merge._trainable(layer)
    with torch.no_grad():
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(wrapper(x), _forward(layer, x), rtol=0, atol=0)  # wrapping alone changes nothing
        for p in wrapper.parameters(recurse=False):
            p.mul_(1.01)
        trained = wrapper(x)
        torch.testing.assert_close(_forward(wrapper.settle(), x), trained, rtol=0, atol=0)


def _forward(layer, x):
    """The layer's output from its stored format. bitsandbytes' own CPU inference repacks the weight and
    rounds its absmax to bf16 on AVX512-BF16 CPUs, so its 4-bit layers are read through its dequantize_4bit."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return torch.nn.functional.linear(x, _dequantized(layer).to(layer.compute_dtype))
    return layer(x)


def _codes(layer) -> torch.Tensor:
    if isinstance(layer, gguf_quant.GGUFLinear):
        return gguf_quant.unpack(layer.weight, layer.qtype, (layer.out_features, layer.in_features))[0]
    if isinstance(layer, bnb.nn.Linear4bit):
        return layer.weight.data.clone()  # two 4-bit codes a byte
    return layer.unpack(dtype=torch.float32)


def _stored(layer) -> list[torch.Tensor]:
    if isinstance(layer, gguf_quant.GGUFLinear):
        return [layer.weight]
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        return [layer.weight.data, state.absmax, *((state.state2.absmax, state.offset) if state.nested else ())]
    return [layer.W_q, layer.meta["scale"], layer.meta["zero"]]


def test_gptq_codes_round_to_nearest_on_uncorrelated_inputs_and_move_the_output_less_on_correlated_ones():
    g = torch.Generator().manual_seed(0)
    rows, cols = 16, 96
    target = torch.randn(rows, cols, generator=g)
    levels = torch.tensor([-1.0, -0.6, -0.3, -0.1, 0.0, 0.15, 0.4, 0.7, 1.0])  # uneven, as NF4's
    scale = (0.5 + torch.rand(rows, cols // 32, generator=g)).repeat_interleave(32, dim=1)  # one per block of 32
    offset = 0.1 * torch.randn(rows, cols // 32, generator=g).repeat_interleave(32, dim=1)
    values = lambda index: levels[index] * scale + offset  # noqa: E731
    nearest = ((levels * scale[..., None] + offset[..., None]) - target[..., None]).abs().argmin(-1)

    diagonal = torch.diag(torch.rand(cols, generator=g) + 0.1)
    assert torch.equal(merge.gptq_codes(target, diagonal, levels, scale, offset, block=32), nearest)

    x = torch.randn(512, 8, generator=g) @ torch.randn(8, cols, generator=g) + 0.1 * torch.randn(512, cols, generator=g)
    codes = merge.gptq_codes(target, x.t() @ x, levels, scale, offset, block=32)
    assert codes.min() >= 0 and codes.max() < len(levels)
    error = lambda index: ((values(index) - target) @ x.t()).pow(2).sum()  # noqa: E731
    assert error(codes) < 0.5 * error(nearest)
    # the block size only orders the arithmetic
    assert (merge.gptq_codes(target, x.t() @ x, levels, scale, offset, block=96) != codes).float().mean() < 0.01
    # Inputs of unequal size, as a transformer's: the largest inputs' columns first (act-order) leave the most
    # columns to absorb their errors (measured 0.06-0.11x the natural order's error on seeds 0-4).
    x = x * torch.exp(torch.randn(cols, generator=g))
    natural = merge.gptq_codes(target, x.t() @ x, levels, scale, offset, block=32, act_order=False)
    assert error(merge.gptq_codes(target, x.t() @ x, levels, scale, offset, block=32)) < 0.5 * error(natural)
    assert torch.equal(merge.gptq_codes(target, diagonal, levels, scale, offset, act_order=False), nearest)


@pytest.mark.parametrize("quant", ["gguf-q4_0", "hqq4", "nf4", "fp4"])
def test_a_calibrated_merge_keeps_the_quantizers_scales_and_moves_the_logits_less(stand_in, tmp_path, quant):
    import copy

    from llmkd import lora_init

    cfg = ModelConfig(name=str(stand_in), quant=quant, teacher_dtype="float32", compute_dtype="float32")
    student = _random_adapter(models.load_student(cfg), tmp_path / "adapter").train()
    g = torch.Generator().manual_seed(0)
    vocab = student.config.vocab_size
    calibration, held_out = torch.randint(0, vocab, (48, 64), generator=g), torch.randint(0, vocab, (8, 64), generator=g)
    with torch.no_grad(), lora_init.dropout_off(student):  # train mode: bitsandbytes' CPU repack kept out
        adapted = student(input_ids=held_out).logits
    nearest = merge.merge_requantized(copy.deepcopy(student))
    calibrated = merge.merge_requantized(student, calibration, batch=4)
    kind = type(nearest.model.layers[0].self_attn.q_proj)
    pairs = [(m, calibrated.get_submodule(name)) for name, m in _layers(nearest, kind).items()]
    assert len(pairs) == 14 and all(isinstance(c, kind) for _, c in pairs)
    changed = 0
    for n, c in pairs:
        for a, b in zip(merge._trainable(n).grid()[1:], merge._trainable(c).grid()[1:]):
            assert (a is None and b is None) or torch.equal(a, b)  # the scales are the quantizer's
        changed += not torch.equal(_codes(n), _codes(c))
    assert changed == len(pairs)
    with torch.no_grad():
        error = {name: (m.train()(input_ids=held_out).logits - adapted).pow(2).mean().item()
                 for name, m in (("nearest", nearest), ("calibrated", calibrated))}
    assert error["calibrated"] < 0.9 * error["nearest"], error
