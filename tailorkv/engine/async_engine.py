"""AsyncEngine: runs `Engine.step()` on a background thread and streams each request's tokens to asyncio.

The asyncio side submits requests and awaits `Output`s; the engine thread hands them over with
`loop.call_soon_threadsafe`, so neither side blocks the other. The thread sleeps on an Event while there is no
work. A step that raises fails the requests that were running (each gets an `Output` with `error`) and the
engine keeps serving; requests still waiting are untouched.

The server reports which requests are arriving (`arriving`); before each step the engine thread asks the
ArrivalHold (scheduler/arrival_hold.py) whether to hold a prefill for them and whether waiting requests may join.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import DELAY_FACTOR, InputLimits  # noqa: F401 (tests read the default here)
from ..errors import QueueFullError
from ..scheduler.arrival_hold import ArrivalHold
from .engine import Engine
from .request import Request, RequestOptions
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Output:
    """What one request produced in one step, or how it ended."""

    index: int  # position of the request in the batch it was submitted with
    request: (
        Request  # read-only for the consumer: rid, input_ids, created, finish_reason once finished
    )
    text: str  # text since the previous Output (partial UTF-8 and possible stop-string prefixes held back)
    token_ids: list[int]  # tokens since the previous Output
    time: float  # time.perf_counter() when the step produced it
    finished: bool = False
    error: str | None = None  # set when the engine failed the request


@dataclass
class EngineStats:
    """Totals since start; written under the AsyncEngine's lock, read from any thread."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    failed_steps: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    sent: int = 0  # output tokens already handed out

    def put(self, out: Output) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass


class OutputStream:
    """The Outputs of one submitted batch, in the order steps produce them, until each request has finished.
    `aclose` aborts the requests that have not (a client that went away)."""

    def __init__(self, engine: AsyncEngine, queue: asyncio.Queue, rids: set[int]):
        self._engine, self._queue, self._unfinished = engine, queue, rids

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> Output:
        if not self._unfinished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self._unfinished.discard(out.request.rid)
        return out

    async def aclose(self) -> None:
        for rid in self._unfinished:
            self._engine.abort(rid)
        self._unfinished.clear()


