"""deploy/nginx/lamina.conf, run for real: nginx terminating TLS (a throwaway self-signed
certificate) in front of a live lamina server, everything on 127.0.0.1.

The shipped file is the thing under test: `render` substitutes only its ports, certificate
paths, server_name and upstream port (and drops the IPv6 listens), each an exact string that
must be there; what needs root (pid file, logs, temp folders) lives in a small main config
written here that includes it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from lamina.server import ServerSettings
from tests.helpers import SERVED_MODEL_NAME as MODEL

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "nginx" / "lamina.conf"
NAME = "lamina.example.test"  # the public name: in the certificate and --allowed-hosts
KEY = "proxy-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Host": NAME}
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NGINX = shutil.which("nginx", path=_SBIN)
OPENSSL = shutil.which("openssl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def substitute(text: str, old: str, new: str, count: int) -> str:
    """Replace `old`, which must occur exactly `count` times (the shipped file changed?)."""
    found = text.count(old)
    assert found == count, f"{SHIPPED.name}: {old!r} found {found} times, expected {count}"
    return text.replace(old, new)


def render(http_port: int, https_port: int, upstream_port: int, cert: Path, key: Path) -> str:
    """The shipped config with test ports, certificate and name; loopback only."""
    text = SHIPPED.read_text()
    ipv6 = re.compile(r"^[ \t]*listen \[::\]:\d+[^;\n]*;\n", re.MULTILINE)
    assert len(ipv6.findall(text)) == 2, "expected the two IPv6 listens"
    text = ipv6.sub("", text)
    text = substitute(text, "listen 80;", f"listen 127.0.0.1:{http_port};", 1)
    text = substitute(text, "listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;", 1)
    text = substitute(text, "server_name example.com;", f"server_name {NAME};", 2)
    text = substitute(text, "/etc/letsencrypt/live/example.com/fullchain.pem", str(cert), 1)
    text = substitute(text, "/etc/letsencrypt/live/example.com/privkey.pem", str(key), 1)
    text = substitute(text, "server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};", 1)
    directives = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "example.com" not in directives
    assert ":8000" not in directives
    return text


def main_config(tmp: Path, site: Path) -> str:
    """nginx.conf around the site file: every path nginx writes under `tmp`."""
    flags = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    temp_paths = [f"client_body_temp_path {tmp}/client_body;", f"proxy_temp_path {tmp}/proxy;"]
    temp_paths += [
        f"{m}_temp_path {tmp}/{m};"
        for m in ("fastcgi", "uwsgi", "scgi")
        if f"--without-http_{m}_module" not in flags
    ]
    # as root, workers would run as `nobody` and could not read the test's private folders
    user = "user root;" if os.geteuid() == 0 else ""
    lines = [user, "worker_processes 1;", f"pid {tmp}/nginx.pid;"]
    lines += [f"error_log {tmp}/error.log warn;", "events { worker_connections 64; }", "http {"]
    lines += [f"    access_log {tmp}/access.log;", *(f"    {p}" for p in temp_paths)]
    lines += [f"    include {site};", "}", ""]
    return "\n".join(lines)


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for NAME and 127.0.0.1, valid one day."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={NAME}", "-keyout", str(key), "-out", str(cert),
         "-addext", f"subjectAltName=DNS:{NAME},IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class Proxy:
    def __init__(self, tmp: Path, http_port: int, https_port: int, cert: Path) -> None:
        self.tmp = tmp
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.https_url = f"https://127.0.0.1:{https_port}"
        self.cert = cert

    def client(self, **kw: Any) -> Any:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        return httpx.Client(base_url=self.https_url, verify=ctx, timeout=60, **kw)

    def log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text() if path.exists() else ""


def start_nginx(tmp: Path, upstream_port: int, cert: Path, key: Path) -> tuple[Proxy, Any]:
    http_port, https_port = free_port(), free_port()
    site = tmp / "lamina.conf"
    site.write_text(render(http_port, https_port, upstream_port, cert, key))
    conf = tmp / "nginx.conf"
    conf.write_text(main_config(tmp, site))
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
         "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proxy = Proxy(tmp, http_port, https_port, cert)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"nginx exited {proc.returncode}:\n{out}{proxy.log()}")
        try:
            socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
            return proxy, proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"nginx did not listen:\n{proxy.log()}") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def lamina(start_server) -> Any:
    server = start_server(api_key=KEY, allowed_hosts=(NAME,))

    async def echo(request: Request) -> dict[str, Any]:  # what lamina sees of a proxied request
        return {"headers": dict(request.headers), "scheme": request.url.scheme}

    server.app.add_api_route("/_proxy_test_echo", echo)
    return server


@pytest.fixture(scope="module")
def proxy(lamina, tmp_path_factory) -> Iterator[Proxy]:
    if NGINX is None:
        pytest.skip("nginx is not installed (scripts/setup.sh --test installs it as root)")
    if OPENSSL is None:
        pytest.skip("the openssl CLI is needed for a throwaway certificate")
    tmp = tmp_path_factory.mktemp("nginx")
    cert, key = make_certificate(tmp)
    p, proc = start_nginx(tmp, lamina.port, cert, key)
    yield p
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    errors = [ln for ln in p.log().splitlines() if "[emerg]" in ln or "[crit]" in ln]
    assert not errors, "\n".join(errors)


def test_body_limit_matches_lamina_default() -> None:
    m = re.search(r"^\s*client_max_body_size (\d+)m;", SHIPPED.read_text(), re.MULTILINE)
    assert m, "client_max_body_size not found"
    assert int(m.group(1)) << 20 == ServerSettings().max_body_bytes


def test_completion_over_https(proxy: Proxy) -> None:
    with proxy.client() as c:
        r = c.post(
            "/v1/completions",
            headers=AUTH,
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]
        assert r.http_version == "HTTP/1.1"
        assert r.headers["strict-transport-security"] == "max-age=63072000"
        tls = r.extensions["network_stream"].get_extra_info("ssl_object")
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_stream_is_not_buffered(proxy: Proxy, lamina, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events reach the client while lamina is still generating: with each engine step slowed
    to 0.1 s, sixteen tokens take 1.6 s; a buffering proxy would hand them over all at once."""
    step = lamina.engine.step

    def slow_step() -> Any:
        time.sleep(0.1)
        return step()

    monkeypatch.setattr(lamina.engine, "step", slow_step)
    body = {
        "model": MODEL, "prompt": "Hello", "max_tokens": 16, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    arrivals: list[tuple[float, bytes]] = []
    with proxy.client() as c, c.stream("POST", "/v1/completions", headers=AUTH, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        arrivals.extend((time.monotonic(), chunk) for chunk in r.iter_raw() if chunk)
    events: list[tuple[float, str]] = []
    buf = b""
    for t, chunk in arrivals:
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            events.append((t, event.decode()))
    data = [e for e in events if e[1].startswith("data: ")]
    assert data[-1][1] == "data: [DONE]"
    assert data[0][1] != "data: [DONE]"
    # (the detokenizer holds back partial characters: fewer events than tokens)
    assert len(arrivals) >= 3, f"the stream came in {len(arrivals)} pieces"
    spread = data[-1][0] - data[0][0]
    assert spread > 0.5, f"first and last event {spread:.3f} s apart: buffered"


def test_http_redirects_to_https(proxy: Proxy) -> None:
    r = httpx.get(f"{proxy.http_url}/v1/models?x=1", headers={"Host": NAME}, timeout=30)
    assert r.status_code == 301
    assert r.headers["location"] == f"https://{NAME}/v1/models?x=1"


def test_public_name_reaches_host_allow_list(proxy: Proxy) -> None:
    with proxy.client() as c:
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        # any other name (here: the address the client connected to) lamina refuses
        r = c.get("/v1/models", headers={"Authorization": AUTH["Authorization"]})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_host"
        r = c.get("/v1/models", headers={**AUTH, "Host": "rebound.example"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_host"


def test_forwarded_headers(proxy: Proxy) -> None:
    with proxy.client() as c:
        r = c.get("/_proxy_test_echo", headers={**AUTH, "X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["host"] == NAME
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's claim replaced, not extended


def test_api_key_enforced_through_proxy(proxy: Proxy) -> None:
    with proxy.client() as c:
        for headers in ({"Host": NAME}, {"Host": NAME, "Authorization": "Bearer wrong"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        assert c.get("/health", headers={"Host": NAME}).status_code == 200


def test_body_over_limit_refused_by_proxy(proxy: Proxy) -> None:
    with proxy.client() as c:
        r = c.post(
            "/v1/completions",
            headers={**AUTH, "Content-Type": "application/json"},
            content=b" " * (ServerSettings().max_body_bytes + 1),
        )
    assert r.status_code == 413
