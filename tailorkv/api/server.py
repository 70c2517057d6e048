"""The FastAPI app (`create_app`) and `tailorkv serve` (`serve`).

Errors of every route share one body, {"error": {"message", "type", "code"}}: 400 for a bad request, 401 for a
missing or wrong API key, 404 for an unknown model or route, 413 for a body over the limit, 503 when the
queue is full, 500 when the engine failed a request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..config import EngineConfig
from ..engine.async_engine import AsyncEngine
from ..errors import QueueFullError, TailorKVError
from . import info_api, openai_api, sglang_api
from .limits import HttpLimits
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError, error_body
from .slow_clients import HeaderTimeoutProtocol
from .state import AppState, get_state

STALL_S = 0.25  # a body without progress this long stops counting as arriving (ArrivalHold)
log = logging.getLogger(__name__)


def create_app(
    async_engine: AsyncEngine,
    api_key: str | None = None,
    served_model_name: str | None = None,
    model_path: str | None = None,
    max_body_bytes: int = HttpLimits.max_body_bytes,
    body_timeout: float = HttpLimits.body_timeout_s,
) -> FastAPI:
    """An app serving `async_engine`; several apps may share one AsyncEngine (each has its own metrics)."""
    name = async_engine.model_name
    app = FastAPI(title="tailorkv", version=__version__, strict_content_type=False)
    app.state.tailorkv = AppState(
        async_engine, Metrics(async_engine), served_model_name or name, model_path or name
    )
    app.include_router(sglang_api.router)
    app.include_router(openai_api.router)
    app.include_router(info_api.router)
    app.add_api_route("/metrics", metrics, methods=["GET"])
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    app.add_middleware(Arrivals, engine=async_engine)
    if api_key:  # added last: the outermost layer, so nothing is read for a request without the key
        app.add_middleware(BearerAuth, api_key=api_key)
    return app


async def metrics(request: Request):
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


class BearerAuth:
    """401 unless `Authorization: Bearer <api_key>`; /health and /metrics stay open (probes, Prometheus)."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            # the scheme is case-insensitive (RFC 9110), the token is not
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token, self.expected):
                response = _error(
                    401, "invalid or missing API key", "authentication_error", "invalid_api_key"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Arrivals:
    """A generation request is arriving for the engine from its headers on (a long prompt's body takes a while to
    come and to parse) until `batch.submit` ends it: requests that reach the server together prefill together
    (AsyncEngine.arriving). Its `done` is the request's `state.arrived`."""

    ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")

    def __init__(self, app: ASGIApp, engine: AsyncEngine):
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.ROUTES:
            return await self.app(scope, receive, send)
        with self.engine.arriving() as done:
            body_in = False

            async def watched_receive():
                # a body that makes no progress for a while no longer holds the others' prefill back
                nonlocal body_in
                if body_in:
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), STALL_S)
                except asyncio.TimeoutError:
                    done()
                    message = await receive()
                body_in = not message.get("more_body", False)
                return message

            await self.app(
                {**scope, "state": {**scope.get("state", {}), "arrived": done}},
                watched_receive,
                send,
            )


class BodyLimit:
    """413 for a body over `max_bytes`, refused from its Content-Length before any of it is read, or (chunked)
    as soon as what arrived goes over: the body is never held beyond the limit. 408 when the body makes no
    progress for `timeout` seconds (a stalled client)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = HttpLimits.body_timeout_s):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, self._message(), code="request_too_large")(
                scope, receive, send
            )
        seen, complete = 0, False

        async def limited_receive():
            nonlocal seen, complete
            if complete:  # after the body: waits for a disconnect as long as a response streams
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise HTTPException(
                    408, f"the request body made no progress for {self.timeout:g} s"
                )
            complete = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI lets it through; rendered by our handler
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"


HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
}


def _error(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    code: str | int | None = None,
    headers: dict | None = None,
):
    return JSONResponse(error_body(message, type, code), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.code)

    async def capacity(_, e: QueueFullError):
        # busy, not broken: a client may try again shortly
        return _error(503, str(e), "service_unavailable", "server_busy", {"Retry-After": "1"})

    async def invalid(_, e: TailorKVError):
        return _error(400, str(e))

    async def validation(_, e: RequestValidationError):
        def describe(err: dict) -> str:
            if err["type"] == "json_invalid":
                return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
            where = ".".join(str(x) for x in err["loc"][1:]) or "body"
            if err["type"] == "extra_forbidden":
                return f"{where}: this server does not support this field"
            return f"{where}: {err['msg']}"

        return _error(400, "; ".join(describe(err) for err in e.errors()) or "invalid request")

    async def http(_, e: HTTPException):
        return _error(
            e.status_code,
            str(e.detail),
            "invalid_request_error" if e.status_code < 500 else "server_error",
            HTTP_CODES.get(e.status_code),
        )

    async def crash(_, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", "server_error")

    for exc, handler in (
        (APIError, api_error),
        (QueueFullError, capacity),
        (TailorKVError, invalid),
        (RequestValidationError, validation),
        (HTTPException, http),
        (Exception, crash),
    ):
        app.add_exception_handler(exc, handler)


def serve(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    shutdown_timeout: float = 30.0,
    limits: HttpLimits = HttpLimits(),
) -> None:
    """`tailorkv serve`: load the engine, then serve it with uvicorn until interrupted."""
    from ..engine.engine import Engine
    from ..engine.warm_up import warm_up

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = Engine.from_config(config)
    if engine.device.type == "cuda":  # kernels compile now, not in the first requests' steps
        warm_up(engine)
    async_engine = AsyncEngine(engine)
    try:
        app = create_app(
            async_engine,
            api_key=api_key,
            served_model_name=served_model_name or config.model,
            model_path=config.model,
            max_body_bytes=limits.max_body_bytes,
            body_timeout=limits.body_timeout_s,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            timeout_graceful_shutdown=5,
            http=type(
                "HeaderTimeout",
                (HeaderTimeoutProtocol,),
                {"header_timeout": limits.header_timeout_s},
            ),
            limit_concurrency=limits.limit_concurrency,
        )
        DrainingServer(config, async_engine, shutdown_timeout).run()
    finally:
        async_engine.shutdown()
        engine.shutdown()  # with tensor parallelism: the other ranks leave


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, except that the first SIGTERM / SIGINT drains (AsyncEngine.drain: no new work, running
    requests finish or end with an error their clients see) before the server stops, and the process exits 0;
    a second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, timeout: float):
        super().__init__(config)
        self.engine, self.timeout = engine, timeout

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining:
            self.should_exit = self.force_exit = True
            return
        threading.Thread(target=self._drain, name="tailorkv-drain", daemon=True).start()

    def _drain(self) -> None:
        log.info("draining: running requests get up to %.0f s", self.timeout)
        self.engine.drain(self.timeout)
        self.should_exit = True
