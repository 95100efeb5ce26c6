"""A server that can face the network (issue #18): the API key from --api-key-file, the
Host-header allow-list against DNS rebinding, and 500s that tell the client only an id."""

from __future__ import annotations

import argparse
import json
import logging

import httpx
import pytest

from lamina.commands.boundary import UsageError
from tests.helpers import SERVED_MODEL_NAME as MODEL

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
SECRET = "/home/alice/.cache/secret-path"  # what a 500 must not show


def settings_from(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    from lamina.server.cli import _settings, add_serve_args

    monkeypatch.delenv("LAMINA_API_KEY", raising=False)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return _settings(p.parse_args(argv))


# ---- --api-key-file ---------------------------------------------------------------------------
def test_api_key_file(tmp_path, monkeypatch):
    f = tmp_path / "key"
    f.write_text("  s3cret  \nsecond line ignored\n")
    assert settings_from(["--api-key-file", str(f)], monkeypatch).api_key == "s3cret"
    assert settings_from(["--api-key", "k"], monkeypatch).api_key == "k"
    assert settings_from([], monkeypatch).api_key is None


@pytest.mark.parametrize(
    ("content", "argv", "match"),
    [
        (None, ["--api-key", "k"], "not both"),
        ("", [], "holds no key"),
        ("\n\nkey on line 3\n", [], "holds no key"),
        (b"\xff\xfe\x00k", [], "cannot read"),
        ("missing", [], "cannot read"),
        ("directory", [], "cannot read"),
    ],
)
def test_api_key_file_usage_errors(tmp_path, monkeypatch, content, argv, match):
    f = tmp_path / "key"
    if content == "directory":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    elif content != "missing":
        f.write_text("k" if content is None else content)
    with pytest.raises(UsageError, match=match) as info:
        settings_from([*argv, "--api-key-file", str(f)], monkeypatch)
    assert "--api-key" in str(info.value)


def test_api_key_file_wins_over_the_environment(tmp_path, monkeypatch):
    from lamina.server.cli import _settings, add_serve_args

    f = tmp_path / "key"
    f.write_text("from-file\n")
    monkeypatch.setenv("LAMINA_API_KEY", "from-env")
    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert _settings(p.parse_args(["--api-key-file", str(f)])).api_key == "from-file"


# ---- Host-header allow-list -------------------------------------------------------------------
def test_allowed_hosts_flag(monkeypatch):
    default = ("localhost", "127.0.0.1", "::1")
    assert settings_from([], monkeypatch).allowed_hosts == default
    assert settings_from(["--host", "0.0.0.0"], monkeypatch).allowed_hosts == default
    assert settings_from(["--host", "10.1.2.3"], monkeypatch).allowed_hosts == (
        *default,
        "10.1.2.3",
    )
    given = settings_from(["--allowed-hosts", " api.example.com, *.lan ,"], monkeypatch)
    assert given.allowed_hosts == ("api.example.com", "*.lan")
    with pytest.raises(UsageError, match="--allowed-hosts"):
        settings_from(["--allowed-hosts", " , "], monkeypatch)


@pytest.mark.parametrize(
    ("allowed", "host", "ok"),
    [
        (("localhost", "127.0.0.1", "::1"), "localhost:8000", True),
        (("localhost", "127.0.0.1", "::1"), "LOCALHOST", True),
        (("localhost", "127.0.0.1", "::1"), "localhost.", True),
        (("localhost", "127.0.0.1", "::1"), "127.0.0.1:8000", True),
        (("localhost", "127.0.0.1", "::1"), "[::1]:8000", True),
        (("localhost", "127.0.0.1", "::1"), "[::1]", True),
        (("localhost", "127.0.0.1", "::1"), "[::2]:8000", False),
        (("localhost", "127.0.0.1", "::1"), "evil.example", False),
        (("localhost", "127.0.0.1", "::1"), "evil.example:8000", False),
        (("localhost", "127.0.0.1", "::1"), "localhost.evil.example", False),
        (("localhost", "127.0.0.1", "::1"), "127.0.0.1.nip.io", False),
        (("localhost", "127.0.0.1", "::1"), "", False),
        (("*.example.com",), "api.example.com:443", True),
        (("*.example.com",), "a.b.example.com", True),
        (("*.example.com",), "example.com", False),
        (("*.example.com",), "evilexample.com", False),
        (("[::1]", "API.Example.com"), "api.example.com", True),
        (("[::1]", "API.Example.com"), "[::1]:1", True),
        (("*",), "anything.at.all:1", True),
    ],
)
def test_host_matching(allowed, host, ok):
    from lamina.server.app import HostCheckMiddleware, _host_name

    assert HostCheckMiddleware(None, allowed).allowed(_host_name(host)) is ok  # type: ignore[arg-type]


def test_host_check_on_the_default_server(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            resp = c.get(path, headers={"Host": "evil.example"})
            assert resp.status_code == 400, resp.text
            err = resp.json()["error"]
            assert err["code"] == "invalid_host"
            assert "--allowed-hosts" in err["message"]
        resp = c.post("/v1/completions", json=COMPLETION, headers={"Host": "evil.example:80"})
        assert resp.json()["error"]["code"] == "invalid_host"
        assert c.get("/health", headers={"Host": "10.0.0.7:8000"}).status_code == 200
        for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.1"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
    server.assert_all_blocks_free()


def test_host_check_with_allowed_hosts(start_server):
    srv = start_server(allowed_hosts=("*.example.com", "127.0.0.1"))
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        assert c.get("/v1/models", headers={"Host": "api.example.com"}).status_code == 200
        assert c.get("/v1/models").status_code == 200  # 127.0.0.1:port
        resp = c.get("/v1/models", headers={"Host": "localhost"})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_host"
    open_srv = start_server(allowed_hosts=("*",))
    with httpx.Client(base_url=open_srv.base_url, timeout=30) as c:
        assert c.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200


# ---- 500s carry an id, and the log the traceback ----------------------------------------------
def _boom(*args, **kwargs):
    raise RuntimeError(f"cannot open {SECRET}")


def _assert_only_an_id(err: dict, caplog: pytest.LogCaptureFixture) -> None:
    assert err["type"] == "server_error"
    message = err["message"]
    assert SECRET not in message
    assert "RuntimeError" not in message
    assert "Traceback" not in message
    assert "lamina" not in message  # no module path
    error_id = message.split("(id ", 1)[1].split(";", 1)[0]
    assert len(error_id) >= 8
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged, [r.getMessage() for r in caplog.records]
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])


