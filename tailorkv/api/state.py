"""What every route of one app reaches: the AsyncEngine, the app's metrics and the names it serves under."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from ..engine.async_engine import AsyncEngine
from .metrics import Metrics
from .protocol import APIError


@dataclass
class AppState:
    engine: AsyncEngine
    metrics: Metrics
    served_model_name: str
    model_path: str
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str | None) -> str:
        """The name to answer with; raises a 404 APIError for a model this server does not serve."""
        if name is not None and name not in (
            self.served_model_name,
            self.engine.model_name,
            "default",
        ):
            raise APIError(404, f"The model `{name}` does not exist.", code="model_not_found")
        return self.served_model_name


def get_state(request: Request) -> AppState:
    return request.app.state.tailorkv
