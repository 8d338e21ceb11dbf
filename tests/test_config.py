from pathlib import Path

import pytest

from llmkd.config import Recipe, field_docs, load_recipe
from llmkd.errors import LlmkdError

RECIPES = sorted(Path("recipes").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    assert isinstance(load_recipe(path), Recipe)


def test_reference_recipe_has_the_study_settings():
    r = load_recipe("recipes/gsm8k.yaml")
    assert r.model.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert (r.model.quant, r.model.double_quant, r.model.compute_dtype) == ("nf4", True, "bfloat16")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (4, 8, 0.2)
    assert (r.train.epochs, r.train.batch_size, r.train.optimizer) == (2, 8, "sgd")
    assert r.train.lr == pytest.approx(5e-8) and r.train.momentum == 0.9
    assert (r.transfer_set.start, r.transfer_set.count) == (0, 1000)
    assert r.eval.shots == [0, 8]


def test_unknown_key_names_file_and_dotted_path(tmp_path):
    p = write(tmp_path, "train:\n  loss:\n    temprature: 2\n")
    with pytest.raises(LlmkdError, match=r"r\.yaml: train\.loss\.temprature: unknown key"):
        load_recipe(p)


def test_wrong_type_and_range_reported_together(tmp_path):
    p = write(tmp_path, "train:\n  lr: fast\neval:\n  batch_size: 0\n")
    with pytest.raises(LlmkdError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "train.lr" in msg and "eval.batch_size" in msg and "\n" not in msg


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 5e-8 as the string "5e-8"; the schema must still take it as a number.
    assert load_recipe(write(tmp_path, "train:\n  lr: 5e-8\n")).train.lr == pytest.approx(5e-8)


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(LlmkdError, match=r"line \d+ malformed YAML"):
        load_recipe(write(tmp_path, "train:\n  lr: [1,\n  epochs: 2\n"))


def test_missing_recipe_file():
    with pytest.raises(LlmkdError, match="recipe not found: nowhere.yaml"):
        load_recipe("nowhere.yaml")


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(LlmkdError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_overrides_are_coerced_and_checked():
    r = load_recipe(None, ["train.lr=1e-4", "eval.shots=[0, 4]", "lora.target_modules=[q_proj]", "eval.limit=null"])
    assert r.train.lr == pytest.approx(1e-4) and r.eval.shots == [0, 4]
    assert r.lora.target_modules == ["q_proj"] and r.eval.limit is None
    for bad, match in [("train.lrr=1", "unknown key 'train.lrr'"), ("train.lr.x=1", "is a value, not a section"),
                       ("lr", "not key=value"), ("eval.batch_size=-2", "eval.batch_size")]:
        with pytest.raises(LlmkdError, match=match):
            load_recipe(None, [bad])


def test_zero_or_negative_sizes_are_refused():
    for key in ["transfer_set.top_k=0", "train.batch_size=0", "transfer_set.count=-1", "eval.shots=[-1]",
                "lora.dropout=1.5", "train.loss.alpha=2"]:
        with pytest.raises(LlmkdError):
            load_recipe(None, [key])


def test_every_field_is_documented():
    assert [key for key, doc, _ in field_docs() if not doc] == []


def test_an_empty_recipe_file_is_refused(tmp_path):
    with pytest.raises(LlmkdError, match="empty recipe"):
        load_recipe(write(tmp_path, "# nothing here\n"))


def test_every_output_path_follows_the_name_unless_set():
    layout = load_recipe(None, ["name=foo"]).layout
    for path in (layout.transfer_set, layout.train, layout.eval, layout.report, layout.adapter, layout.metrics):
        assert path.parts[:2] == ("runs", "foo"), path
    explicit = load_recipe(None, ["name=foo", "train.out=/tmp/t", "transfer_set.out=sets/x"]).layout
    assert explicit.train == Path("/tmp/t") and explicit.transfer_set == Path("sets/x")
    assert explicit.eval == Path("runs/foo/eval")
    shipped = load_recipe("recipes/smollm2-cpu.yaml", ["name=foo"]).layout  # pins its transfer set only
    assert shipped.transfer_set == Path("transfer_sets/smollm2-cpu-mixed-top32") and shipped.train == Path("runs/foo/train")
    with pytest.raises(LlmkdError, match="name"):
        load_recipe(None, ["name=../up"])


def test_a_sweep_point_takes_its_own_overrides_and_only_settings_a_point_may_change(tmp_path):
    from llmkd.sweep import point_recipe

    r = load_recipe("recipes/smollm2-sweep.yaml", ["sweep.point_overrides={int8: [train.lr=2.5e-4, lora.r=4]}"])
    int8, nf4 = point_recipe(r, "int8"), point_recipe(r, "nf4")
    assert (int8.train.lr, int8.lora.r, int8.model.quant, int8.name) == (2.5e-4, 4, "int8", "smollm2-sweep-int8")
    assert (nf4.train.lr, nf4.lora.r) == (r.train.lr, r.lora.r)
    # A point's settings are its own: another point's overrides do not touch them (nor its reuse).
    other = load_recipe("recipes/smollm2-sweep.yaml", ["sweep.point_overrides={hqq8: [train.lr=1e-5]}"])
    assert point_recipe(other, "nf4").flat() == nf4.flat() and nf4.sweep == Recipe().sweep
    assert int8.layout.transfer_set == nf4.layout.transfer_set == r.layout.transfer_set  # one set for all points

    with pytest.raises(LlmkdError, match=r"int8: 'eval.limit' is not a setting a point may change"):
        load_recipe("recipes/smollm2-sweep.yaml", ["sweep.point_overrides={int8: [eval.limit=3]}"])
    with pytest.raises(LlmkdError, match=r"sweep.point_overrides.int8: override train.lrr: unknown key 'train.lrr'"):
        point_recipe(load_recipe("recipes/smollm2-sweep.yaml", ["sweep.point_overrides={int8: [train.lrr=1]}"]), "int8")
    with pytest.raises(LlmkdError, match=r"sweep.point_overrides.int8: train.lr: .*greater than 0"):
        point_recipe(load_recipe("recipes/smollm2-sweep.yaml", ["sweep.point_overrides={int8: [train.lr=-1]}"]), "int8")
    with pytest.raises(LlmkdError, match=r"sweep.point_overrides.hqq9"):
        load_recipe("recipes/smollm2-sweep.yaml", ["sweep.point_overrides={hqq9: [train.lr=1e-4]}"])


def test_a_sweep_baseline_trains_beside_each_point_with_its_own_overrides_and_run_folder():
    from llmkd.sweep import point_recipe

    r = load_recipe("recipes/smollm2-sweep.yaml")
    method, plain = point_recipe(r, "int8"), point_recipe(r, "int8", baseline=True)
    assert (method.lora.init, method.train.lr, method.name) == ("activations", 2.5e-5, "smollm2-sweep-int8")
    assert (plain.lora.init, plain.train.lr, plain.name) == ("default", 2.5e-4, "smollm2-sweep-int8-plain-kd")
    assert point_recipe(r, "nf4", baseline=True).train.lr == 1e-3  # overrides, then no point override
    assert plain.layout.transfer_set == method.layout.transfer_set and plain.layout.run != method.layout.run
    # Everything else is the method's: the baseline differs in exactly the keys it overrides.
    differ = {k for k, v in method.flat().items() if plain.flat()[k] != v}
    assert differ == {"name", "lora.init", "train.lr"}, differ

    with pytest.raises(LlmkdError, match=r"sweep.baseline: .*overrides: .eval.limit. is not a setting a point may change"):
        load_recipe("recipes/smollm2-sweep.yaml", ["sweep.baseline.overrides=[eval.limit=3]"])
    with pytest.raises(LlmkdError, match=r"sweep.baseline: .*point_overrides.hqq8: .model.quant. is not"):
        load_recipe("recipes/smollm2-sweep.yaml", ["sweep.baseline.point_overrides={hqq8: [model.quant=nf4]}"])
    with pytest.raises(LlmkdError, match=r"sweep.baseline.nf4: override lora.nit: unknown key"):
        point_recipe(load_recipe("recipes/smollm2-sweep.yaml", ["sweep.baseline.overrides=[lora.nit=default]"]),
                     "nf4", baseline=True)
    with pytest.raises(LlmkdError, match=r"sweep.baseline.name"):
        load_recipe("recipes/smollm2-sweep.yaml", ["sweep.baseline.name=Plain KD"])
