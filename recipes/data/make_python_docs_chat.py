"""Write python-docs-chat.jsonl: chat rows whose answers are Python's own documentation; and
python-docs-choice.jsonl: an lm-eval task's documents (recipes/tasks/python-docs-choice.yaml) on other
modules than the chats': which of four functions a docstring describes.

    python recipes/data/make_python_docs_chat.py   # rewrites both files beside this one

The shipped file was written with CPython 3.11.7. Every assistant turn is text from the Python
documentation that ships with the interpreter (the docstrings of standard-library functions, and the
topics of `help()` in `pydoc_data.topics`), (c) the Python Software Foundation, under the PSF License
Agreement (LICENSE-python-docs.txt beside this file); the questions around them are templates. Rows are
`messages` ({role, content}): single questions, two-question conversations about one module (two
responses each), and some with a system turn. Nothing here is math: the example is a task unlike GSM8K.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

MODULES = ("json", "os.path", "re", "string", "textwrap", "itertools", "functools", "collections", "shutil",
           "pathlib", "datetime", "random", "statistics", "difflib", "heapq", "bisect", "csv", "base64", "hashlib",
           "fnmatch", "glob", "tempfile", "uuid", "urllib.parse", "html", "shlex", "zlib", "gzip", "copy", "operator")
TOPICS = ("assert", "assignment", "async", "break", "class", "continue", "del", "dict", "exceptions", "for",
          "function", "global", "if", "import", "in", "lambda", "nonlocal", "pass", "raise", "return", "try",
          "while", "with", "yield", "slicings", "typesseq", "typesmapping", "formatstrings", "truth", "booleans")
SYSTEM = "You answer questions about Python and its standard library, briefly and exactly."
MAX_CHARS = 420  # answers cut at the last sentence end before this


def first_paragraph(text: str) -> str | None:
    para = " ".join(text.strip().split("\n\n")[0].split())
    if len(para) < 40:
        return None
    if len(para) > MAX_CHARS:
        cut = para[:MAX_CHARS].rfind(". ")
        if cut < 80:
            return None
        para = para[: cut + 1]
    return para


def functions(module_name: str) -> list[tuple[str, str]]:
    module = importlib.import_module(module_name)
    out = []
    for name in sorted(dir(module)):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        home = (getattr(obj, "__module__", None) or module_name).split(".")[0]  # defined here, not imported
        if home not in (module_name.split(".")[0], "posixpath", "_" + module_name):
            continue
        doc = inspect.getdoc(obj)
        answer = first_paragraph(doc) if doc else None
        if answer and not re.search(r"\d+\s*[-+*/]\s*\d+", answer):
            out.append((f"{module_name}.{name}", answer))
    return out


def rows() -> list[dict]:
    out = []
    for m, module_name in enumerate(MODULES):
        items = functions(module_name)
        for i in range(0, len(items) - 1, 2):
            (a, da), (b, db) = items[i], items[i + 1]
            turns = [{"role": "system", "content": SYSTEM}] if (m + i) % 2 else []
            turns += [{"role": "user", "content": f"What does `{a}` do in Python?"}, {"role": "assistant", "content": da}]
            if i % 4 == 0:
                turns += [{"role": "user", "content": f"And `{b}`?"}, {"role": "assistant", "content": db}]
            out.append({"messages": turns})
        if len(items) > 2:
            c, dc = items[2]
            out.append({"messages": [{"role": "user", "content": f"Explain `{c}` in one or two sentences."},
                                     {"role": "assistant", "content": dc}]})
    from pydoc_data.topics import topics

    for t, topic in enumerate(TOPICS):
        answer = first_paragraph(re.sub(r"\*+", "", topics[topic].split("\n", 3)[-1]))
        if answer:
            turns = [{"role": "system", "content": SYSTEM}] if t % 2 else []
            out.append({"messages": [*turns, {"role": "user", "content": f"In Python's documentation, what is said about `{topic}`?"},
                                     {"role": "assistant", "content": answer}]})
    return out


# The multiple-choice task's modules: none of the chats' (MODULES), so no stage trains on its docstrings.
CHOICE_MODULES = ("calendar", "codecs", "contextlib", "dataclasses", "enum", "inspect", "io", "logging", "pprint",
                  "queue", "secrets", "struct", "threading", "timeit", "traceback", "types", "typing", "warnings",
                  "weakref", "zipfile")


def choice_rows() -> list[dict]:
    """Per module, each function with a docstring against three others of the module, the answer's place
    turning so that no position is favoured."""
    out = []
    for module_name in CHOICE_MODULES:
        items = functions(module_name)
        for i, (name, doc) in enumerate(items[: len(items) - len(items) % 4]):
            group = [items[(i + j) % len(items)][0] for j in range(4)]  # the answer first, then its next three
            target = len(out) % 4
            group[0], group[target] = group[target], group[0]
            out.append({"docstring": doc, "choices": [f"`{g}`" for g in group], "label": target})
    return out


def write(name: str, rows_: list[dict]) -> None:
    path = Path(__file__).with_name(name)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_), encoding="utf-8")
    print(f"{path}: {len(rows_)} rows")


if __name__ == "__main__":
    write("python-docs-chat.jsonl", rows())
    write("python-docs-choice.jsonl", choice_rows())
