"""Bounded work before trust: body size and read timeouts, the in-flight cap, the per-request
deadline, the prompt's length checked before tokenizing, and the per-request caps (stop
strings, logit_bias, prompts x n); /health answers fast whatever else is in flight."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.helpers import SERVED_MODEL_NAME as MODEL

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
HEALTH_BOUND = 0.1  # seconds /health may take while a hostile request is in flight


def assert_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def health_while(server: Any, busy: Callable[[], bool], max_seconds: float = 20) -> list[float]:
    """/health latencies measured every 20 ms while `busy()` (bounded by count and time)."""
    times: list[float] = []
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        assert c.get("/health").status_code == 200  # the connection is open before timing
        t_end = time.monotonic() + max_seconds
        for _ in range(2000):
            if not busy() or time.monotonic() > t_end:
                break
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            times.append(time.monotonic() - t0)
            time.sleep(0.02)
    return times


def raw_request(port: int, path: str, length: int, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def read_all(sock: socket.socket, seconds: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (bounded)."""
    sock.settimeout(seconds)
    data = b""
    for _ in range(1000):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_slowloris_is_cut_off_and_health_stays_fast(start_server):
    srv = start_server(body_read_timeout=0.5, body_timeout=2.0)
    body = json.dumps(COMPLETION).encode()
    # a trickle: a byte every 0.2 s (each read is in time, the whole body is not)
    trickle = raw_request(srv.port, "/v1/completions", len(body) + 1000, body[:1])
    # a stall: headers, then nothing
    stall = raw_request(srv.port, "/v1/completions", len(body), body[:5])
    done = threading.Event()
    result: dict[str, Any] = {}

    def trickle_it() -> None:
        t0 = time.monotonic()
        try:
            for b in body[1:]:
                trickle.sendall(bytes([b]))
                time.sleep(0.2)
                if time.monotonic() - t0 > 8:
                    break
        except OSError as e:  # the server closed it
            result["error"] = e
        result["seconds"] = time.monotonic() - t0
        done.set()

    t = threading.Thread(target=trickle_it, daemon=True)
    t.start()
    times = health_while(srv, lambda: not done.is_set(), max_seconds=10)
    t.join(10)
    assert times
    assert max(times) < HEALTH_BOUND, max(times)
    assert result["seconds"] < 5, result  # cut off by the 2 s total body timeout
    for sock in (trickle, stall):
        reply = read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"request_timeout" in reply
        sock.close()
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:  # others still get through
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/completions", {**COMPLETION, "prompt": "x" * (10 << 20)}),
        ("/tokenize", {"model": MODEL, "prompt": "x" * (10 << 20)}),
        ("/v1/completions", {**COMPLETION, "prompt": ["hi", "x" * (10 << 20)]}),
    ],
)
def test_huge_prompt_is_refused_fast_and_health_stays_fast(server, path, payload):
    body = json.dumps(payload).encode()
    done = threading.Event()
    result: dict[str, Any] = {}

    def post() -> None:
        t0 = time.monotonic()
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            result["resp"] = c.post(
                path, content=body, headers={"Content-Type": "application/json"}
            )
        result["seconds"] = time.monotonic() - t0
        done.set()

    t = threading.Thread(target=post, daemon=True)
    t.start()
    times = health_while(server, lambda: not done.is_set())
    t.join(30)
    err = assert_error(result["resp"], 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert "characters" in err["message"]
    assert result["seconds"] < 2, result["seconds"]
    assert not times or max(times) < HEALTH_BOUND, max(times)


def test_declared_oversized_body_is_413_at_once(start_server):
    srv = start_server(max_body_bytes=1000)
    t0 = time.monotonic()
    sock = raw_request(srv.port, "/v1/completions", 100 << 20, b"{")
    reply = read_all(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - t0 < 2


def test_in_flight_cap_is_429_with_retry_after(start_server):
    srv = start_server(max_in_flight_requests=1, body_read_timeout=5, body_timeout=5)
    hold = raw_request(srv.port, "/v1/completions", 100, b"{")  # holds the one slot
    time.sleep(0.2)
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        resp = c.post("/v1/completions", json=COMPLETION)
        assert_error(resp, 429)
        assert int(resp.headers["retry-after"]) >= 1
        assert c.get("/health").status_code == 200  # exempt
        assert c.get("/metrics").status_code == 200
        hold.close()  # the slot frees when the client leaves
        for _ in range(50):
            resp = c.post("/v1/completions", json=COMPLETION)
            if resp.status_code != 429:
                break
            time.sleep(0.1)
        assert resp.status_code == 200, resp.text
    srv.assert_all_blocks_free()


BIG_BIAS = {str(i): 1.0 for i in range(1025)}


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"stop": [f"s{i}" for i in range(65)]}, "stop"),
        ("/v1/completions", {"stop": ["x" * 9000]}, "stop"),
        ("/v1/chat/completions", {"stop": [f"s{i}" for i in range(65)]}, "stop"),
        ("/v1/completions", {"bad_words": [f"w{i}" for i in range(65)]}, "bad_words"),
        ("/v1/completions", {"logit_bias": BIG_BIAS}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": BIG_BIAS}, "logit_bias"),
        ("/v1/completions", {"stop_token_ids": [1] * 1025}, "stop_token_ids"),
        ("/v1/completions", {"prompt": ["hi"] * 17, "n": 16}, "n"),
        ("/v1/completions", {"prompt": ["hi"] * 129, "n": 1, "best_of": 2}, "n"),
    ],
)
def test_per_request_caps_are_400(server, path, extra, param):
    if path.endswith("chat/completions"):
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    else:
        payload = {**COMPLETION, **extra}
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        err = assert_error(c.post(path, json=payload), 400, param)
        assert "at most" in err["message"]
        # at the limit it is accepted
        assert c.post("/v1/completions", json={**COMPLETION, "n": 16}).status_code == 200
    server.assert_all_blocks_free()


