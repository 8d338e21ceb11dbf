"""Kill a process at a random moment of its work (SIGKILL: no handler, no cleanup runs).

The moment is drawn from the span of an uninterrupted run of the same command: from when its output
folder appears (its work has begun) to its exit, or to when a `done` file appears if one is named
(the interpreter's teardown after the last write can take seconds). Each test run draws a fresh seed,
printed on failure; LLMKD_FAULT_SEED=<seed> replays one.
"""

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

POLL = 0.02


def fault_seed() -> int:
    return int(os.environ.get("LLMKD_FAULT_SEED", time.time_ns() % 2**32))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL)


def timed_run(cmd, *, out: Path, done: Path | None = None, timeout: float = 600, **popen) -> float:
    """Run `cmd` to its end; returns seconds from `out` appearing to `done` appearing (or to the exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    _wait_for(out, proc, timeout)
    start = time.monotonic()
    if done is not None:
        _wait_for(done, proc, timeout)
    end = time.monotonic()
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-2000:]
    return (end if done is not None else time.monotonic()) - start


def timed_call(fn, *, out: Path) -> tuple[object, float]:
    """Call `fn()` in this process; returns (its result, seconds from `out` appearing to its return).

    The span `timed_run` measures of a subprocess, without starting one: for a killed subprocess whose
    uninterrupted reference may run in the test's own process (its imports done, its teardown not timed)."""
    appeared: list[float] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set() and not out.exists():
            time.sleep(0.001)
        appeared.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = fn()
    finally:
        end = time.monotonic()
        stop.set()
        watcher.join()
    assert out.exists(), f"{out} never appeared"
    return result, end - min(appeared[0], end)


def kill_at_random_moment(cmd, *, out: Path, span: float, seed: int, done: Path | None = None,
                          timeout: float = 600, **popen) -> str:
    """Start `cmd` and SIGKILL it at a seeded moment within the first 90% of `span` seconds after `out`
    appears; returns a description for assertion messages. Should this run outpace the timed one and
    finish first (exit, or `done` exists at the kill), `out` is removed and the run repeated with half
    the delay."""
    delay = random.Random(seed).uniform(0.0, 0.9 * span)
    for _ in range(4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
        _wait_for(out, proc, timeout)
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if done is None or not done.exists():
                return f"seed {seed} (LLMKD_FAULT_SEED), killed {delay:.1f} s of {span:.1f} s into the work"
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        shutil.rmtree(out)
        delay /= 2
    raise AssertionError(f"seed {seed}: the process finished before every kill")
