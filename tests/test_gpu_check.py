"""`make gpu-check` (benchmarks/gpu_check.py): what of it can run without a GPU."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr, proc.stderr


def test_the_random_stand_in_loads_and_runs_through_llmkd(stand_in):
    # Without the embedded wheel the check builds this: the embedded tokenizer, random weights
    # (conftest's session-wide `stand_in` is gpu_check.random_stand_in's, 2 layers).
    from llmkd import models
    from llmkd.config import ModelConfig

    cfg = ModelConfig(name=str(stand_in), teacher_dtype="float32")
    tok, model = models.load_tokenizer(cfg), models.load_teacher(cfg)
    ids = tok("Question: 2+2?", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok) and model.config.num_hidden_layers == 2
