"""The transfer set's two encodings of the teacher's targets, against references written here from the
format's description (transfer_sets/README.md): bit planes read bit by bit, bytes from math.sqrt."""

import json
import math

import numpy as np
import pytest
import torch

from llmkd import topk_encoding, transfer_set
from llmkd.errors import LlmkdError
from llmkd.losses import sparse_kd_loss, topk_with_tail


def targets(vocab: int, k: int, rows: int = 64, seed: int = 0, scale: float = 4.0):
    """`topk_with_tail` of random logits, some peaked (p1 near 1, the rest below a byte's first step)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    logits[: rows // 4, 7] += 40  # peaked rows
    return topk_with_tail(logits, k)


@pytest.mark.parametrize("vocab", [49_152, 65_536, 65_537, 128_256, 1 << 20])
def test_compact_ids_are_the_low_16_bits_plus_bit_planes(vocab):
    k = 11  # not a multiple of 8: the last byte of a plane is part padding
    ids = np.random.default_rng(vocab).integers(0, vocab, size=(5, k))
    ids[0, :4] = [0, vocab - 1, min(65_535, vocab - 1), min(65_536, vocab - 1)]
    stored = topk_encoding.encode("compact", ids, np.full((5, k), -5.0), np.full(5, -1.0), vocab)
    planes = max(0, math.ceil(math.log2(vocab)) - 16)
    assert stored["topk_ids_high"].shape == (5, planes, 2) and stored["topk_ids_low"].dtype == np.uint16
    for r in range(5):
        for j in range(k):  # np.packbits' order: the first id's bit is the first byte's highest bit
            high = sum(((int(stored["topk_ids_high"][r, b, j // 8]) >> (7 - j % 8)) & 1) << (16 + b) for b in range(planes))
            assert int(stored["topk_ids_low"][r, j]) + high == ids[r, j]
    decoded, _, _ = topk_encoding.decode("compact", stored)
    assert decoded.dtype == np.int32 and np.array_equal(decoded, ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        topk_encoding.encode("compact", ids + vocab, np.zeros((5, k)), np.zeros(5), vocab)


def test_compact_probability_bytes_and_their_decoding():
    ids, logprobs, tail = targets(49_152, 32)
    stored = topk_encoding.encode("compact", ids.numpy(), logprobs.numpy(), tail.numpy(), 49_152)
    p = logprobs.double().exp().numpy()
    expected = [[min(255, round(255 * math.sqrt(x))) for x in row] for row in p.tolist()]
    assert stored["topk_sqrt_p"].tolist() == expected  # ties at .5 do not occur in random data
    assert (stored["topk_sqrt_p"] == 0).any() and (stored["topk_sqrt_p"] == 255).any()  # both ends reached
    _, decoded, decoded_tail = topk_encoding.decode("compact", stored)
    q = np.exp(decoded.astype(np.float64))
    np.testing.assert_array_equal(decoded_tail, tail.numpy().astype(np.float16))
    np.testing.assert_allclose(q.sum(-1), 1 - np.exp(decoded_tail.astype(np.float64)), rtol=1e-6)  # rescaled to 1 - tail
    # KL between the true and the decoded K + 1 buckets: the rounding's, 2.6e-6 nats per entry on average.
    p_tail, q_tail = np.exp(tail.double().numpy()), np.exp(decoded_tail.astype(np.float64))
    kl = (p * np.log(p / q)).sum(-1) + p_tail * np.log(p_tail / q_tail)
    assert (kl >= -1e-9).all() and kl.max() < 32 * 2 / 255**2
    assert 0.3 < kl.mean() / (32 / (6 * 255**2)) < 2.0


@pytest.mark.parametrize("encoding", topk_encoding.ENCODINGS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_equal_to_the_teacher_has_a_loss_at_the_encodings_rounding(encoding, temperature):
    """Self-divergence through each encoding: the loss of the teacher's own logits against its stored
    targets is the rounding's KL (near 0), at every temperature the recipe can set."""
    vocab, k = 512, 32
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, vocab, generator=g) * 3
    ids, logprobs, tail = topk_with_tail(logits, k)
    stored = topk_encoding.encode(encoding, ids.numpy(), logprobs.numpy(), tail.numpy(), vocab)
    d_ids, d_lp, d_tail = (torch.from_numpy(np.asarray(a)) for a in topk_encoding.decode(encoding, stored))
    labels, mask = ids[:, 0], torch.ones(len(ids), dtype=torch.bool)
    exact = sparse_kd_loss(logits, labels, ids, logprobs, tail, mask, alpha=0.0, temperature=temperature)
    loss = sparse_kd_loss(logits, labels, d_ids.long(), d_lp.float(), d_tail.float(), mask, alpha=0.0,
                          temperature=temperature)
    assert abs(float(exact.kl)) < 1e-6
    assert -1e-7 < float(loss.kl) < (2e-4 if encoding == "compact" else 1e-5)


