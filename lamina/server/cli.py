"""`lamina serve`: load a model and serve it over HTTP with uvicorn.

`add_serve_parser(subparsers)` / `cmd_serve(args)` plug into the `lamina` command;
`python -m lamina.server` runs the same parser on its own (the tests and benchmarks use that).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from lamina.commands.boundary import (
    UsageError,
    add_debug_flag,
    check_min,
    loading,
    run_command,
    usage_errors,
)
from lamina.engine_config import EngineConfig
from lamina.server.settings import ServerSettings


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The engine flags (generated from `EngineConfig`, as for `lamina run`) and the server's."""
    EngineConfig.add_cli_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0-65535 (0: any free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LAMINA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: "
        "$LAMINA_API_KEY; prefer it or --api-key-file: a flag shows in ps)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help="read the API key from this file (its first line)",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header names accepted, against DNS rebinding ('*.example.com' "
        "for subdomains, '*' for any; default: localhost, 127.0.0.1, ::1 and --host)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the model file's name)",
    )
    p.add_argument("--max-body-bytes", type=int, default=ServerSettings.max_body_bytes)
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt accepted (default: what the context holds)",
    )
    p.add_argument(
        "--max-n", type=int, default=ServerSettings.max_n, help="largest n / best_of accepted"
    )
    p.add_argument(
        "--max-pending-requests",
        type=int,
        default=ServerSettings.max_pending_requests,
        help="requests in flight before new ones get 503",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=ServerSettings.shutdown_grace,
        help="seconds running requests get to finish on SIGINT/SIGTERM; the rest "
        "end with finish_reason 'abort'",
    )
    add_limit_args(p)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="threads for torch's CPU kernels (default: $OMP_NUM_THREADS if set, else the "
        "usable cores minus one, kept for the HTTP event loop)",
    )
    p.add_argument("--log-level", default="info")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """The bounds on what a client can make the server do before and while it trusts it."""
    d = ServerSettings
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="seconds a request's line and headers may take to arrive (then the connection "
        "is closed)",
    )
    p.add_argument(
        "--body-read-timeout",
        type=float,
        default=d.body_read_timeout,
        help="seconds one read of a request body may wait (then 408, connection closed)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help="seconds the whole request body may take to arrive (then 408)",
    )
    p.add_argument(
        "--max-in-flight-requests",
        type=int,
        default=d.max_in_flight_requests,
        help="HTTP requests read or answered at once; more get 429 with Retry-After "
        "(/health and /metrics exempt)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="open connections and tasks uvicorn allows; more get 503 (0: no limit)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="seconds a request may run in the engine; then it is aborted with 504, or its "
        "stream ends with an error event (0: no limit)",
    )
    p.add_argument(
        "--max-chars-per-token",
        type=int,
        default=d.max_chars_per_token,
        help="a text prompt over max-prompt-tokens x this many characters is refused before "
        "it is tokenized",
    )
    p.add_argument(
        "--max-stop-strings",
        type=int,
        default=d.max_stop_strings,
        help="entries of stop (and of bad_words) in one request",
    )
    p.add_argument(
        "--max-stop-chars",
        type=int,
        default=d.max_stop_chars,
        help="total characters of stop (and of bad_words) in one request",
    )
    p.add_argument(
        "--max-logit-bias",
        type=int,
        default=d.max_logit_bias,
        help="entries of logit_bias (and of stop_token_ids) in one request",
    )
    p.add_argument(
        "--max-choices-per-request",
        type=int,
        default=d.max_choices_per_request,
        help="prompts x max(n, best_of) in one request",
    )


def add_serve_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def _model_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    name = os.path.basename(os.path.normpath(model))
    return name.removesuffix(".gguf") or model


def serving_threads(requested: int | None) -> int:
    """torch threads for the engine of a server. The event loop (HTTP, JSON, detokenized
    streams) needs a core of its own: when it preempts one of torch's OpenMP workers, the
    others spin at the next barrier, which on a 2-core machine made a token cost 23 ms instead
    of 15 (benchmarks/results/serve.md). An explicit number or OMP_NUM_THREADS wins."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--torch-threads must be >= 1, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        import torch

        return torch.get_num_threads()
    from lamina.cpu import usable_cores

    return max(1, usable_cores() - 1)


# Entries each of oneDNN's primitive cache and ideep's per-thread cache of GEMM primitives may
# hold in a server (both default to 1024). The packed linears (lamina/layers/linear.py) build a
# primitive per (rows, weight shape), ~1.5 MB in the two caches for a few hundred rows, and a
# server's row count changes with every step that carries a prefill chunk, so the defaults let
# it grow by over a GB: 400 prompts of distinct lengths took a server from 636 to 1583 MB, and
# from 633 to ~1030 MB (flat after the first 50) with 128 (the 30-minute soak's 9.7 MB/min,
# benchmarks/results/README.md, Soak). Keys are shapes, not weights (one entry serves every
# layer), so 128 holds every decode batch size in use; a one-off row count costs ~0.3 ms per
# weight shape once per step to rebuild, as it did when it was new.
GEMM_PRIMITIVE_CACHE_CAPACITY = 128
_CACHE_CAPACITY_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_gemm_primitive_caches(capacity: int = GEMM_PRIMITIVE_CACHE_CAPACITY) -> None:
    """Bound oneDNN's and ideep's primitive caches (see GEMM_PRIMITIVE_CACHE_CAPACITY) unless the
    environment already sets them. Both libraries read their variable when the cache is first
    used, so this must run before the process's first oneDNN op (the model load packs weights)."""
    for name in _CACHE_CAPACITY_VARS:
        os.environ.setdefault(name, str(capacity))


