"""Incremental detokenization: the text of each new token in O(1) of the answer's length.

The prefix/read offsets of vLLM and SGLang: the text of a new token is decode(ids[prefix:]) minus
decode(ids[prefix:read]), so that a tokenizer's context-dependent decoding (a sentencepiece word's leading
space, bytes of one UTF-8 character spread over tokens) is seen on a short window. Text that ends in U+FFFD (an
incomplete UTF-8 character) is held back until the character completes or the answer ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    prefix_offset: int = 0  # ids before this one are in the emitted text and never decoded again
    read_offset: int = 0  # ids before this one are in the emitted text

    def step(self, tok: Tokenizer, ids: list[int]) -> str:
        """The text the ids appended since the last call add; "" while it ends in an incomplete character."""
        prefix, text = self._window(tok, ids)
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return text[len(prefix) :]

    def flush(self, tok: Tokenizer, ids: list[int]) -> str:
        """The text still held back, incomplete characters included (as U+FFFD): call it when the answer ends."""
        prefix, text = self._window(tok, ids)
        self.prefix_offset = self.read_offset = len(ids)
        return text[len(prefix) :]

    def _window(self, tok: Tokenizer, ids: list[int]) -> tuple[str, str]:
        # a window inside the answer keeps its leading whitespace (sentencepiece would strip it)
        decode = tok.decode if self.prefix_offset == 0 else tok.decode_continuation
        return decode(ids[self.prefix_offset : self.read_offset]), decode(ids[self.prefix_offset :])


def find_stop(text: str, new: int, stops: list[str]) -> tuple[int, str] | None:
    """(position, stop string) of the first of `stops` that occurs in `text` and ends in its last `new`
    characters (a match wholly before them was found earlier), or None; only that tail is searched."""
    for s in stops:
        at = text.find(s, max(0, len(text) - new - len(s) + 1))
        if at >= 0:
            return at, s
    return None
