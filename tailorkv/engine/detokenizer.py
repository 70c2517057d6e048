"""Incremental detokenization: the text of each new token in O(1) of the answer's length.

The prefix/read offsets of vLLM and SGLang: the text of a new token is decode(ids[prefix:]) minus
decode(ids[prefix:read]), so that a tokenizer's context-dependent decoding (a sentencepiece word's leading
space, bytes of one UTF-8 character spread over tokens) is seen on a short window. Text that ends in U+FFFD (an
incomplete UTF-8 character) is held back until the character completes or the answer ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
STOP_REGEX_WINDOW = 1024  # characters before the new text a stop_regex match may start in
STOP_REGEX_TIMEOUT_S = 0.05


@dataclass
class IncrementalDetokenizer:
    prefix_offset: int = 0  # ids before this one are in the emitted text and never decoded again
    read_offset: int = 0  # ids before this one are in the emitted text

    def step(self, tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text the ids appended since the last call add; "" while it ends in an incomplete character."""
        prefix, text = self._window(tok, ids, skip_special_tokens)
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return text[len(prefix) :]

    def flush(self, tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text still held back, incomplete characters included (as U+FFFD): call it when the answer ends."""
        prefix, text = self._window(tok, ids, skip_special_tokens)
        self.prefix_offset = self.read_offset = len(ids)
        return text[len(prefix) :]

    def _window(self, tok: Tokenizer, ids: list[int], skip: bool) -> tuple[str, str]:
        # a window inside the answer keeps its leading whitespace (sentencepiece would strip it)
        decode = tok.decode if self.prefix_offset == 0 else tok.decode_continuation
        window = ids[self.prefix_offset :]
        return decode(window[: self.read_offset - self.prefix_offset], skip), decode(window, skip)


def find_stop(text: str, new: int, stops: list[str]) -> tuple[int, int, str] | None:
    """(start, end, stop string) of the first of `stops` that occurs in `text` and ends in its last `new`
    characters (a match wholly before them was found earlier), or None; only that tail is searched."""
    for s in stops:
        at = text.find(s, max(0, len(text) - new - len(s) + 1))
        if at >= 0:
            return at, at + len(s), s
    return None


def find_stop_regex(text: str, new: int, patterns: list[str]) -> tuple[int, int, str] | None:
    """(start, end, pattern) of the first match of one of `patterns` that ends in the last `new` characters of
    `text`, searched in the last STOP_REGEX_WINDOW characters before them (a longer match is not seen); raises
    TimeoutError for a pattern slower than STOP_REGEX_TIMEOUT_S there (catastrophic backtracking)."""
    begin = max(0, len(text) - new - STOP_REGEX_WINDOW)
    for p in patterns:
        for m in regex.finditer(p, text, pos=begin, timeout=STOP_REGEX_TIMEOUT_S):
            if m.end() > len(text) - new:
                return m.start(), m.end(), p
    return None