def _settings(args: argparse.Namespace) -> ServerSettings:
    """The server's limits from the flags, each checked."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0-65535 (0: any free port), got {args.port}")
    check_min("--max-body-bytes", args.max_body_bytes, 1)
    check_min("--max-prompt-tokens", args.max_prompt_tokens, 1)
    check_min("--max-n", args.max_n, 1)
    check_min("--max-pending-requests", args.max_pending_requests, 1)
    check_min("--shutdown-grace", args.shutdown_grace, 0)
    for flag, seconds in (
        ("--header-timeout", args.header_timeout),
        ("--body-read-timeout", args.body_read_timeout),
        ("--body-timeout", args.body_timeout),
    ):
        if not seconds > 0:
            raise UsageError(f"{flag} must be > 0, got {seconds}")
    check_min("--max-connections", args.max_connections, 0)
    check_min("--request-timeout", args.request_timeout, 0)
    for flag in (
        "--max-in-flight-requests",
        "--max-chars-per-token",
        "--max-stop-strings",
        "--max-stop-chars",
        "--max-logit-bias",
        "--max-choices-per-request",
    ):
        check_min(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    return ServerSettings(
        served_model_name=args.served_model_name or _model_name(args.model),
        api_key=_api_key(args),
        allowed_hosts=_allowed_hosts(args),
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_n=args.max_n,
        max_pending_requests=args.max_pending_requests,
        shutdown_grace=args.shutdown_grace,
        header_timeout=args.header_timeout,
        body_read_timeout=args.body_read_timeout,
        body_timeout=args.body_timeout,
        max_in_flight_requests=args.max_in_flight_requests,
        max_connections=args.max_connections or None,
        request_timeout=args.request_timeout or None,
        max_chars_per_token=args.max_chars_per_token,
        max_stop_strings=args.max_stop_strings,
        max_stop_chars=args.max_stop_chars,
        max_logit_bias=args.max_logit_bias,
        max_choices_per_request=args.max_choices_per_request,
    )


def _api_key(args: argparse.Namespace) -> str | None:
    path = getattr(args, "api_key_file", None)
    if path is None:
        return args.api_key or None
    if args.api_key and args.api_key != os.environ.get("LAMINA_API_KEY"):
        raise UsageError("give --api-key or --api-key-file, not both")
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except OSError as e:
        raise UsageError(f"--api-key-file: cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:  # a ValueError: it would name neither the flag nor the file
        raise UsageError(f"--api-key-file: cannot read {path}: not UTF-8 text") from e
    if not key:
        raise UsageError(f"--api-key-file: {path} holds no key")
    return key


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    value = getattr(args, "allowed_hosts", None)
    if value is not None:
        hosts = tuple(h.strip() for h in value.split(",") if h.strip())
        if not hosts:
            raise UsageError("--allowed-hosts is empty; give names, or '*' to allow any")
        return hosts
    hosts = ServerSettings.allowed_hosts
    host = getattr(args, "host", "")
    if host and host not in ("0.0.0.0", "::") and host not in hosts:
        hosts += (host,)
    return hosts


def check_address(host: str, port: int) -> None:
    """Bind (and release) the address as uvicorn will (SO_REUSEADDR, IPv6 when the host has a
    colon), so a host that is not this machine's or a port already in use fails before the
    model loads, with an OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lamina.llm import LLM
    from lamina.loading.resolve import resolve_model
    from lamina.server.app import build_app
    from lamina.server.limits import header_timeout_protocol

    with usage_errors():  # every argument is checked before the model loads
        engine_config = EngineConfig.from_cli_args(args)
        resolve_model(engine_config.model)
        settings = _settings(args)
        logging.basicConfig(
            level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
    threads = serving_threads(args.torch_threads)
    check_address(args.host, args.port)
    bound_gemm_primitive_caches()
    log = logging.getLogger("lamina.server")
    import torch

    torch.set_num_threads(threads)
    log.info(
        "loading %s (%d torch threads)",
        args.model or "the default SmolLM2 GGUF",
        torch.get_num_threads(),
    )
    with loading(engine_config.model):
        llm = LLM(engine_config)
    app = build_app(llm.engine, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(args.shutdown_grace, 0) + 5,
        limit_concurrency=settings.max_connections,
        http=header_timeout_protocol(settings.header_timeout),
    )
    server = _graceful_server(config, app.state.engine, settings.shutdown_grace)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    log.info("serving %r on http://%s:%d/v1", settings.served_model_name, args.host, args.port)
    server.run()
    return 0


def _graceful_server(config: Any, engine: Any, grace: float) -> Any:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but on SIGINT/SIGTERM it first stops listening, lets running
        requests finish for `grace` seconds, then aborts the rest so every stream still ends
        with a final chunk and `[DONE]` instead of a cut connection."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:
                server.close()
            await engine.drain(grace)
            await super().shutdown(sockets)

    return GracefulServer(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamina serve", description="OpenAI-compatible server")
    add_serve_args(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command("lamina serve", cmd_serve, args)
