import argparse
import subprocess
import sys

import pytest

from llmkd.cli import main, make_parser


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmkd", *args], capture_output=True, text=True, timeout=120)


def test_the_parser_has_every_command_and_its_help_names_each():
    # The parser's own sub-commands: a help text search would find "train" and "eval" in other words.
    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = ["build-transfer-set", "train", "eval", "run", "sweep", "export", "recipe"]
    assert list(sub.choices) == commands
    assert [c.dest for c in sub._choices_actions] == commands and all(c.help for c in sub._choices_actions)


@pytest.mark.parametrize("what", ["a file", "a folder of something else"])
def test_the_dry_run_refuses_a_transfer_set_out_that_training_refuses(tmp_path, capsys, what):
    out = tmp_path / "set"
    if what == "a file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("x")
    said = {}
    for dry in (["--dry-run"], []):
        assert main(["train", "recipes/smollm2-cpu.yaml", f"transfer_set.out={out}", *dry]) == 2
        said[bool(dry)] = capsys.readouterr().err.strip()
    assert said[True] == said[False] and str(out) in said[True] and len(said[True].splitlines()) == 1, said


def test_recipe_keys_lists_documented_keys(capsys):
    assert main(["recipe", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.loss.alpha = 0.0" in out and "Weight of the hard-label cross-entropy" in out


def test_recipe_prints_resolved_overrides(capsys):
    assert main(["recipe", "recipes/gsm8k.yaml", "train.lr=1e-4"]) == 0
    assert "lr: 0.0001" in capsys.readouterr().out


def test_a_user_mistake_through_the_installed_entry_point_is_one_line_and_exit_2():
    # The in-process cases are tests/test_hardening.py's; this one goes through `python -m llmkd`.
    proc = run_cli("recipe", "recipes/gsm8k.yaml", "train.lrr=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key 'train.lrr'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_libraries_advisories_stay_quiet_unless_verbose():
    # In a fresh process: quiet_libraries sets process-wide state. bitsandbytes' CPU backend logs, at
    # import on AVX512-BF16 CPUs, that it found no hub kernel: a warning in every run there.
    code = ("import logging; from llmkd.cli import quiet_libraries; quiet_libraries({}); "
            "print(logging.getLogger('bitsandbytes.backends.cpu.ops').isEnabledFor(logging.WARNING))")
    quiet, verbose = (subprocess.run([sys.executable, "-c", code.format(v)], capture_output=True, text=True,
                                     timeout=120).stdout.strip() for v in (False, True))
    assert (quiet, verbose) == ("False", "True")
