import io

from llmkd.progress import LogLine, bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_one_line_per_stage():
    log = io.StringIO()  # not a terminal
    with bar(total=40, initial=10, desc="train", unit="step", file=log) as b:
        assert isinstance(b, LogLine)
        for _ in range(30):
            b.update(1)
            b.set_postfix(loss="0.1234", tok_s="99")
    b.close()  # closing twice writes nothing more
    (line,) = log.getvalue().splitlines()
    assert line.startswith("train: 40/40 step in ") and " step/s, loss=0.1234, tok_s=99" in line


def test_a_terminal_gets_a_tqdm_bar_and_disable_writes_nothing():
    from tqdm import tqdm

    term = Terminal()
    b = bar(total=3, desc="gen", unit="q", file=term)
    assert isinstance(b, tqdm)
    b.update(3)
    b.close()
    assert "gen" in term.getvalue() and "\r" in term.getvalue()
    quiet = io.StringIO()
    with bar(total=3, desc="gen", disable=True, file=quiet) as b:
        b.update(3)
    assert quiet.getvalue() == ""
