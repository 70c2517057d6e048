"""Server-sent events: `data: {json}` frames, the closing `data: [DONE]`, and a response that aborts its
requests as soon as the client goes away, even while no token is flowing."""

from __future__ import annotations

import json

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .batch import BatchRun

DONE = "data: [DONE]\n\n"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content, run: BatchRun):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            await self.run.aclose()
