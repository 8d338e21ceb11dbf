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


@pytest.fixture(scope="session")
def smol_recipe():
    """The CPU recipe, shrunk so a real evaluation takes seconds."""
    return load_recipe(REPO / "recipes/smollm2-cpu.yaml", [
        "eval.limit=3", "eval.batch_size=3", "eval.max_new_tokens=48",
        "eval.fidelity_count=4", "eval.fidelity_start=1000",
    ])


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
