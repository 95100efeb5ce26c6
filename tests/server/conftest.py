"""A live lamina server on 127.0.0.1 (uvicorn in a background thread, on a socket bound to a
free port) over the tiny random model, and the same model offline to compare with."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("httpx")

import uvicorn

from lamina import LLM
from lamina.engine.llm_engine import LLMEngine
from lamina.server import ServerSettings, build_app
from tests.helpers import SERVED_MODEL_NAME as MODEL


class LiveServer:
    """uvicorn serving `build_app(engine, settings)` in a daemon thread."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings) -> None:
        self.app = build_app(engine, settings)
        self.engine = engine
        self.settings = settings
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def async_engine(self) -> Any:
        return self.app.state.engine

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def on_engine(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run fn on the engine thread (between steps) and return its result."""
        ae = self.async_engine
        return asyncio.run_coroutine_threadsafe(ae.call(fn), ae._loop).result(timeout)

    def wait_idle(self, timeout: float = 10) -> float:
        """Wait until no request is in flight; returns the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            busy = self.on_engine(self.engine.has_unfinished_requests)
            if not busy and self.async_engine.num_open_requests == 0:
                return time.monotonic() - t0
            time.sleep(0.02)
        raise AssertionError(f"requests still in flight after {timeout} s")

    def assert_all_blocks_free(self) -> None:
        self.wait_idle()
        self.on_engine(self.engine.block_manager.check_all_free)

    def client(self, **kw: Any) -> Any:
        from openai import OpenAI

        kw.setdefault("api_key", self.settings.api_key or "unused")
        return OpenAI(base_url=f"{self.base_url}/v1", max_retries=0, timeout=60, **kw)

    def async_client(self, **kw: Any) -> Any:
        from openai import AsyncOpenAI

        kw.setdefault("api_key", self.settings.api_key or "unused")
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", max_retries=0, timeout=60, **kw)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        m = re.match(r"^([^{\s]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(name)


@pytest.fixture(scope="session")
def metric() -> Callable[..., float]:
    """`metric(text, name, **labels)`: the value of the first sample of `name` in a Prometheus
    text exposition whose labels include `labels`; KeyError if there is none."""
    return _metric


@pytest.fixture(scope="session")
def live_server_cls() -> type[LiveServer]:
    """The LiveServer class, for tests that serve an engine of their own."""
    return LiveServer


@pytest.fixture(scope="session")
def smol_server(smollm2_llm) -> Iterator[LiveServer]:
    """A server serving SmolLM2 as "smollm2", over its own engine on the weights the offline
    fixture already loaded."""
    e = smollm2_llm.engine
    engine = LLMEngine(
        e.loaded, e.cache_config, e.scheduler_config, e.block_manager.enable_prefix_caching
    )
    srv = LiveServer(engine, ServerSettings(served_model_name="smollm2")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_folder(tiny_model_factory):
    return tiny_model_factory("llama_gqa")[0]


@pytest.fixture(scope="session")
def tiny_llm(tiny_folder) -> LLM:
    """The offline reference: the same checkpoint, its own engine."""
    return LLM(str(tiny_folder), dtype="float32")


@pytest.fixture(scope="session")
def start_server(tiny_folder) -> Iterator[Callable[..., LiveServer]]:
    """Start a live server over a fresh engine on the tiny model with the given settings."""
    servers: list[LiveServer] = []

    def start(**settings: Any) -> LiveServer:
        settings.setdefault("served_model_name", MODEL)
        llm = LLM(str(tiny_folder), dtype="float32")
        server = LiveServer(llm.engine, ServerSettings(**settings)).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(start_server) -> LiveServer:
    """The shared server with default settings."""
    return start_server()
