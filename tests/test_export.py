"""`llmkd export --to transformers`: the folder a user serves loads with plain transformers + peft, scores
what llmkd measured (the gate, in a fresh process), and bad input is one line with nothing written."""

import json

import pytest
import torch

from conftest import REPO, stand_in_overrides
from llmkd import builder, export, models, train
from llmkd.config import MERGE_CALIBRATION_TOKENS, load_recipe
from llmkd.errors import LlmkdError

TINY = ["name=tiny", "transfer_set.out=", "transfer_set.start=746", "transfer_set.count=4", "transfer_set.batch_size=4",
        "train.batch_size=4", "train.max_steps=2", "train.warmup_steps=0", "train.schedule=constant", "train.lr=5e-3",
        "train.loss.alpha=0.5", "eval.limit=1", "eval.batch_size=1", "eval.max_new_tokens=4", "eval.shots=[0]",
        "eval.fidelity_count=2", "eval.fidelity_start=1000"]


def _finished(stand_in, home, *overrides):
    import os

    (home / "recipes").symlink_to(REPO / "recipes")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        recipe = load_recipe(REPO / "recipes/smollm2-cpu.yaml", stand_in_overrides(stand_in, *TINY, *overrides))
        builder.build(recipe, progress=False)  # export needs the adapter, not the run's evaluation
        train.train(recipe, progress=False)
    finally:
        os.chdir(cwd)
    return home, recipe


@pytest.fixture(scope="module")
def finished_run(stand_in, tmp_path_factory):
    """A finished training run on the stand-in (its adapter written), in a folder of its own."""
    return _finished(stand_in, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def hqq_run(stand_in, tmp_path_factory):
    """The same with an HQQ student (4 bits, group 64: what vLLM's HQQ loader takes)."""
    return _finished(stand_in, tmp_path_factory.mktemp("hqq-run"), "model.quant=hqq4")


def test_the_export_loads_in_plain_transformers_and_peft_and_scores_what_llmkd_measured(finished_run, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home, recipe = finished_run
    monkeypatch.chdir(home)
    out = export.export(export.recipe_of(["runs/tiny"]), out=home / "exported", check=2, say=lambda _: None)
    record = json.loads((out / "export.json").read_text())
    for tag in ("student", "distilled"):  # the gate: the engine's figures against llmkd's on the same rows
        assert record["engine"][tag]["kl"] == pytest.approx(record["llmkd"][tag]["kl"], rel=1e-4, abs=1e-7)
        assert record["engine"][tag]["tokens"] == record["llmkd"][tag]["tokens"] > 0
        # generate with the folder's generation_config.json gives llmkd's greedy outputs
        assert record["engine"][tag]["same_output_as_llmkd"] == 1.0 and len(record["engine"][tag]["outputs"]) == 2
    assert record["engine"]["distilled"]["kl"] != record["engine"]["student"]["kl"]  # the adapter acts
    # What a user does, here in this process: the folder alone, no recipe, gives llmkd's distilled student.
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}),
                                       str(out / "adapter")).eval()
    ours = models.load_student(recipe.model, recipe.layout.adapter)
    ids = models.load_tokenizer(recipe.model)("Natalia sold clips.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)
    config = json.loads((out / "generation_config.json").read_text())
    assert config["do_sample"] is False and config["max_new_tokens"] == 4 and "Question:" in config["stop_strings"]
    assert "vllm serve" in (out / "README.md").read_text() and (out / "chat_template.jinja").is_file()
    # Exporting the same run again to the same folder replaces it; nothing is left beside it.
    export.export(recipe, out=out, check=1, say=lambda _: None)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith((".exported", "exported"))) == ["exported"]