def test_a_compact_shard_reads_back_and_says_its_encoding(tmp_path):
    k, vocab, lengths, starts = 5, 128_256, [6, 3], [3, 1]
    ids, logprobs, tail = targets(vocab, k, rows=5)
    ids[0, 0] = vocab - 1  # an id with its 17th bit set
    cut = [0, 3, 5]  # example i's response rows
    columns = {"id": ["q0", "q1"], "question_hash": ["h0", "h1"], "finish": ["eos", "gold"], "response_start": starts,
               "input_ids": [np.arange(n) for n in lengths],
               **{name: [t[cut[i] : cut[i + 1]].numpy() for i in range(2)]
                  for name, t in (("topk_ids", ids), ("topk_logprobs", logprobs), ("tail_logmass", tail))}}
    path = tmp_path / "c.safetensors"
    transfer_set.write_shard(path, columns, k, "compact", vocab)
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    per_token = 2 * k + 1 * (k + 7) // 8 + k + 2  # low ids, one plane, a byte per p, the tail
    assert topk_encoding.bytes_per_token("compact", k, vocab) == per_token
    assert path.stat().st_size == 8 + header_size + 4 * 9 + 8 * 3 + 4 * 2 + per_token * 5
    rows = list(transfer_set.Examples.read([path], k, "compact"))
    for i, row in enumerate(rows):
        assert np.array_equal(row["topk_ids"], columns["topk_ids"][i])
        assert np.array_equal(row["input_ids"], columns["input_ids"][i]) and row["id"] == columns["id"][i]
        p, q = np.exp(columns["topk_logprobs"][i].astype(np.float64)), np.exp(row["topk_logprobs"].astype(np.float64))
        assert np.abs(np.sqrt(p) - np.sqrt(q)).max() < 1 / 255
    with pytest.raises(LlmkdError, match=r"c\.safetensors: holds the compact encoding of the teacher's targets, the manifest says fp16"):
        transfer_set.read_shard(path, k, "fp16")


def test_a_version_4_set_is_read_as_the_fp16_encoding_it_holds(tmp_path):
    from test_transfer_set import random_columns

    k = 4
    folder = tmp_path / "v4"
    transfer_set.write_shard(folder / transfer_set.shard_name(0), random_columns([5, 2], [2, 1], k), k)
    shard = folder / transfer_set.shard_name(0)
    settings = {f.name: None for f in transfer_set.Settings.__dataclass_fields__.values()} | {"top_k": k}
    del settings["encoding"]  # version 4 had no encoding: it was fp16
    manifest = {
        "format_version": 4, "llmkd_version": "0", "settings_hash": "x", "settings": settings, "teacher": {},
        "question_ids": ["q0", "q1"], "question_hashes": ["h0", "h1"], "excluded_exemplar_ids": [],
        "shards": [{"file": transfer_set.shard_name(0), "examples": 2, "response_tokens": 3,
                    "bytes": shard.stat().st_size, "sha256": transfer_set.models.sha256_file(shard),
                    "mean_topk_mass": 0.9, "seconds": 0.0}],
        "totals": {"examples": 2, "response_tokens": 3, "bytes": 0, "bytes_per_token": 0.0,
                   "full_vocab_fp16_bytes_per_token": 0, "mean_topk_mass": 0.9},
        "build": {"seconds": 0.0, "tokens_per_s": 0.0, "processes": 1}, "provenance": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    ts = transfer_set.TransferSet.open(folder)
    assert ts.manifest.settings.encoding == "fp16"
    ts.verify()
    assert len(ts.examples()) == 2
    (folder / "manifest.json").write_text(json.dumps(manifest | {"format_version": 3}))
    with pytest.raises(LlmkdError, match="format_version 3, this llmkd reads versions 4, 5"):
        transfer_set.TransferSet.open(folder)


@pytest.mark.parametrize("encoding", topk_encoding.ENCODINGS)
@pytest.mark.parametrize("bad", ["nan_logprob", "inf_tail"])
def test_a_teacher_target_that_is_not_finite_is_refused_in_every_encoding(encoding, bad):
    """compact stores bytes of sqrt(p), where a NaN would become a 0: the builder checks before encoding."""
    from llmkd.teacher_scoring import shard_columns

    ids, logprobs, tail = targets(49_152, 8, rows=6)
    if bad == "nan_logprob":
        logprobs[4, 3] = float("nan")
    else:
        tail[2] = float("inf")
    rows = [{"id": "gsm8k-train-00001", "question_hash": "h"}]
    with pytest.raises(LlmkdError, match="teacher produced non-finite log-probabilities on gsm8k-train-00001 \\(shard 0\\)"):
        shard_columns(rows, [list(range(8))], [2], ["gold"], [(ids, logprobs, tail)], where="shard 0",
                      encoding=encoding, vocab_size=49_152)
    ids, logprobs, tail = targets(49_152, 8, rows=6)
    columns, masses = shard_columns(rows, [list(range(8))], [2], ["gold"], [(ids, logprobs, tail)], where="shard 0",
                                    encoding=encoding, vocab_size=49_152)
    np.testing.assert_allclose(masses, 1 - tail.double().exp().numpy(), rtol=2e-3)  # the stored top-k mass