class AsyncEngine:
    """Owns an Engine and its step loop; `generate` is the one way in for the API."""

    def __init__(self, engine: Engine, gather_s: float = 0.5, delay_factor: float | None = None):
        self.engine = engine
        if delay_factor is None:
            delay_factor = engine.options.scheduler_delay_factor
        self.arrivals = ArrivalHold(gather_s, delay_factor)  # (_mu)
        self.stats = EngineStats()
        self._streams: dict[int, _Stream] = {}
        self._aborts: list[tuple[int, str]] = []  # applied by the engine thread between steps
        self._failures: list[
            str
        ] = []  # end every request with this error (engine thread, between steps)
        self._ends: list[
            tuple[int, str]
        ] = []  # end these requests as aborted (not failed), likewise
        self._calls: list[tuple[Callable, concurrent.futures.Future]] = []  # run between steps
        # Guards _streams and arrivals, and makes "add to the engine + register the stream" atomic
        # w.r.t. dispatching outputs.
        # Lock order: self._mu, then the engine's own lock.
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.draining = False  # set by drain(): no new work is taken
        self._thread = threading.Thread(target=self._run, name="tailorkv-engine", daemon=True)
        self._thread.start()

    @property
    def gather_s(self) -> float:
        """The longest a prefill is held for arriving requests."""
        return self.arrivals.gather_s

    @gather_s.setter
    def gather_s(self, seconds: float) -> None:
        self.arrivals.gather_s = seconds

    @property
    def delay_factor(self) -> float:
        """Holds and delays last this many times the last prefill step's time (ArrivalHold)."""
        return self.arrivals.delay_factor

    @delay_factor.setter
    def delay_factor(self, factor: float) -> None:
        self.arrivals.delay_factor = factor

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def load(self) -> dict:
        """Queue and memory state for /get_server_info and /metrics."""
        s = self.engine.scheduler
        return {
            "num_running_reqs": len(s.running),
            "num_queued_reqs": len(s.waiting),
            "num_retracted_reqs": s.num_retracted,  # so far: a pool ran dry while they decoded
            "memory": self.engine.memory.usage(),
        }

    def server_info(self, context: int | None = None, output_len: int = 0) -> dict:
        """The engine's settings and its load (/get_server_info); `tailorkv`: the TailorKV settings in force with
        each S layer's top_k at `context` prompt tokens (default: the model's context), None for other policies;
        `max_requests_at_context`: how many requests of `context` tokens, `output_len` of them answer, the KV pools
        hold whole at once."""
        o, settings = self.engine.options, self.engine.kv_settings
        tokens = context or self.context_length
        return {
            "kv_policy": o.kv_policy,
            "tailorkv": settings(tokens) if settings else None,
            "max_running_requests": o.max_running_requests,
            "max_queued_requests": o.max_queued_requests,
            "max_total_num_tokens": self.engine.scheduler.max_total_tokens(),
            "max_requests_at_context": self.engine.scheduler.max_requests(
                tokens - output_len, output_len
            ),
            "chunked_prefill_size": o.chunked_prefill_size,
            "host_kv_gib": o.host_kv_gib,  # per rank
            "step_budget_ms": cost.budget_s * 1e3 if (cost := self.engine.scheduler.cost) else 0.0,
            "step_cost": cost and cost.describe(),  # the fitted step-time model (None: no budget)
            "enable_prefix_caching": self.engine.memory.prefix is not None,
            "enable_torch_compile": o.enable_torch_compile,
            "overlap_schedule": o.overlap_schedule,
            "overlapped_steps": self.engine.step_log.overlapped_steps,
            **self.load(),
        }

    @functools.cached_property
    def tokenizer_path(self) -> str:
        """An HF tokenizer directory that encodes as this engine does (Tokenizer.hf_directory)."""
        return self.engine.tokenizer.hf_directory()

    # ---- the model, as the API sees it ----------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.engine.config.name

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens of one request, at most."""
        return self.engine.config.max_position

    @property
    def input_limits(self) -> InputLimits:
        """What one request may ask for (EngineConfig.input_limits)."""
        return self.engine.options.input_limits

    def max_output(self, prompt_len: int) -> int:
        """Engine.max_output: a request without max_tokens runs at most this long."""
        return self.engine.max_output(prompt_len)

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    def tokenize(self, prompt: str | None, input_ids: list[int] | None) -> list[int]:
        """A prompt's token ids (or `input_ids`, checked); raises InvalidRequestError. Safe from any thread."""
        return self.engine.tokenize(prompt, input_ids)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.engine.tokenizer.apply_chat_template(messages)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (checked against the vocabulary; raises InvalidRequestError)."""
        return self.engine.tokenizer.decode(self.engine.tokenize(None, ids), skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text (its bytes as text; a partial UTF-8 character shows as U+FFFD)."""
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    async def flush_cache(self) -> int:
        """Drop the prefix cache's unreferenced blocks (between steps); returns how many."""
        return await self.between_steps(self.engine.flush_cache)

    # ---- the asyncio side -----------------------------------------------------------------------------------
    def generate(
        self,
        batch: list[tuple[list[int], SamplingParams]],
        options: list[RequestOptions] | None = None,
    ) -> OutputStream:
        """Queue every (input_ids, params) of `batch` now, all or none (raises InvalidRequestError or
        CapacityError and queues nothing), with `options` for each; iterate the returned stream for their
        Outputs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        reqs = self._submit(batch, options or [RequestOptions()] * len(batch), loop, queue)
        return OutputStream(self, queue, {r.rid for r in reqs})

    async def compile_grammars(self, params: list[SamplingParams]) -> None:
        """Compile the grammars of `params` on the grammar threads, never the engine's, so that `generate` finds
        them compiled; raises InvalidRequestError for a bad grammar or one that outlasts the compile timeout."""
        grammars = self.engine.grammars
        for kind, text in {p.grammar for p in params if p.grammar}:
            future = asyncio.wrap_future(grammars.submit(kind, text))
            try:  # shielded: another request may be waiting for the same compile
                await asyncio.wait_for(asyncio.shield(future), grammars.timeout_s)
            except asyncio.TimeoutError:
                raise grammars.timed_out(kind, text) from None

    def _submit(self, batch, options, loop, queue) -> list[Request]:
        reqs: list[Request] = []
        with self._mu:
            self.arrivals.came(time.perf_counter())
            if self._stopping or self.draining:
                raise QueueFullError("the server is shutting down")
            try:
                first = None  # the first of the n copies of one prompt
                for index, (input_ids, params) in enumerate(batch):
                    o = options[index]
                    if o.copy:  # prefilled after the first: its prompt then comes from the cache
                        o = dataclasses.replace(o, prefill_after=first)
                    reqs.append(self.engine.add_request(input_ids, params, o))
                    if not o.copy:
                        first = reqs[-1].rid
                    self._streams[reqs[-1].rid] = _Stream(loop, queue, index)
            except BaseException:
                for r in reqs:
                    self._streams.pop(r.rid, None)
                    self._aborts.append((r.rid, "another request of its batch was refused"))
                raise
            self.stats.prompt_tokens += sum(len(r.input_ids) for r in reqs)
        self._wake.set()
        return reqs

    @contextlib.contextmanager
    def arriving(self):
        """Around a request's arrival at the server, up to its submission (ArrivalHold); yields `done`, which ends
        the arrival before the context does (once the request is submitted)."""
        key = object()
        with self._mu:
            self.arrivals.arrival_began(key, time.perf_counter())

        def done() -> None:
            with self._mu:
                ended = self.arrivals.arrival_ended(key)
            if ended:
                self._wake.set()

        try:
            yield done
        finally:
            done()

    def abort(self, rid: int, message: str = "client disconnected") -> None:
        """Stop a request: it produces no further Output, and its pages are freed before the next step."""
        with self._mu:
            if self._streams.pop(rid, None) is not None:
                self.stats.aborted_requests += 1
            self._aborts.append((rid, message))
        self._wake.set()

    def end(self, match: Callable[[Request], bool], message: str = "aborted by the client") -> int:
        """Abort the requests `match` selects (/abort_request): each ends with finish_reason abort and no error,
        its pages freed before the next step; returns how many."""
        with self._mu:
            rids = [r.rid for r in list(self.engine.requests.values()) if match(r)]
            self._ends += [(rid, message) for rid in rids]
        self._wake.set()
        return len(rids)

    async def between_steps(self, fn: Callable):
        """fn() run on the engine thread between two steps (what must not overlap a step); its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._mu:
            self._calls.append((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def drain(self, timeout: float) -> None:
        """Take no new work, let what runs finish for up to `timeout` seconds, then end the rest with an error
        Output (streams get an error event and their end; their pages are freed)."""
        with self._mu:
            self.draining = True
        deadline = time.monotonic() + timeout
        while self.engine.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._mu:
            self._failures.append("the server is shutting down")
        self._wake.set()
        while self.engine.requests and time.monotonic() < deadline + 5:
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Stop the loop thread; requests still in flight end with an error Output."""
        with self._mu:
            self._stopping = True
        self._wake.set()
        self._thread.join()
        self._fail(list(self.engine.requests), "the server is shutting down")

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # cleared before looking for work, so a request added meanwhile wakes us
            self._apply_aborts()
            if not self.engine.has_work:
                self._wake.wait()
                continue
            # only a step in flight (of rows that ended) is landed at once, held for nothing
            if self.engine.scheduler.has_work:
                hold = self._hold()
                if hold > 0:
                    self._wake.wait(hold)
                    continue
                with self._mu:
                    self.arrivals.stepped()
            try:
                done = self.engine.step(admit=self._admit())
            except Exception as e:  # a bad step must not take the server down
                log.exception("engine step failed; aborting the running requests")
                with self._mu:
                    self.stats.failed_steps += 1
                self._fail(
                    list(self.engine.scheduler.running), f"engine error: {type(e).__name__}: {e}"
                )
                continue
            self._dispatch(done)

    def _hold(self) -> float:
        """Seconds to hold back the next step for requests arriving (ArrivalHold.hold_s)."""
        s, prefill_s = self.engine.scheduler, self.engine.step_log.prefill_seconds
        with self._mu:
            waiting_since = [w.queued_at for w in s.waiting]
            return self.arrivals.hold_s(
                time.perf_counter(), bool(s.running), prefill_s, waiting_since
            )

    def _admit(self) -> bool:
        """Whether waiting requests may join the running ones' next step (ArrivalHold.admit)."""
        s = self.engine.scheduler
        oldest = s.waiting[0].queued_at if s.waiting else None
        return self.arrivals.admit(
            time.perf_counter(), bool(s.running), oldest, self.engine.step_log.prefill_seconds
        )

    def _apply_aborts(self) -> None:
        # Only this thread aborts in the engine: Engine.abort frees a request's KV pages at once, which must not
        # happen while a step's forward pass reads them.
        with self._mu:
            aborts, self._aborts = self._aborts, []
            failures, self._failures = self._failures, []
            ends, self._ends = self._ends, []
            calls, self._calls = self._calls, []
        for rid, message in aborts:
            self.engine.abort(rid, message)
        for message in failures:
            self._fail(list(self.engine.requests), message)
        for rid, message in ends:
            self._fail([rid], message, error=False)
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

    def _dispatch(self, done: list[Request]) -> None:
        now = time.perf_counter()
        finished = sum(req.finished for req in done)
        with self._mu:
            self.arrivals.finished(now, finished)
            self.stats.generation_tokens += len(done)
            for req in done:
                stream = self._streams.get(req.rid)
                if stream is None:  # aborted since the step began
                    continue
                ids = req.output_ids[stream.sent :]
                stream.sent = len(req.output_ids)
                if req.finished:
                    del self._streams[req.rid]
                    self.stats.finished_requests += 1
                stream.put(
                    Output(stream.index, req, req.new_text(), ids, now, req.finished, req.error)
                )

    def _fail(self, rids: list[int], message: str, error: bool = True) -> None:
        """End these requests (engine thread): each stream gets a last Output, with `message` as its error or
        (error=False) only as its finish_reason's."""
        now = time.perf_counter()
        with self._mu:
            for rid in rids:
                req = self.engine.requests.get(rid)
                self.engine.abort(rid, message)
                stream = self._streams.pop(rid, None)
                if stream is not None and req is not None:
                    text = "" if error else req.new_text()
                    stream.put(
                        Output(stream.index, req, text, [], now, True, message if error else None)
                    )
