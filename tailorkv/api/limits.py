"""The HTTP server's limits on what clients send and how slowly (`tailorkv serve --max-body-mib ...`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 8 << 20  # a larger body is answered 413
    body_timeout_s: float = 30.0  # a body that makes no progress this long is answered 408
    header_timeout_s: float = (
        10.0  # a connection without a complete request header this long is closed
    )
    # connections and requests in flight beyond this are answered 503 by uvicorn
    limit_concurrency: int | None = 2048

    def __post_init__(self):
        for name in ("max_body_bytes", "body_timeout_s", "header_timeout_s", "limit_concurrency"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be > 0, got {v!r}")