def test_a_merged_nf4_student_loads_in_plain_transformers_at_the_base_s_size(finished_run, monkeypatch):
    """`--to merged` for bitsandbytes: one checkpoint, no adapter, gated in a fresh process by plain transformers."""
    from transformers import AutoModelForCausalLM

    from llmkd import merge

    home, recipe = finished_run
    monkeypatch.chdir(home)
    out = export.export(recipe, to="merged", out=home / "merged", check=2, recovery_steps=3, recovery_lr=1e-4,
                        say=lambda _: None)
    record = json.loads((out / "export.json").read_text())
    assert not (out / "adapter").exists() and (out / "generation_config.json").is_file()
    assert record["weight_bytes"]["merged"] == record["weight_bytes"]["base"] > 0
    assert record["recovery"]["steps"] == 3 and len(record["recovery"]["losses"]) == 3
    assert 0 < record["recovery"]["merge_calibration_tokens"] <= MERGE_CALIBRATION_TOKENS  # the tiny set's, in blocks
    for tag, ours in (("student", "student"), ("distilled", "merged")):  # the engine scores what llmkd did
        assert record["engine"][tag]["kl"] == pytest.approx(record["llmkd"][ours]["kl"], rel=1e-4, abs=1e-7)
        assert record["engine"][tag]["same_output_as_llmkd"] == 1.0
    assert record["llmkd"]["merged"]["kl"] != record["llmkd"]["requantized"]["kl"]  # recovery moved the absmax
    assert "bitsandbytes" in (out / "README.md").read_text()
    # The folder holds the merged and recovered student itself: the same recovery again gives its weights.
    tokenizer = models.load_tokenizer(recipe.model)
    _, recovered, _ = merge.merged_students(recipe, recipe.layout.adapter, tokenizer, steps=3, lr=1e-4, progress=False)
    served = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    ids = tokenizer("Natalia sold clips.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, recovered(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_an_hqq_student_goes_out_in_hqq_s_serialization_with_its_adapter_and_merged(hqq_run, monkeypatch):
    """HQQ students: safetensors of hqq's layer state dicts with the quantization_config vLLM reads, loaded in
    the gate's fresh process by hqq + transformers + peft, and by the model card's own snippet here."""
    from peft import PeftModel

    from llmkd.model_cards import HQQ_LOAD

    home, recipe = hqq_run
    monkeypatch.chdir(home)
    out = export.export(recipe, out=home / "hqq", check=2, say=lambda _: None)
    record = json.loads((out / "export.json").read_text())
    for tag in ("student", "distilled"):
        assert record["engine"][tag]["kl"] == pytest.approx(record["llmkd"][tag]["kl"], rel=1e-4, abs=1e-7)
        assert record["engine"][tag]["same_output_as_llmkd"] == 1.0
    assert record["engine"]["distilled"]["kl"] != record["engine"]["student"]["kl"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hqq" and config["skip_modules"] == ["lm_head"]
    assert (config["quant_config"]["weight_quant_params"]["nbits"], config["quant_config"]["weight_quant_params"]["group_size"]) == (4, 64)
    card = (out / "README.md").read_text()
    assert "vllm serve DIR --quantization hqq --enable-lora" in card and "HQQ 4-bit, group size 64" in card
    scope: dict = {}
    exec(HQQ_LOAD.replace("DIR", str(out)), scope)  # what the card tells a user to run, with no llmkd code
    served = PeftModel.from_pretrained(scope["model"], str(out / "adapter")).eval()
    ours = models.load_student(recipe.model, recipe.layout.adapter)
    ids = models.load_tokenizer(recipe.model)("Natalia sold clips.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)
    merged = export.export(recipe, to="merged", out=home / "hqq-merged", check=2, recovery_steps=3, say=lambda _: None)
    record = json.loads((merged / "export.json").read_text())
    assert not (merged / "adapter").exists() and record["weight_bytes"]["merged"] == record["weight_bytes"]["base"] > 0
    for tag, ours_tag in (("student", "student"), ("distilled", "merged")):
        assert record["engine"][tag]["kl"] == pytest.approx(record["llmkd"][ours_tag]["kl"], rel=1e-4, abs=1e-7)
    assert record["llmkd"]["merged"]["kl"] != record["llmkd"]["requantized"]["kl"]  # recovery moved the scales
    assert "group scales and zeros" in (merged / "README.md").read_text()


def test_bad_input_is_one_line_and_writes_nothing(finished_run, monkeypatch, tmp_path):
    home, recipe = finished_run
    monkeypatch.chdir(home)
    int8 = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quant": "int8"})})
    cases = {
        "no run": (load_recipe(None, ["name=never"]), tmp_path / "a", "transformers", "no run"),
        "gguf": (recipe, tmp_path / "b", "gguf", "train model.quant=gguf-q4_0"),
        "merged": (int8, tmp_path / "f", "merged", "HQQ and nf4 and fp4 students, not int8; export --to transformers"),
    }
    for name, (r, out, to, says) in cases.items():
        with pytest.raises(LlmkdError, match=says) as err:
            export.export(r, to=to, out=out, check=1, say=lambda _: None)
        assert "\n" not in str(err.value) and not out.exists(), name
    (home / "runs" / "half" / "train" / "checkpoints").mkdir(parents=True)
    with pytest.raises(LlmkdError, match="an unfinished run"):
        export.export(load_recipe(None, ["name=half"]), out=tmp_path / "d", check=1)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(LlmkdError, match="not an llmkd export"):
        export.export(recipe, out=taken, check=1)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    # A gate that fails publishes nothing.
    monkeypatch.setattr(export, "engine", lambda folder, r, rows, **_: {
        tag: {"kl": 9.0, "top1_agreement": 0.0, "tokens": 1} for tag in ("student", "distilled")})
    with pytest.raises(LlmkdError, match="the fidelity gate failed, nothing published: student KL 9.00000"):
        export.export(recipe, out=tmp_path / "e", check=1, say=lambda _: None)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e*"))
