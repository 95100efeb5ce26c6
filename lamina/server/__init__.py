"""OpenAI-compatible HTTP server over the continuous-batching engine.

`build_app(engine, settings)` gives the FastAPI app; `lamina serve` (see cli.py) runs it with
uvicorn. The pieces: async_engine.py (one engine thread, asyncio fan-out), protocol.py
(pydantic bodies), completions.py / chat.py (the endpoints), metrics.py (Prometheus),
errors.py (OpenAI's error JSON). Names are imported lazily so that `lamina --help`, which
imports cli.py, does not pay for FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncEngine", "ServerSettings", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from lamina.server.app import build_app

        return build_app
    if name == "AsyncEngine":
        from lamina.server.async_engine import AsyncEngine

        return AsyncEngine
    if name == "ServerSettings":
        from lamina.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
