"""GGUF students (`model.quant: gguf-q4_0`, q4_1, q5_0, q5_1, q8_0): linear layers that hold llama.cpp's
own blocks, so the student trains against the very weights llama.cpp will run.

Each linear layer of the decoder (not lm_head) is quantised row by row with the `gguf` package's
`quants.quantize`, which writes the same bytes as llama.cpp's quantizer, and kept as those bytes
(`GGUFLinear.weight`, a uint8 buffer, one row of blocks per output row). Forward dequantizes them in PyTorch
(`dequantize`, equal bit for bit to `gguf.quants.dequantize` and so to what llama.cpp multiplies
with), casts to the compute dtype and runs a plain matmul. `llmkd export --to gguf` writes these bytes
unchanged. These five types are those `gguf` quantizes bit for bit as llama.cpp does; the K-quants it
only dequantizes.

Block layouts (ggml-common.h), 32 weights per block, d and m fp16:
    q4_0  d, 16 bytes of nibbles               w = d * (q - 8)
    q4_1  d, m, 16 bytes of nibbles            w = d * q + m
    q5_0  d, 4 bytes of 5th bits, 16 nibbles   w = d * (q - 16)
    q5_1  d, m, 4 bytes of 5th bits, 16 nibbles   w = d * q + m
    q8_0  d, 32 int8                           w = d * q
A block's nibbles are its low halves first (weights 0-15), then its high halves (16-31); bit i of the
5th-bit word (little-endian) belongs to weight i.
"""

from __future__ import annotations

import torch

from llmkd.errors import LlmkdError

BLOCK = 32  # weights per block in every type here
TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
BITS = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8}
# The codes `unpack` returns, lowest and highest (q8_0's as llama.cpp's quantizer writes them: +-127).
CODE_RANGE = {"q4_0": (-8, 7), "q4_1": (0, 15), "q5_0": (-16, 15), "q5_1": (0, 31), "q8_0": (-127, 127)}


def ggml_type(name: str):
    """The gguf package's GGMLQuantizationType for "q4_0" etc."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def quantize_rows(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """`weight` (out, in) as llama.cpp's `qtype` blocks: uint8 (out, in / 32 * block bytes)."""
    from gguf import quants

    if weight.shape[-1] % BLOCK:
        raise LlmkdError(f"model.quant gguf-{qtype}: a linear layer has {weight.shape[-1]} inputs, not a multiple of "
                         f"GGUF's {BLOCK}-weight blocks; choose another quantizer")
    packed = quants.quantize(weight.detach().to("cpu", torch.float32).numpy(), ggml_type(qtype))
    return torch.from_numpy(packed)


def _halves(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp16 fields (..., 2 bytes each) read as `dtype`."""
    return x.contiguous().view(torch.float16).to(dtype)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) values: the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes of a little-endian 32-bit word -> (..., 32) bits, bit i first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def unpack(packed: torch.Tensor, qtype: str, shape: tuple[int, int]):
    """(codes, d, m) of `packed` blocks: fp32 (rows, blocks, 32) codes and (rows, blocks, 1) scales d and
    mins m (None for the types without), so that the weight is d * codes (+ m)."""
    rows, cols = shape
    blocks = packed.view(rows, cols // BLOCK, BLOCK_BYTES[qtype])
    f32 = torch.float32
    d = _halves(blocks[..., 0:2], f32)
    if qtype == "q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).to(f32), d, None
    if qtype == "q4_0":
        return (_nibbles(blocks[..., 2:]).to(torch.int8) - 8).to(f32), d, None
    if qtype == "q4_1":
        return _nibbles(blocks[..., 4:]).to(f32), d, _halves(blocks[..., 2:4], f32)
    if qtype == "q5_0":
        q = _nibbles(blocks[..., 6:]) | (_fifth_bits(blocks[..., 2:6]) << 4)
        return (q.to(torch.int8) - 16).to(f32), d, None
    if qtype == "q5_1":
        q = _nibbles(blocks[..., 8:]) | (_fifth_bits(blocks[..., 4:8]) << 4)
        return q.to(f32), d, _halves(blocks[..., 2:4], f32)
    raise ValueError(f"not a GGUF student type: {qtype}")


def dequantize(packed: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """`packed` (uint8 blocks of `qtype`, as `quantize_rows` returns) as the fp32 weight of `shape`."""
    codes, d, m = unpack(packed, qtype, shape)
    w = d * codes if m is None else d * codes + m
    return w.view(shape)


def with_scales(packed: torch.Tensor, qtype: str, shape: tuple[int, int], d: torch.Tensor,
                m: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of `packed` with its blocks' scales (and mins) replaced by `d` (and `m`), stored as fp16."""
    rows, cols = shape
    out = packed.clone().view(rows, cols // BLOCK, BLOCK_BYTES[qtype])
    out[..., 0:2] = d.detach().to(torch.float16).reshape(rows, -1, 1).view(torch.uint8)
    if m is not None:
        out[..., 2:4] = m.detach().to(torch.float16).reshape(rows, -1, 1).view(torch.uint8)
    return out.view(packed.shape)


def with_codes(packed: torch.Tensor, qtype: str, shape: tuple[int, int], codes: torch.Tensor) -> torch.Tensor:
    """A copy of `packed` with its blocks' codes replaced by `codes` ((rows, blocks, 32), as `unpack`
    returns them), its scales and mins kept."""
    rows, cols = shape
    out = packed.clone().view(rows, cols // BLOCK, BLOCK_BYTES[qtype])
    q = codes.reshape(rows, cols // BLOCK, BLOCK).round().to(torch.int16)
    if qtype == "q8_0":
        out[..., 2:] = q.to(torch.int8).view(torch.uint8)
        return out.view(packed.shape)
    q = (q + {"q4_0": 8, "q5_0": 16}.get(qtype, 0)).to(torch.uint8)
    start = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8}[qtype]
    out[..., start:] = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
    if qtype in ("q5_0", "q5_1"):  # the 5th bits: weight i's in bit i of a little-endian 32-bit word
        bits = ((q >> 4) & 1).view(rows, cols // BLOCK, 4, 8)
        shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
        out[..., start - 4 : start] = (bits << shifts).sum(-1).to(torch.uint8)
    return out.view(packed.shape)


class GGUFLinear(torch.nn.Linear):
    """A frozen linear layer whose `weight` is llama.cpp's blocks (a uint8 buffer, as bitsandbytes' 4-bit
    weight is packed bytes), computing in `compute_dtype`. A `torch.nn.Linear` to peft, which wraps it
    with an ordinary LoRA layer and, seeing a weight that is not float, leaves the adapter's dtype alone."""

    def __init__(self, linear: torch.nn.Linear, qtype: str, compute_dtype: torch.dtype, device):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qtype, self.compute_dtype = qtype, compute_dtype
        self.register_buffer("weight", quantize_rows(linear.weight, qtype).to(device))
        self.bias = (None if linear.bias is None
                     else torch.nn.Parameter(linear.bias.detach().to(device, compute_dtype), requires_grad=False))

    def dequantize(self) -> torch.Tensor:
        """The weight llama.cpp multiplies with, fp32."""
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(self.compute_dtype)
        return torch.nn.functional.linear(x.to(self.compute_dtype), weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"
