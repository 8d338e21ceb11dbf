import subprocess
import sys

import pytest

from llmkd.cli import main, make_parser


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmkd", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    help_text = make_parser().format_help()
    for command in ["build-transfer-set", "train", "eval", "run", "recipe"]:
        assert command in help_text


def test_recipe_keys_lists_documented_keys(capsys):
    assert main(["recipe", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.loss.alpha = 0.0" in out and "Weight of the hard-label cross-entropy" in out


def test_recipe_prints_resolved_overrides(capsys):
    assert main(["recipe", "recipes/gsm8k.yaml", "train.lr=1e-4"]) == 0
    assert "lr: 0.0001" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["recipe", "recipes/nope.yaml"], "recipe not found: recipes/nope.yaml"),
    (["recipe", "recipes/gsm8k.yaml", "train.lrr=1"], "unknown key 'train.lrr'"),
    (["eval", "recipes/smollm2-cpu.yaml", "--limit", "0"], "--limit must be > 0"),
    (["eval", "--teacher", "--fidelity"], "--fidelity compares a student"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
