"""AsyncEngine: runs `Engine.step()` on a background thread and streams each request's tokens to asyncio.

The asyncio side submits requests and awaits `Output`s; the engine thread hands them over with
`loop.call_soon_threadsafe`, so neither side blocks the other. The thread sleeps on an Event while there is no
work. A step that raises fails the requests that were running (each gets an `Output` with `error`) and the
engine keeps serving; requests still waiting are untouched.

Requests that reach the server together (a document chat's users starting their next turn) land one by one: the
first would be prefilled alone while the others wait a whole step for it. So while nothing runs, a step that would
only prefill is held back, `gather_s` at most:
- for the requests that were already `arriving` (their bodies being received or tokenized, not yet submitted) when
  the engine found it could step; requests that begin arriving later do not prolong this, so a steady stream of
  them never holds a step for long;
- and until `delay_factor` x the last prefill step's time has passed since the latest request began arriving or
  was submitted, or since the latest finish plus the clients' turnaround (how long the first request after a
  finish took to come, averaged): the requests of one burst arrive a few ms apart, and a chat's users send their
  next turns as their answers end, after their clients' turnaround. Once as many requests have come since the
  latest finish as finished then, and none is arriving, those next turns are all in: the hold ends.
While requests decode, a waiting request joins their steps only once it has waited `delay_factor` x the last
prefill step's time, as vLLM's `--scheduler-delay-factor` does: the first of a burst that comes as the running
requests finish (a chat's user one token ahead of the others) then waits for the rest instead of being prefilled
alone while they decode their last tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from ..config import DELAY_FACTOR  # noqa: F401 (tests read the default here)
from ..errors import QueueFullError
from .engine import Engine
from .request import Request
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
        self.engine, self.gather_s = engine, gather_s
        self.delay_factor = (
            engine.options.scheduler_delay_factor if delay_factor is None else delay_factor
        )
        self._arriving: dict[
            object, float
        ] = {}  # requests being received or tokenized: when each began (_mu)
        self._last_arrival = 0.0  # when the latest request began arriving or was submitted (_mu)
        self._last_finish = 0.0  # when the engine thread last handed out a finished request
        self._finished = 0  # how many requests finished then
        self._turnaround: float | None = (
            None  # how long clients take to send a request after others finish (_mu)
        )
        self._held_since: float | None = (
            None  # when the engine thread began holding a step for them
        )
        self.stats = EngineStats()
        self._streams: dict[int, _Stream] = {}
        self._aborts: list[tuple[int, str]] = []  # applied by the engine thread between steps
        # Guards _streams and makes "add to the engine + register the stream" atomic w.r.t. dispatching outputs.
        # Lock order: self._mu, then the engine's own lock.
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tailorkv-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def load(self) -> dict:
        """Queue and memory state for /get_server_info and /metrics."""
        s = self.engine.scheduler
        return {
            "num_running_reqs": len(s.running),
            "num_queued_reqs": len(s.waiting),
            "memory": self.engine.memory.usage(),
        }

    def server_info(self) -> dict:
        """The engine's settings and its load (/get_server_info)."""
        o = self.engine.options
        return {
            "kv_policy": o.kv_policy,
            "max_running_requests": o.max_running_requests,
            "max_queued_requests": o.max_queued_requests,
            **self.load(),
        }

    # ---- the model, as the API sees it ----------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.engine.config.name

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens of one request, at most."""
        return self.engine.config.max_position

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    def tokenize(self, prompt: str | None, input_ids: list[int] | None) -> list[int]:
        """A prompt's token ids (or `input_ids`, checked); raises InvalidRequestError. Safe from any thread."""
        return self.engine.tokenize(prompt, input_ids)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.engine.tokenizer.apply_chat_template(messages)

    # ---- the asyncio side -----------------------------------------------------------------------------------
    def generate(self, batch: list[tuple[list[int], SamplingParams]]) -> OutputStream:
        """Queue every (input_ids, params) of `batch` now, all or none (raises InvalidRequestError or
        CapacityError and queues nothing); iterate the returned stream for their Outputs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        return OutputStream(self, queue, {r.rid for r in self._submit(batch, loop, queue)})

    def _submit(self, batch, loop, queue) -> list[Request]:
        reqs: list[Request] = []
        with self._mu:
            self._arrived(time.perf_counter())
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            try:
                for index, (input_ids, params) in enumerate(batch):
                    reqs.append(self.engine.add_request(input_ids, params))
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
        """Around a request's arrival at the server, up to its submission (see the module's docstring); yields
        `done`, which ends the arrival before the context does (once the request is submitted)."""
        key = object()
        with self._mu:
            self._arriving[key] = self._arrived(time.perf_counter())

        def done() -> None:
            with self._mu:
                ended = self._arriving.pop(key, None) is not None
            if ended:
                self._wake.set()

        try:
            yield done
        finally:
            done()

    def _arrived(self, now: float) -> float:
        """A request begins arriving (or is submitted) at `now` (_mu held). The first since the latest finish times
        the clients' turnaround: the mean of this time and the last estimate, at most gather_s."""
        if self._finished and self._last_arrival < self._last_finish:
            took = now - self._last_finish
            self._turnaround = min(
                took if self._turnaround is None else (self._turnaround + took) / 2, self.gather_s
            )
        self._last_arrival = now
        return now

    def abort(self, rid: int, message: str = "client disconnected") -> None:
        """Stop a request: it produces no further Output, and its pages are freed before the next step."""
        with self._mu:
            if self._streams.pop(rid, None) is not None:
                self.stats.aborted_requests += 1
            self._aborts.append((rid, message))
        self._wake.set()

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
            if not self.engine.scheduler.has_work:
                self._wake.wait()
                continue
            hold = self._hold()
            if hold > 0:
                self._wake.wait(hold)
                continue
            self._held_since = None
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
        """Seconds to hold back the next step for requests that were arriving when it could first run: none while
        any request runs."""
        if self.engine.scheduler.running:
            return 0.0
        now = time.perf_counter()
        if self._held_since is None:
            self._held_since = now
        with self._mu:
            burst = any(began <= self._held_since for began in self._arriving.values())
            latest = max(self._last_arrival, self._last_finish + (self._turnaround or 0.0))
            lull = latest + self.delay_factor * self.engine.step_log.prefill_seconds - now
            if (
                self._finished
                and not self._arriving
                and sum(s.queued_at > self._last_finish for s in self.engine.scheduler.waiting)
                >= self._finished
            ):
                return 0.0  # the next turns of the requests that finished are in
        left = self._held_since + self.gather_s - now
        return min(left, max(lull, left if burst else 0.0))

    def _admit(self) -> bool:
        """Whether waiting requests may join the running ones' next step: once the oldest has waited delay_factor x
        the last prefill step's time."""
        s = self.engine.scheduler
        if not s.running or not s.waiting:
            return True
        waited = time.perf_counter() - s.waiting[0].queued_at
        return waited >= self.delay_factor * self.engine.step_log.prefill_seconds

    def _apply_aborts(self) -> None:
        # Only this thread aborts in the engine: Engine.abort frees a request's KV pages at once, which must not
        # happen while a step's forward pass reads them.
        with self._mu:
            aborts, self._aborts = self._aborts, []
        for rid, message in aborts:
            self.engine.abort(rid, message)

    def _dispatch(self, done: list[Request]) -> None:
        now = time.perf_counter()
        finished = sum(req.finished for req in done)
        with self._mu:
            if finished:
                self._last_finish, self._finished = now, finished
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
                stream.put(Output(stream.index, req, req.new_text(), ids, now, req.finished))

    def _fail(self, rids: list[int], message: str) -> None:
        now = time.perf_counter()
        with self._mu:
            for rid in rids:
                req = self.engine.requests.get(rid)
                self.engine.abort(rid, message)
                stream = self._streams.pop(rid, None)
                if stream is not None and req is not None:
                    stream.put(Output(stream.index, req, "", [], now, finished=True, error=message))
