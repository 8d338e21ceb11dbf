"""How a transfer-set shard stores the teacher's targets: the `fp16` and `compact` encodings.

Both hold, per response token, what `losses.topk_with_tail` computes: the K most likely ids, their
log-probabilities and the log of the mass of every other token (the tail). Bytes per token:

    fp16     int32 ids, fp16 log-probabilities, fp16 tail     6K + 2      (K = 64: 386)
    compact  ids in the vocabulary's bit width, one byte per
             probability, fp16 tail                           3K + 2      (K = 32: 98), and K/8 more
                                                                          per id bit above 16 (V > 65,536)

`compact` ids: the low 16 bits as uint16, each higher bit as a plane of K bits packed into bytes
(`np.packbits`), so numpy alone reads them. Its probabilities are stored as round(255 * sqrt(p)):
KL(p || p + e) is about sum e^2 / 2p, and an error spread evenly over sqrt(p) costs every entry the
same KL, 1 / (6 * 255^2) = 2.6e-6 nats on average, where rounding p or log p evenly would spend the
byte on the likely or on the unlikely tokens. Decoding rescales the K probabilities to sum to
1 - tail, the fp16 tail being exact enough for that. A byte of 0 (p below 3.8e-6) decodes to the
mean of that bin, (0.5 / 255)^2 / 3.
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("compact", "fp16")

# Per encoding: the stored tensors, their dtypes, and each one's shape per response token
# ("K": the top_k axis; "P": the id bit planes above 16; "K/8": K bits packed into bytes).
STORED = {
    "fp16": {"topk_ids": ("int32", ("K",)), "topk_logprobs": ("float16", ("K",)), "tail_logmass": ("float16", ())},
    "compact": {"topk_ids_low": ("uint16", ("K",)), "topk_ids_high": ("uint8", ("P", "K/8")),
                "topk_sqrt_p": ("uint8", ("K",)), "tail_logmass": ("float16", ())},
}
LEVELS = 255  # a probability's byte: round(LEVELS * sqrt(p))
ZERO_CODE_P = (0.5 / LEVELS) ** 2 / 3  # the mean p of the bin of byte 0, under sqrt(p) uniform in it


def check(encoding: str) -> None:
    if encoding not in STORED:
        raise ValueError(f"unknown transfer-set encoding {encoding!r}; one of {', '.join(ENCODINGS)}")


def high_bit_planes(vocab_size: int) -> int:
    """How many id bits above the low 16 the vocabulary needs (Llama 3's 128,256: 1)."""
    return max(0, (int(vocab_size) - 1).bit_length() - 16)


def row_shape(encoding: str, name: str, k: int, planes: int) -> tuple[int, ...]:
    """The shape of stored tensor `name` per response token."""
    sizes = {"K": k, "P": planes, "K/8": (k + 7) // 8}
    return tuple(sizes[d] for d in STORED[encoding][name][1])


def bytes_per_token(encoding: str, k: int, vocab_size: int) -> int:
    """Stored target bytes per response token (the input id and the offsets not counted)."""
    planes = high_bit_planes(vocab_size)
    return sum(np.dtype(dtype).itemsize * int(np.prod(row_shape(encoding, name, k, planes)))
               for name, (dtype, _) in STORED[encoding].items())


def encode(encoding: str, ids: np.ndarray, logprobs: np.ndarray, tail_logmass: np.ndarray,
           vocab_size: int) -> dict[str, np.ndarray]:
    """The stored tensors of targets ids (R, K) int, logprobs (R, K) float and tail_logmass (R,)."""
    check(encoding)
    ids, k = np.asarray(ids), np.shape(ids)[-1]
    tail = np.asarray(tail_logmass, dtype=np.float16).reshape(-1)
    if encoding == "fp16":
        return {"topk_ids": ids.astype(np.int32).reshape(-1, k),
                "topk_logprobs": np.asarray(logprobs, dtype=np.float16).reshape(-1, k), "tail_logmass": tail}
    ids = ids.astype(np.int64).reshape(-1, k)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"a token id outside the vocabulary of {vocab_size}")
    planes = high_bit_planes(vocab_size)
    high = np.stack([np.packbits((ids >> (16 + b)) & 1, axis=-1) for b in range(planes)], axis=1) if planes \
        else np.zeros((len(ids), 0, (k + 7) // 8), np.uint8)  # (R, P, K/8)
    sqrt_p = np.sqrt(np.exp(np.asarray(logprobs, dtype=np.float64).reshape(-1, k)))
    return {"topk_ids_low": (ids & 0xFFFF).astype(np.uint16), "topk_ids_high": high.astype(np.uint8),
            "topk_sqrt_p": np.clip(np.rint(LEVELS * sqrt_p), 0, LEVELS).astype(np.uint8), "tail_logmass": tail}


def decode(encoding: str, stored: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (R, K) int32, logprobs (R, K), tail_logmass (R,)) from the stored tensors of R tokens: the
    fp16 encoding's arrays as they are stored (views), the compact one's decoded (float32)."""
    check(encoding)
    tail = stored["tail_logmass"]
    if encoding == "fp16":
        return stored["topk_ids"], stored["topk_logprobs"], tail
    low, high, codes = stored["topk_ids_low"], stored["topk_ids_high"], stored["topk_sqrt_p"]
    ids = low.astype(np.int32)
    for b in range(high.shape[1]):
        ids |= np.unpackbits(high[:, b], axis=-1, count=low.shape[1]).astype(np.int32) << (16 + b)
    p = np.where(codes == 0, ZERO_CODE_P, (codes.astype(np.float64) / LEVELS) ** 2)  # (R, K)
    top_mass = -np.expm1(tail.astype(np.float64))  # 1 - tail mass
    p *= (top_mass / p.sum(-1))[:, None]
    return ids, np.log(p).astype(np.float32), tail
