"""Structured output: grammars (JSON schema, regex, EBNF) compiled with xgrammar for the engine's vocabulary,
and the per-request matcher that masks a row's logits to the tokens its grammar allows next.

Compiles run on this module's own threads (xgrammar releases the GIL), are shared by concurrent callers of the
same (kind, text), cached, and bounded by a timeout; xgrammar is imported on the first grammar.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from ..errors import InvalidRequestError
from .tokenizer import Tokenizer

# a schema of ~15k characters with 200 patterned fields takes ~2 s on one CPU core
COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 256  # compiled grammars kept (each holds its token-mask cache: tens of kB to MBs)
COMPILE_THREADS = 2
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[14:41:13] /project/cpp/x.cc:94: "


def tokenizer_info(tok: Tokenizer, vocab_size: int):
    """xgrammar's view of the vocabulary: token strings as the tokenizer stores them, special tokens blank (so no
    grammar emits `<|im_start|>` as text), EOS as the stop tokens, masks `vocab_size` (the model's) wide."""
    import xgrammar as xgr

    vocab = tok.vocabulary()[:vocab_size]
    stop = tok.eos_token_ids or None
    if tok.hf_tokenizer is not None:
        # xgrammar reads the vocabulary's type from the tokenizer's own description
        from transformers import PreTrainedTokenizerFast

        described = xgr.TokenizerInfo.from_huggingface(
            PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer),
            vocab_size=vocab_size,
            stop_token_ids=stop,
        )
        kind, prefix_space = described.vocab_type, described.add_prefix_space
    else:  # sentencepiece, as xgrammar reads one
        kind = xgr.VocabType.BYTE_FALLBACK if "<0x0A>" in vocab else xgr.VocabType.RAW
        prefix_space = True
    return xgr.TokenizerInfo(
        vocab, kind, vocab_size=vocab_size, stop_token_ids=stop, add_prefix_space=prefix_space
    )


class Grammars:
    """Compiles grammars (kind: "json_schema", "regex" or "ebnf") for one tokenizer."""

    def __init__(self, tok: Tokenizer, vocab_size: int, timeout_s: float = COMPILE_TIMEOUT_S):
        self.tokenizer, self.vocab_size, self.timeout_s = tok, vocab_size, timeout_s
        self._compiler = None  # built on the first compile (the vocabulary takes ~0.2 s)
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="tailorkv-grammar")

    def submit(self, kind: str, text: str) -> Future:
        """The compile of (kind, text): cached, or started now on the grammar threads. Its result is a
        CompiledGrammar; its exception an InvalidRequestError."""
        key = (kind, text)
        with self._lock:
            future = self._cache.get(key)
            if future is None or future.cancelled():
                future = self._cache[key] = self._pool.submit(self._compile, kind, text)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        return future

    def timed_out(self, kind: str, text: str) -> InvalidRequestError:
        """The error of a compile that outlasted `timeout_s`; a compile still queued is dropped."""
        with self._lock:
            future = self._cache.get((kind, text))
            if future is not None and future.cancel():
                del self._cache[(kind, text)]
        return InvalidRequestError(
            f"the {kind} took longer than {self.timeout_s:g} s to compile; simplify it"
        )

    def compile(self, kind: str, text: str):
        """The CompiledGrammar of (kind, text), waiting at most `timeout_s`; raises InvalidRequestError."""
        try:
            return self.submit(kind, text).result(self.timeout_s)
        except FutureTimeout:
            raise self.timed_out(kind, text) from None

    def matcher(self, kind: str, text: str) -> GrammarMatch:
        return GrammarMatch(self.compile(kind, text), self.vocab_size)

    def _compile(self, kind: str, text: str):
        import xgrammar as xgr

        with self._compiler_lock:
            if self._compiler is None:
                info = tokenizer_info(self.tokenizer, self.vocab_size)
                # our cache bounds what is kept; xgrammar's own would grow with every schema
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        try:
            if kind == "json_schema":
                # one fixed layout (", " and ": ", no newlines): free whitespace lets a sampled model pad forever
                return self._compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            return self._compiler.compile_grammar(text)  # EBNF (GBNF) with a `root` rule
        except RuntimeError as e:
            message = _XGRAMMAR_PREFIX.sub("", str(e).strip())
            raise InvalidRequestError(f"invalid {kind}: {message}") from None


class GrammarMatch:
    """One request's place in its grammar. Called as a LogitsProcessor, it masks the tokens the grammar does not
    allow next (EOS only where the grammar may end); `accept` follows each token the request takes."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self._matcher.fill_next_token_bitmask(self._bitmask):
            mask = self._bitmask.to(logits.device, non_blocking=True)
            self._xgr.apply_token_bitmask_inplace(logits[None], mask)
        return logits

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and no change) when the grammar does not allow it."""
        return self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar has ended (it accepted a stop token)."""
        return self._matcher.is_terminated()
