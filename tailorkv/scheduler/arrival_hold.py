"""The arrival hold: when a step that would only prefill waits for more requests, so that a burst prefills together.

Requests that reach the server together (a document chat's users starting their next turn) land one by one: the
first would be prefilled alone while the others wait a whole step for it. So while nothing runs, a step that would
only prefill is held back, `gather_s` at most:
- for the requests that were already arriving (their bodies being received or tokenized, not yet submitted) when
  the hold began; requests that begin arriving later do not prolong it, so a steady stream of them never holds a
  step for long;
- and until `delay_factor` x the last prefill step's time has passed since the latest request began arriving or
  was submitted, or since the latest finish plus the clients' turnaround (how long the first request after a
  finish took to come, averaged): the requests of one burst arrive a few ms apart, and a chat's users send their
  next turns as their answers end, after their clients' turnaround. Once as many requests have come since the
  latest finish as finished then, and none is arriving, those next turns are all in: the hold ends.
While requests decode, a waiting request joins their steps only once it has waited `delay_factor` x the last
prefill step's time, as vLLM's `--scheduler-delay-factor` does: the first of a burst that comes as the running
requests finish (a chat's user one token ahead of the others) then waits for the rest instead of being prefilled
alone while they decode their last tokens. With chunked prefill "the last prefill step" is one step of chunks
(while requests decode, about the step-time budget of step_cost.py), not a whole prompt's prefill: what letting a
waiting request join costs the running ones, so a long prompt's 13 s prefill no longer holds the next arrival 4.5 s.

ArrivalHold only decides, from the times and counts it is told; the caller supplies the clock and the locking.
"""

from __future__ import annotations


class ArrivalHold:
    def __init__(self, gather_s: float, delay_factor: float):
        self.gather_s, self.delay_factor = gather_s, delay_factor
        self._arriving: dict[
            object, float
        ] = {}  # requests being received or tokenized: when each began
        self._last_arrival = 0.0  # when the latest request began arriving or was submitted
        self._last_finish = 0.0  # when requests last finished
        self._finished = 0  # how many finished then
        self._turnaround: float | None = (
            None  # how long clients take to send a request after others finish
        )
        self._held_since: float | None = None  # when the current hold began

    def arrival_began(self, key: object, now: float) -> None:
        """Request `key` is arriving from `now` on (until `arrival_ended`)."""
        self._arriving[key] = now
        self.came(now)

    def arrival_ended(self, key: object) -> bool:
        """Request `key` is no longer arriving; False if it had already ended."""
        return self._arriving.pop(key, None) is not None

    @property
    def arriving(self) -> int:
        """How many requests are arriving now (the hold waits for them)."""
        return len(self._arriving)

    def came(self, now: float) -> None:
        """A request began arriving or was submitted. The first since the latest finish times the clients'
        turnaround: the mean of this time and the last estimate, at most gather_s."""
        if self._finished and self._last_arrival < self._last_finish:
            took = now - self._last_finish
            self._turnaround = min(
                took if self._turnaround is None else (self._turnaround + took) / 2, self.gather_s
            )
        self._last_arrival = now

    def finished(self, now: float, count: int) -> None:
        """`count` requests finished in the step that ended at `now`."""
        if count:
            self._last_finish, self._finished = now, count

    def hold_s(
        self, now: float, running: bool, prefill_s: float, waiting_since: list[float]
    ) -> float:
        """Seconds to hold back the next step (none if <= 0); none while any request runs. `prefill_s`: the last
        prefill step's time; `waiting_since`: when each waiting request was queued."""
        if running:
            return 0.0
        if self._held_since is None:
            self._held_since = now
        if self._finished and not self._arriving:
            came = sum(t > self._last_finish for t in waiting_since)
            if came >= self._finished:
                return 0.0  # the next turns of the requests that finished are in
        burst = any(began <= self._held_since for began in self._arriving.values())
        latest = max(self._last_arrival, self._last_finish + (self._turnaround or 0.0))
        lull = latest + self.delay_factor * prefill_s - now
        left = self._held_since + self.gather_s - now
        return min(left, max(lull, left if burst else 0.0))

    def stepped(self) -> None:
        """A step ran: the next hold begins afresh."""
        self._held_since = None

    def admit(
        self, now: float, running: bool, oldest_queued_at: float | None, prefill_s: float
    ) -> bool:
        """Whether waiting requests may join the running ones' next step: once the oldest (queued at
        `oldest_queued_at`, None if none waits) has waited delay_factor x the last prefill step's time."""
        if not running or oldest_queued_at is None:
            return True
        return now - oldest_queued_at >= self.delay_factor * prefill_s
