import datasets
import huggingface_hub
import pytest

from llmkd.data.answer import parse_gold
from llmkd.data.gsm8k import load_gsm8k, question_hash, select_range
from llmkd.errors import LlmkdError


def test_sizes_and_columns(train, test_split):
    assert (len(train), len(test_split)) == (7473, 1319)
    for ds in (train, test_split):
        assert all(list(r) == ["question", "answer", "index", "id", "gold", "question_hash"] for r in ds)


def test_ids_and_index(train, test_split):
    assert [r["id"] for r in test_split[:2]] == ["gsm8k-test-00000", "gsm8k-test-00001"]
    assert train[-1]["id"] == "gsm8k-train-07472"
    assert [r["index"] for r in test_split] == list(range(1319))
    assert len({r["id"] for r in train} | {r["id"] for r in test_split}) == 7473 + 1319


def test_first_rows(train, test_split):
    assert train[0]["question"].startswith("Natalia sold clips to 48 of her friends")
    assert train[0]["gold"] == "72"
    assert test_split[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs per day")
    assert test_split[0]["gold"] == "18"


def test_gold_column(train, test_split):
    for ds in (train, test_split):
        assert [r["gold"] for r in ds] == [parse_gold(r["answer"]) for r in ds]
    assert "," not in "".join(r["gold"] for r in train)  # "#### 1,080" rows are normalised


def test_question_hash_column_and_no_train_test_overlap(train, test_split):
    assert test_split[5]["question_hash"] == question_hash(test_split[5]["question"])
    assert len({r["question_hash"] for r in test_split}) == 1319
    assert not {r["question_hash"] for r in train} & {r["question_hash"] for r in test_split}


def test_question_hash_stable_and_whitespace_insensitive():
    q = "Natalia sold clips to 48 of her friends in April."
    assert question_hash(q) == "3e999774f55c1046"  # pinned: a change breaks stored guards
    assert len(question_hash(q)) == 16
    messy = "  Natalia sold clips\nto 48  of her\tfriends in April. "
    assert question_hash(messy) == question_hash(q)
    assert question_hash(q.replace("48", "49")) != question_hash(q)


def test_loading_is_cached():
    assert load_gsm8k("test") is load_gsm8k("test")


@pytest.mark.parametrize(
    "split, source, named", [("validation", "local", "validation"), ("test", "s3", "s3")]
)
def test_unknown_split_or_source(split, source, named):
    with pytest.raises(LlmkdError) as err:
        load_gsm8k(split, source)
    assert named in str(err.value)
    assert "train, test" in str(err.value) or "local, hub" in str(err.value)


def test_hub_source_offline_is_an_llmkd_error(monkeypatch, tmp_path):
    # The env vars cover fresh imports; datasets and huggingface_hub read them at import time,
    # so the already imported constants are patched too. An empty cache dir: no cached copy.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(LlmkdError) as err:
        load_gsm8k("test", source="hub")
    message = str(err.value)
    assert "\n" not in message
    assert "hub" in message and "source: local" in message


def test_select_range(test_split):
    part = select_range(test_split, 10, 5)
    assert [r["index"] for r in part] == [10, 11, 12, 13, 14]
    assert [r["index"] for r in select_range(test_split, 1300, None)] == list(range(1300, 1319))
    assert len(select_range(test_split, 0, None)) == 1319
    assert [r["index"] for r in select_range(test_split, 1310, 100)] == list(range(1310, 1319))  # cut


@pytest.mark.parametrize(
    "start, count, words",
    [(-1, 5, "start"), (0, 0, "count"), (0, -3, "count"), (1319, None, "1319"), (5000, 1, "1319")],
)
def test_select_range_errors(test_split, start, count, words):
    with pytest.raises(LlmkdError, match=words):
        select_range(test_split, start, count)
