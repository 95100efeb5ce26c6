"""Clients that leave mid-request have their requests aborted and blocks freed at once; a
draining server ends running streams cleanly; SIGTERM shuts a real server process down."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import SERVED_MODEL_NAME as MODEL

LONG = {"model": MODEL, "prompt": "Once", "max_tokens": 240, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def aborted(metric):
    """`aborted(server)`: how many requests the server has finished by aborting them."""

    def count(server) -> float:
        text = httpx.get(server.base_url + "/metrics", timeout=30).text
        try:
            return metric(text, "lamina:request_success_total", finished_reason="abort")
        except KeyError:  # no request aborted yet: the labelled sample does not exist
            return 0.0

    return count


@pytest.fixture(scope="module")
def slow_server(start_server):
    """A server whose engine steps take at least 5 ms, so that a 240-token request outlives
    any client that leaves early (the tiny model alone is faster than the clients)."""
    srv = start_server()
    step = srv.engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    srv.engine.step = slow_step
    return srv


def test_burst_of_50_disconnecting_clients_frees_every_block(slow_server, aborted):
    server = slow_server
    before = aborted(server)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            if i % 2:  # read one event, then leave; the others leave right after the headers
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break

    async def main() -> None:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=30) as c:
            await asyncio.gather(*(one(c, i) for i in range(50)))

    asyncio.run(main())
    waited = server.wait_idle(timeout=20)
    server.assert_all_blocks_free()
    assert aborted(server) - before >= 45  # each would have run 240 tokens
    assert waited < 2.0
    resp = server.client().completions.create(model=MODEL, prompt="ok", max_tokens=3)
    assert resp.choices[0].finish_reason in ("length", "stop")  # and the server still serves


def test_non_streaming_client_that_gives_up_is_aborted(slow_server, aborted):
    server = slow_server
    before = aborted(server)
    with (
        httpx.Client(base_url=server.base_url) as c,
        pytest.raises(httpx.TimeoutException),  # 240 tokens: more than a second of work
    ):
        c.post("/v1/completions", json=LONG, timeout=0.3)
    waited = server.wait_idle(timeout=20)
    server.assert_all_blocks_free()
    assert aborted(server) - before == 1
    assert waited < 2.0


def test_drain_ends_running_streams_cleanly(start_server):
    srv = start_server()

    async def stream(client: httpx.AsyncClient, path: str, body: dict) -> list[str]:
        events = []
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])  # noqa: PERF401 - read while the stream arrives
        return events

    async def main():
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c:
            chat = {k: v for k, v in LONG.items() if k != "prompt"}
            chat.update(messages=[{"role": "user", "content": "hi"}], max_tokens=200)
            tasks = [asyncio.create_task(stream(c, "/v1/completions", LONG)) for _ in range(4)]
            tasks.append(asyncio.create_task(stream(c, "/v1/chat/completions", chat)))
            deadline = time.monotonic() + 30
            while srv.async_engine.snapshot.num_running < 5:
                assert time.monotonic() < deadline, "the five streams never all ran"
                await asyncio.sleep(0.01)
            ae = srv.async_engine
            fut = asyncio.run_coroutine_threadsafe(ae.drain(0.0), ae._loop)
            results = await asyncio.gather(*tasks)
            await asyncio.wrap_future(fut)
            refused = await c.post("/v1/completions", json=LONG)
            return results, refused

    results, refused = asyncio.run(main())
    for events in results:
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "abort"
    assert refused.status_code == 503
    assert "error" in refused.json()
    srv.assert_all_blocks_free()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_process(folder: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m lamina.server` on a free port; retried if another process takes the port
    between our probe and the server's bind."""
    root = Path(__file__).resolve().parents[2]
    for _ in range(3):
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "lamina.server",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--served-model-name",
            MODEL,
            "--shutdown-grace",
            "0",
            "--log-level",
            "warning",
        ]
        log = log_path.open("w")
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                models = httpx.get(url + "/v1/models", timeout=1)
                if models.status_code == 200 and models.json()["data"][0]["id"] == MODEL:
                    return proc, url
            except (httpx.TransportError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise AssertionError(f"the server did not come up:\n{log_path.read_text()}")


def test_sigterm_shuts_down_cleanly(tiny_folder, tmp_path):
    log_path = tmp_path / "server.log"
    proc, url = _start_process(tiny_folder, log_path)
    try:
        events = []
        body = {**LONG, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("abort", "length")
        # uvicorn re-raises the signal once it has shut down, as a process killed by it would
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = log_path.read_text()
        assert "Traceback" not in log
        assert "ERROR" not in log
    except (AssertionError, httpx.HTTPError) as e:
        raise AssertionError(f"{e!r}\n--- server log ---\n{log_path.read_text()}") from e
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