def test_caps_are_configurable(start_server):
    srv = start_server(max_stop_strings=1, max_logit_bias=1, max_choices_per_request=2)
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        assert_error(c.post("/v1/completions", json={**COMPLETION, "stop": ["a", "b"]}), 400)
        bias = {"1": 1.0, "2": 1.0}
        assert_error(c.post("/v1/completions", json={**COMPLETION, "logit_bias": bias}), 400)
        assert_error(c.post("/v1/completions", json={**COMPLETION, "n": 3}), 400, "n")
        ok = {**COMPLETION, "stop": ["a"], "logit_bias": {"1": 1.0}, "n": 2}
        assert c.post("/v1/completions", json=ok).status_code == 200


def _slow_engine(srv: Any, seconds: float) -> None:
    """Make every engine step take `seconds` (the tiny model is too fast to time out)."""
    step = srv.engine.step

    def slow_step() -> Any:
        time.sleep(seconds)
        return step()

    srv.engine.step = slow_step


def test_request_timeout_aborts_and_frees_blocks(start_server):
    srv = start_server(request_timeout=0.5)
    _slow_engine(srv, 0.05)
    long = {**COMPLETION, "max_tokens": 200, "ignore_eos": True}
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        t0 = time.monotonic()
        err = assert_error(c.post("/v1/completions", json=long), 504)
        assert err["code"] == "request_timeout"
        assert "--request-timeout" in err["message"]
        assert time.monotonic() - t0 < 5
        srv.assert_all_blocks_free()
        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 200,
            "ignore_eos": True,
        }
        assert_error(c.post("/v1/chat/completions", json=chat), 504)
        srv.assert_all_blocks_free()
        # streaming: the stream ends with an error event, then [DONE]
        t0 = time.monotonic()
        events = []
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) > 1000:
                    break
        assert time.monotonic() - t0 < 5
        assert events[-1] == "[DONE]"
        assert "--request-timeout" in json.loads(events[-2])["error"]["message"]
        srv.assert_all_blocks_free()
        # a short request still finishes
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200


def test_limit_flags_reach_the_settings():
    import argparse

    from lamina.server.cli import _settings, add_serve_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    s = _settings(
        p.parse_args(
            [
                *("--request-timeout", "0", "--max-connections", "0"),
                *("--body-read-timeout", "3", "--body-timeout", "30", "--header-timeout", "2"),
                *("--max-in-flight-requests", "7", "--max-logit-bias", "5"),
                *("--max-stop-strings", "2", "--max-stop-chars", "9"),
                *("--max-choices-per-request", "4", "--max-chars-per-token", "8"),
            ]
        )
    )
    assert s.request_timeout is None
    assert s.header_timeout == 2
    assert s.max_connections is None
    assert (s.body_read_timeout, s.body_timeout, s.max_in_flight_requests) == (3, 30, 7)
    assert (s.max_logit_bias, s.max_stop_strings, s.max_stop_chars) == (5, 2, 9)
    assert (s.max_choices_per_request, s.max_chars_per_token) == (4, 8)
    from lamina.commands.boundary import UsageError

    with pytest.raises(UsageError, match="--body-read-timeout"):
        _settings(p.parse_args(["--body-read-timeout", "0"]))


def test_header_timeout_closes_slow_heads(tiny_folder, live_server_cls):
    import uvicorn

    from lamina import LLM
    from lamina.server import ServerSettings
    from lamina.server.limits import header_timeout_protocol

    settings = ServerSettings(served_model_name=MODEL, header_timeout=0.5)
    srv = live_server_cls(LLM(str(tiny_folder), dtype="float32").engine, settings)
    config = uvicorn.Config(
        srv.app, log_level="warning", http=header_timeout_protocol(settings.header_timeout)
    )
    srv.server = uvicorn.Server(config)  # what `lamina serve` runs (cli.py)
    srv._thread = threading.Thread(
        target=srv.server.run, kwargs={"sockets": [srv._sock]}, daemon=True
    )
    srv.start()
    try:
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        t0 = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
        for b in head:  # a byte every 50 ms: the head is not done in 0.5 s
            try:
                slow.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.05)
            if time.monotonic() - t0 > 5:
                break
        assert read_all(slow) == b""  # closed without an answer
        assert read_all(silent) == b""
        assert time.monotonic() - t0 < 5
        slow.close()
        silent.close()
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:  # keep-alive still works
            for _ in range(3):
                assert c.get("/health").status_code == 200
                time.sleep(0.6)
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    finally:
        srv.stop()
