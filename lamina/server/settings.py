"""Server settings, in a module with no heavy imports so `lamina --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """Limits and identity of one server; every bound a client could push on is here."""

    served_model_name: str = "lamina"
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    max_prompt_tokens: int | None = None  # None: what the context holds (max_model_len - 1)
    max_n: int = 16  # bounds n and best_of
    max_prompts_per_request: int = 256
    max_pending_requests: int = 1024
    shutdown_grace: float = 5.0  # seconds running streams get to finish on SIGINT/SIGTERM
    # Host headers accepted (app.py: against DNS rebinding); "*" accepts any
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    # ---- bounded work before trust (limits.py, serving.py) ----------------------------------
    # the body must keep coming: each read waits at most body_read_timeout seconds, the whole
    # body at most body_timeout; a slow sender gets 408 and its connection closed
    body_read_timeout: float = 10.0
    # seconds a request's line and headers may take to arrive (uvicorn via cli.py: the
    # connection is closed)
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    # HTTP requests being read or answered at once (/health and /metrics not counted);
    # beyond it: 429 with Retry-After
    max_in_flight_requests: int = 512
    # open connections uvicorn keeps (its limit_concurrency; beyond it: 503); None: no limit
    max_connections: int | None = 2048
    # seconds one request may run in the engine; then it is aborted (504, or an error event
    # ending the stream); None: no limit
    request_timeout: float | None = 600.0
    # a text prompt longer than max_prompt_tokens x this many characters is refused before it
    # is tokenized (no tokenizer's tokens are that long, so it could never fit)
    max_chars_per_token: int = 64
    max_stop_strings: int = 64  # entries of stop (and of bad_words)
    max_stop_chars: int = 8192  # their total length in characters
    max_logit_bias: int = 1024  # entries of logit_bias (and of stop_token_ids)
    max_choices_per_request: int = 256  # prompts x max(n, best_of) of one request
