"""Shared fixtures: the embedded default model (converted once per machine), loaded once per session.

No test touches the network: the hub is switched off for the whole session, so a hub access fails
fast instead of retrying. No test touches the checkout's runs/ or transfer_sets/: each test runs in
its own scratch folder, which sees the repo's recipes/ (a link) and nothing else of it.
"""

import os
from pathlib import Path

# Busy-waiting OpenMP threads stall 20-30x when anything else shares the 2 cores; must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from llmkd.config import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def scratch_dir(tmp_path, monkeypatch):
    """Run each test in tmp_path: default outputs (runs/<name>, transfer_sets/<name>) land there."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# The real teacher in fp32: the tests compare its outputs across batch shapes (batched build against a
# fresh forward, two backends), which a bf16 teacher (auto on AMX CPUs) matches only to about 0.5 nats;
# `test_models` checks what auto picks. Every recipe handed the session's teacher says the same.
FP32_TEACHER = "model.teacher_dtype=float32"


@pytest.fixture(scope="session")
def smol_recipe():
    """The CPU recipe (FP32_TEACHER), shrunk so a real evaluation takes seconds."""
    return load_recipe(REPO / "recipes/smollm2-cpu.yaml", [
        FP32_TEACHER,
        "eval.limit=3", "eval.batch_size=3", "eval.max_new_tokens=48",
        "eval.fidelity_count=4", "eval.fidelity_start=1000",
    ])


@pytest.fixture(scope="session")
def train():
    """GSM8K's train split as shipped."""
    from llmkd.data.gsm8k import load_gsm8k

    return load_gsm8k("train")


@pytest.fixture(scope="session")
def test_split():
    from llmkd.data.gsm8k import load_gsm8k

    return load_gsm8k("test")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_recipe):
    from llmkd import models

    return models.load_tokenizer(smol_recipe.model)


@pytest.fixture(scope="session")
def smol_teacher(smol_recipe):
    from llmkd import models

    return models.load_teacher(smol_recipe.model)


@pytest.fixture(scope="session")
def smol_student(smol_recipe):
    from llmkd import models

    return models.load_student(smol_recipe.model)


# --- The 2-layer random stand-in of the embedded model ------------------------------------------------
# For tests about mechanics (stages run, outputs land where the layout says, reuse, kill-and-resume equals
# uninterrupted, two ranks equal one process, fast paths on == off): the embedded model's architecture and
# tokenizer with 2 random layers, so a forward costs a fraction of the real 30 layers'. Tests that need the
# real model's behaviour (an eos, sensible answers, the NF4 gap's size) stay on the smol_* fixtures above.

# fp32 teacher and compute: the same numbers on every CPU, whatever the dtype probe picks.
STAND_IN_MODEL = ["model.teacher_dtype=float32", "model.compute_dtype=float32"]
# The 4 shortest consecutive GSM8K train questions (prompt + gold solution), in one batch.
STAND_IN_SET = ["transfer_set.start=746", "transfer_set.count=4", "transfer_set.batch_size=4"]


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory):
    """benchmarks/gpu_check.py's random stand-in (the embedded tokenizer, 2 random layers), built once."""
    import sys

    from llmkd import models

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check.random_stand_in(models.embedded_model_dir(), tmp_path_factory.mktemp("stand-in") / "m", layers=2)


# The CPU recipe's activation init, sized for STAND_IN_SET's ~560 tokens: the mechanics tests run it too.
STAND_IN_INIT = ["lora.init_batch=1", "lora.init_tokens=512", "lora.init_steps=4"]


def stand_in_overrides(stand_in, *extra) -> list[str]:
    """Recipe overrides that put the stand-in in place of the embedded model."""
    return [f"model.name={stand_in}", *STAND_IN_MODEL, *STAND_IN_INIT, *extra]


@pytest.fixture(scope="session")
def stand_in_transfer_set(stand_in, tmp_path_factory):
    """A gold-mode transfer set of STAND_IN_SET built by the stand-in teacher (the recipe's top-32, compact)."""
    from llmkd.builder import build

    out = tmp_path_factory.mktemp("stand-in-set") / "set"
    build(load_recipe(REPO / "recipes/smollm2-cpu.yaml", stand_in_overrides(stand_in, *STAND_IN_SET)), out=out,
          progress=False)
    return out


@pytest.fixture(scope="session")
def stand_in_teacher(stand_in):
    from llmkd import models
    from llmkd.config import ModelConfig

    return models.load_teacher(ModelConfig(name=str(stand_in), teacher_dtype="float32"))
