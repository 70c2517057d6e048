"""A generation request: prompt ids, sampling params, produced tokens, stop detection and incremental text."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..scheduler.scheduler import Seq
from .detokenizer import IncrementalDetokenizer, find_stop, find_stop_regex
from .grammar import GrammarMatch
from .sampling import LogitsProcessor, Sample, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class RequestOptions:
    """What a request returns besides its tokens and text, and the client's name for it."""

    top_logprobs_num: int | None = (
        None  # None: no logprobs; 0: each token's; n: and the n most likely
    )
    logprob_start: int | None = (
        None  # prompt logprobs from this position on (0: the first is None); None: none
    )
    external_id: str | None = None  # the client's id (SGLang's rid): meta_info.id, /abort_request
    # n > 1: another copy of the previous request's prompt (AsyncEngine.generate sets prefill_after for it)
    copy: bool = False
    # the rid of the copy whose prompt is computed first; this one starts once it is, from the prefix cache
    prefill_after: int | None = None


@dataclass
class Request:
    rid: int
    input_ids: list[int]
    params: SamplingParams
    seq: Seq
    generator: torch.Generator | None = None  # a seeded request's own; None: drawn with the batch
    # teacher forcing: these tokens are appended instead of samples
    forced_ids: list[int] | None = None
    external_id: str | None = None  # the client's id for it (SGLang's rid); meta_info.id
    # applied in order to this request's logits before it is sampled (penalties, logit bias, grammar masks)
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # structured output: follows each token; also in logits_processors (its mask)
    grammar: GrammarMatch | None = None
    # None: no logprobs; 0: each output token's; n: and the n most likely at each step
    top_logprobs_num: int | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)  # of output_ids, when asked
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    logprob_start: int | None = None  # RequestOptions
    # of input_ids[logprob_start:] as prefill computes them (position 0 has none: None)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    text: str = ""
    finish_reason: dict | None = None
    error: str | None = (
        None  # set when the engine failed this request alone (its answer is an error)
    )
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None
    _sent: int = 0  # characters of `text` already handed out by `new_text`
    _detok: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer)

    def use(self, options: RequestOptions) -> None:
        """Take the logprobs and id `options` ask for (before the request is scheduled)."""
        self.top_logprobs_num, self.external_id = options.top_logprobs_num, options.external_id
        self.logprob_start = options.logprob_start
        if options.logprob_start == 0:  # the first prompt token has no logprob
            self.input_logprobs, self.input_top_logprobs = [None], [None]

    def prompt_score(self, start: int, n: int) -> tuple[int, list[int]] | None:
        """For a prefill chunk of positions [start, start + n): (offset in the chunk, prompt tokens) whose
        logprobs it gives, or None. Position p's logits predict token p + 1."""
        if self.logprob_start is None:
            return None
        # after those already scored: a retracted request prefills its prompt again
        first = max(self.logprob_start + len(self.input_logprobs), start + 1, 1)
        end = min(start + n, len(self.input_ids) - 1)  # the last position predicts the first output
        return (first - 1 - start, self.input_ids[first : end + 1]) if first <= end else None

    def add_prompt_logprobs(self, picked: list[float], top: list | None) -> None:
        self.input_logprobs += picked
        self.input_top_logprobs += top if top is not None else [None] * len(picked)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def forced_token(self) -> int | None:
        return None if self.forced_ids is None else self.forced_ids[len(self.output_ids)]

    def append(self, token: int | Sample, tok: Tokenizer) -> None:
        """Record a sampled token (and its logprobs); sets `finish_reason` on EOS / stop id / stop string / the
        grammar's end / length (a token the grammar refuses fails the request). `text` grows by the token's text
        once its characters are complete (O(1) in the answer's length); at the end it is tok.decode(output_ids),
        cut before a matched stop string."""
        now = time.perf_counter()
        self.first_token_time = self.first_token_time or now
        p = self.params
        if p.max_new_tokens == 0:  # prefill only: the prompt's logits were all it asked for
            self._finish({"type": "length", "matched": None}, tok, now)
            return
        s = token if isinstance(token, Sample) else Sample(token)
        token = s.token
        if self.grammar is not None and not self.grammar.accept(token):
            self.fail(f"token {token} does not follow the request's {p.grammar[0]}")
            return
        if (
            token in p.stop_token_ids
            or (not p.ignore_eos and token in tok.eos_token_ids)
            or (self.grammar is not None and self.grammar.terminated)
        ):
            # the stop token is not part of the completion; a grammar ends on one
            self._finish({"type": "stop", "matched": token}, tok, now)
            return
        self.output_ids.append(token)
        self.seq.tokens.append(token)
        if s.logprob is not None:
            self.output_logprobs.append(s.logprob)
        if s.top_logprobs is not None:
            self.output_top_logprobs.append(s.top_logprobs)
        new = self._detok.step(tok, self.output_ids, p.skip_special_tokens)
        self.text += new
        stop = find_stop(self.text, len(new), p.stop) if new and p.stop else None
        if stop is None and new and p.stop_regex:
            try:
                stop = find_stop_regex(self.text, len(new), p.stop_regex)
            except TimeoutError:
                self.fail("stop_regex took too long to match")
                return
        if stop is not None:  # (start, end, the stop string or pattern)
            self.text = self.text[: stop[1] if p.no_stop_trim else stop[0]]
            self._finish({"type": "stop", "matched": stop[2]}, tok, now, flush=False)
        elif len(self.output_ids) >= p.max_new_tokens:
            self._finish({"type": "length", "matched": None}, tok, now)

    def _finish(self, reason: dict, tok: Tokenizer, now: float, flush: bool = True) -> None:
        if flush:
            self.text += self._detok.flush(tok, self.output_ids, self.params.skip_special_tokens)
        self.finish_reason = reason
        self.finished_time = now

    def abort(self, message: str = "aborted") -> None:
        self.finish_reason = {"type": "abort", "matched": None, "message": message}
        self.finished_time = time.perf_counter()

    def fail(self, message: str) -> None:
        """End the request with an error that is its own (its neighbours in the batch go on)."""
        self.error = message
        self.abort(message)

    def new_text(self) -> str:
        """Text produced since the last call; holds back any tail that could still become a stop string, until
        the request finishes (`text` itself holds back incomplete UTF-8 characters)."""
        end = len(self.text)
        if not self.finished:
            for s in self.params.stop:
                for k in range(min(len(s) - 1, end - self._sent), 0, -1):
                    if self.text[end - k : end] == s[:k]:
                        end -= k
                        break
        out = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to admission into the running batch; None while it waits."""
        return None if self.seq.admitted_at is None else self.seq.admitted_at - self.created

    def result(self) -> dict:
        end = self.finished_time or time.perf_counter()
        return {
            "text": self.text,
            "output_ids": list(self.output_ids),
            "meta_info": {
                "id": self.external_id or str(self.rid),
                "prompt_tokens": len(self.input_ids),
                "completion_tokens": len(self.output_ids),
                "cached_tokens": self.seq.cached_tokens,
                "finish_reason": self.finish_reason,
                "e2e_latency": end - self.created,
                "queue_time": self.queue_time,
            }
            | self.logprobs_info(),
        }

    def logprobs_info(
        self, n_out: int | None = None, text: Callable[[int], str] | None = None
    ) -> dict:
        """SGLang's meta_info logprob fields ([logprob, token id, its text or None] triples) of the prompt and the
        first `n_out` output tokens (default: all), when the request asked for logprobs."""
        if self.top_logprobs_num is None:
            return {}
        n_out = len(self.output_ids) if n_out is None else n_out
        n_in = len(self.input_logprobs)

        def triple(lp, t):
            return [lp, t, text(t) if text else None]

        def tops(pairs):
            return None if pairs is None else [triple(lp, t) for t, lp in pairs]

        inputs = self.input_ids[self.logprob_start or 0 :]
        return {
            "input_token_logprobs": [
                triple(lp, t) for lp, t in zip(self.input_logprobs[:n_in], inputs)
            ],
            "output_token_logprobs": [
                triple(lp, t) for lp, t in zip(self.output_logprobs[:n_out], self.output_ids)
            ],
            "input_top_logprobs": [tops(x) for x in self.input_top_logprobs[:n_in]],
            "output_top_logprobs": [tops(x) for x in self.output_top_logprobs[:n_out]],
        }
