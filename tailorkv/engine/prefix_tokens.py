"""Tokenize a prompt that extends an earlier one (a chat's next turn, the same document asked again) by reusing
the earlier prompt's ids up to a word gap and tokenizing only the rest.

A 64k-token prompt takes ~0.15-0.3 s to tokenize; in a document chat every turn repeats the whole document and
the turns of 16 users arrive together, so tokenizing again is most of a later turn's time to first token.

Why a cut is exact: at a gap "letter, space, letter" a byte-level BPE tokenizer always ends one pre-token and
starts the next. No alternative of the GPT-2 regex (ByteLevel's) or of Llama 3's Split regex matches a letter
followed by a space, and the one that matches the letter run stops at the space. Pre-tokens are merged
independently, so ids(text) = ids(text[:c]) + ids(text[c:]) for such a gap c, and ids(text[:c]) is a prefix of
the earlier prompt's ids when both texts agree up to c + 1. `word_gaps_split` checks that a tokenizer is of that
kind (no normalizer, no Metaspace, no added token that strips spaces or contains a gap).
"""

from __future__ import annotations

import bisect
import json
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

WORD_GAP = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")
# the pre-tokenizers a gap is known to split: ByteLevel with its GPT-2 regex, Digits, Llama 3's Split
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
MIN_CHARS = 8192  # shorter prompts tokenize in a few ms
GAP_WINDOW = 4096  # where to look for the last gap before the end of the earlier prompt


def _splitter(pre: dict) -> bool:
    return (pre["type"] == "ByteLevel" and pre["use_regex"]) or (
        pre["type"] == "Split"
        and pre["pattern"].get("Regex") == LLAMA3_SPLIT
        and pre["behavior"] == "Isolated"
        and not pre["invert"]
    )


def _splits_gaps(pre: dict | None) -> bool:
    """A gap splitter alone or in a Sequence with steps that split no more than digits or map bytes."""
    if pre is None or pre["type"] != "Sequence":
        return pre is not None and _splitter(pre)
    parts = pre["pretokenizers"]
    return any(_splitter(p) for p in parts) and all(
        _splitter(p) or p["type"] in ("Digits", "ByteLevel") for p in parts
    )


def word_gaps_split(tokenizer) -> bool:
    """Whether every word gap of a text is a place where `tokenizer`'s ids split (see the module docstring).
    `tokenizer`: a `tokenizers.Tokenizer`; its parts are read, not its JSON (which holds the whole vocabulary)."""
    pre = tokenizer.pre_tokenizer
    return (
        tokenizer.normalizer is None
        and _splits_gaps(pre and json.loads(pre.__getstate__()))
        and not any(
            t.lstrip or t.rstrip or WORD_GAP.search(t.content)
            for t in tokenizer.get_added_tokens_decoder().values()
        )
    )


@dataclass
class _Tokenized:
    text: str
    ids: array
    ends: array  # character offset where each token ends


class PrefixTokenCache:
    """`encode(text)` equal to `tokenize(text)[0]`, reusing the longest recently tokenized prompt that `text`
    starts with. `tokenize(text)` returns (ids, end offset of each token). Thread-safe."""

    def __init__(
        self,
        tokenize: Callable[[str], tuple[list[int], list[int]]],
        max_entries: int = 64,
        max_chars: int = 1 << 25,
    ):
        self._tokenize, self._max_entries, self._max_chars = tokenize, max_entries, max_chars
        self._entries: OrderedDict[int, _Tokenized] = OrderedDict()
        self._chars = 0
        self._key = 0
        self._lock = threading.Lock()
        self.hits = 0  # prompts tokenized from an earlier one

    def encode(self, text: str) -> list[int]:
        if len(text) < MIN_CHARS:
            return self._tokenize(text)[0]
        found = self._reuse(text)
        if found is None:
            ids, ends = self._tokenize(text)
            found = _Tokenized(text, array("l", ids), array("l", ends))
        self._remember(found)
        return found.ids.tolist()

    def _reuse(self, text: str) -> _Tokenized | None:
        with self._lock:
            entries = list(self._entries.values())
        earlier = max(
            (e for e in entries if len(e.text) <= len(text) and text.startswith(e.text)),
            key=lambda e: len(e.text),
            default=None,
        )
        if earlier is None:
            return None
        # the last gap whose following letter is inside the earlier prompt (so both texts agree around it)
        start = max(len(earlier.text) - GAP_WINDOW, 0)
        gaps = [m.start() for m in WORD_GAP.finditer(earlier.text, start)]
        cut = gaps[-1] if gaps else 0
        keep = bisect.bisect_right(earlier.ends, cut)
        if not keep or earlier.ends[keep - 1] != cut:
            return None  # no gap near the end, or offsets this cache does not understand: tokenize it all
        ids, ends = self._tokenize(text[cut:])
        self.hits += 1
        return _Tokenized(
            text,
            earlier.ids[:keep] + array("l", ids),
            earlier.ends[:keep] + array("l", (e + cut for e in ends)),
        )

    def _remember(self, entry: _Tokenized) -> None:
        with self._lock:
            self._key += 1
            self._entries[self._key] = entry
            self._chars += len(entry.text)
            while len(self._entries) > self._max_entries or self._chars > self._max_chars:
                self._chars -= len(self._entries.popitem(last=False)[1].text)
