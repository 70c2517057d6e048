"""Slow clients cost the others nothing: a connection whose request header is not complete in time is closed
(uvicorn's keep-alive timeout only starts after a response, and it has no header read timeout)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import HttpLimits


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol; between requests (from the connection's start, and from each response's end)
    the next request header must be complete within `header_timeout` seconds, or the connection is closed."""

    header_timeout = HttpLimits.header_timeout_s
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        self._arm()  # before super(): a pipelined request it handles disarms the timer again
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()
