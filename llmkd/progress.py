"""Progress of a stage: a tqdm bar on a terminal, one line when it ends in a log file.

tqdm redraws its bar with carriage returns; written to a file, every redraw becomes a line of its
own. `bar` therefore returns a tqdm only when the stream it writes to is a terminal, otherwise a
`LogLine` with the same update / set_postfix / close / context-manager interface that writes a
single summary line at close, e.g. "train: 40/40 step in 312 s, 0.128 step/s, loss=0.1234".
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def bar(*, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, initial: int = 0,
        file: TextIO | None = None, **tqdm_kwargs):
    """A progress bar for a terminal, a `LogLine` for anything else, tqdm's silent bar if `disable`."""
    stream = file if file is not None else sys.stderr  # where tqdm writes by default
    if not disable and not _is_terminal(stream):
        return LogLine(total=total, desc=desc, unit=unit, initial=initial, file=stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=file, **tqdm_kwargs)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogLine:
    """Counts like a tqdm bar and writes one line when closed: count, total, seconds, rate, postfix."""

    disable = False

    def __init__(self, *, total: int | None, desc: str, unit: str, initial: int = 0, file: TextIO):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = self.initial = initial
        self.postfix: dict = {}
        self.start = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self.closed or self.disable:
            return
        self.closed = True
        seconds = time.perf_counter() - self.start
        done = self.n - self.initial  # this run's share: a resumed stage starts at `initial`
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = f", {done / seconds:.3g} {self.unit}/s" if seconds > 0 and done else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {count} {self.unit} in {seconds:.0f} s{rate}{extra}", file=self.file, flush=True)

    def __enter__(self) -> LogLine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