def test_500_carries_only_an_id(server, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="lamina.server")
    monkeypatch.setattr(server.app.state.serving, "completion_logprobs", _boom)
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        resp = c.post("/v1/completions", json={**COMPLETION, "logprobs": 1})
    assert resp.status_code == 500, resp.text
    assert SECRET not in resp.text
    _assert_only_an_id(resp.json()["error"], caplog)
    server.assert_all_blocks_free()


def test_500_in_a_stream_carries_only_an_id(server, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="lamina.server")
    monkeypatch.setattr(server.app.state.serving, "completion_logprobs", _boom)
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        resp = c.post("/v1/completions", json={**COMPLETION, "logprobs": 1, "stream": True})
    assert resp.status_code == 200  # the stream had started
    assert SECRET not in resp.text
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    _assert_only_an_id(json.loads(events[-2])["error"], caplog)
    server.assert_all_blocks_free()


def test_500_in_a_chat_stream_carries_only_an_id(server, monkeypatch, caplog):
    import lamina.server.chat as chat

    caplog.set_level(logging.ERROR, logger="lamina.server")
    monkeypatch.setattr(chat, "ChatCompletionChunk", _boom)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "stream": True,
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        resp = c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert SECRET not in resp.text
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    _assert_only_an_id(json.loads(events[-2])["error"], caplog)
    server.assert_all_blocks_free()
