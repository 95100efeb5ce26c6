"""Online serving benchmark: lamina's server beside llama.cpp's (llama-cpp-python[server]) on
the same GGUF, in one run, in the manner of `vllm bench serve`.

Each backend is started as its own process (one at a time, so they never share the cores), warmed
up, then sent `--num-prompts` streamed /v1/completions requests at each concurrency level (a
semaphore of that many clients; no arrival-rate limit, like `--max-concurrency` with
`--request-rate inf`). Prompts are random token ids decoded to text (vllm's "random" dataset);
EOS is banned with logit_bias so every request generates exactly `--output-len` tokens, greedy.

Per request: TTFT (start -> first text chunk), TPOT ((latency - TTFT) / (output tokens - 1)),
ITL (gaps between text chunks); each reported as mean, median and p99 over the run, with
request throughput, output-token throughput and total-token throughput.

    python benchmarks/serve.py [--model M.gguf] [--num-prompts 32] [--input-len 128]
        [--output-len 64] [--concurrency 1 4 16] [--backends lamina lamina-gguf llama.cpp]

llama-cpp-python compiles llama.cpp on install (~12 min on 2 cores), so it is not a dependency:
without it the llama.cpp half is skipped with a message. Its bundled server runs one request
at a time (PEERS.md); it is started with --interrupt_requests False so that concurrent streams
queue instead of cancelling each other. Results: benchmarks/results/serve.{json,md}, with the
run's environment (environment.py), whose "threads" is --threads (llama.cpp's) and
"lamina_server_threads" the torch threads lamina's servers chose (lamina serve's default).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import random
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
MODEL_NAME = "bench"


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_tokenizer(path: Path) -> Any:
    from lamina.formats.gguf import open_gguf
    from lamina.loading.tokenizer import Tokenizer

    return Tokenizer.from_gguf(open_gguf(path))


def make_prompts(tok: Any, n: int, input_len: int, seed: int) -> list[tuple[str, int]]:
    """Random token ids (specials excluded) decoded to text, with their re-encoded lengths."""
    rng = random.Random(seed)
    vocab = tok.vocab_size
    prompts = []
    for _ in range(n):
        ids = [rng.randrange(256, vocab) for _ in range(input_len)]
        text = tok.decode(ids, skip_special_tokens=True)
        prompts.append((text, len(tok.encode(text))))
    return prompts


BACKENDS = ("lamina", "lamina-gguf", "llama.cpp")


def server_command(backend: str, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    threads = str(args.threads)
    if backend.startswith("lamina"):
        native = ["--quantization", "gguf"] if backend == "lamina-gguf" else []
        return [
            sys.executable,
            "-m",
            "lamina.server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--served-model-name",
            MODEL_NAME,
            "--max-model-len",
            str(args.max_model_len),
            "--max-num-seqs",
            str(max(64, max(args.concurrency))),
            "--log-level",
            "warning",
            *native,
        ]
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--model_alias",
        MODEL_NAME,
        "--n_ctx",
        str(args.max_model_len),
        "--n_threads",
        threads,
        "--n_threads_batch",
        threads,
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]


class Server:
    """A backend's server process, up until stop()."""

    def __init__(self, backend: str, model: Path, args: argparse.Namespace) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # kept open for the server's lifetime (closed in stop())
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", suffix=f"-{backend}.log", delete=False
        )
        cmd = server_command(backend, model, self.port, args)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{backend} server did not start; log:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], prompt_tokens: int, tok: Any
) -> RequestResult:
    res = RequestResult(ok=False, prompt_tokens=prompt_tokens)
    start = last = time.perf_counter()
    text, usage = "", None
    try:
        async with client.stream("POST", url + "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                piece = (choices[0].get("text") or "") if choices else ""
                if not piece:
                    continue
                now = time.perf_counter()
                if not text:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
                text += piece
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = (usage or {}).get("completion_tokens") or len(
        tok.encode(text, add_special_tokens=False)
    )
    res.ok = bool(text)
    return res


def _stats(values: list[float], scale: float = 1e3) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {
        "mean": statistics.fmean(values) * scale,
        "median": statistics.median(values) * scale,
        "p99": p99 * scale,
    }


async def run_level(
    url: str,
    prompts: list[tuple[str, int]],
    concurrency: int,
    args: argparse.Namespace,
    tok: Any,
    eos: int | None,
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    bias = {str(eos): -100} if eos is not None else None
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def go(text: str, n: int) -> RequestResult:
            payload = {
                "model": MODEL_NAME,
                "prompt": text,
                "max_tokens": args.output_len,
                "temperature": 0,
                "stream": True,
                "logit_bias": bias,
                "stream_options": {"include_usage": True},
            }
            async with sem:
                return await one_request(client, url, payload, n, tok)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(t, n) for t, n in prompts))
        duration = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itls]),
        "e2e_ms": _stats([r.latency for r in ok]),
    }


def bench_backend(
    backend: str,
    model: Path,
    prompts: list[tuple[str, int]],
    args: argparse.Namespace,
    tok: Any,
) -> dict[str, Any]:
    print(f"== {backend}: starting its server", flush=True)
    server = Server(backend, model, args)
    try:
        eos = tok.eos_token_id
        warm = prompts[:2]
        asyncio.run(run_level(server.url, warm, 2, args, tok, eos))
        levels = []
        for c in args.concurrency:
            level = asyncio.run(run_level(server.url, prompts, c, args, tok, eos))
            levels.append(level)
            print(
                f"   concurrency {c:>2}: {level['request_throughput']:.2f} req/s, "
                f"{level['output_throughput']:.1f} out tok/s, "
                f"TTFT median {level['ttft_ms']['median']:.0f} ms, "
                f"TPOT median {level['tpot_ms']['median']:.1f} ms, "
                f"failed {level['failed']}",
                flush=True,
            )
        return {"levels": levels}
    finally:
        server.stop()


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"# Serving benchmark ({report['date']})",
        "",
        f"Model `{Path(cfg['model']).name}`, {cfg['num_prompts']} prompts of ~{cfg['input_len']} "
        f"random tokens, {cfg['output_len']} output tokens each (EOS banned), greedy, streamed "
        f"/v1/completions. Machine: {report['machine']}; 1-minute load average "
        f"{report['load_average']['start'][0]:.1f} at the start, "
        f"{report['load_average']['end'][0]:.1f} at the end.",
        "",
        summary(report.get("environment"))
        + (
            " Torch threads in lamina's servers: "
            f"{report['environment']['lamina_server_threads']}; llama.cpp threads: "
            f"{report['environment']['threads']}."
            if "lamina_server_threads" in report.get("environment", {})
            else ""
        ),
        "",
        "| backend | conc | req/s | out tok/s | total tok/s | TTFT mean / median / p99 ms "
        "| TPOT mean / median / p99 ms | ITL mean / median / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(s: dict[str, float]) -> str:
        return f"{s['mean']:.0f} / {s['median']:.0f} / {s['p99']:.0f}"

    for backend, res in report["backends"].items():
        if "skipped" in res:
            lines.append(f"| {backend} | skipped: {res['skipped']} | | | | | | |")
            continue
        lines.extend(
            f"| {backend} | {lv['concurrency']} | {lv['request_throughput']:.2f} "
            f"| {lv['output_throughput']:.1f} | {lv['total_token_throughput']:.1f} "
            f"| {fmt(lv['ttft_ms'])} | {fmt(lv['tpot_ms'])} | {fmt(lv['itl_ms'])} |"
            for lv in res["levels"]
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the SmolLM2 GGUF)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--backends",
        nargs="+",
        default=list(BACKENDS),
        choices=BACKENDS,
        help="lamina: bf16 weights dequantized from the GGUF; lamina-gguf: the GGUF's quantized "
        "linears run natively (--quantization gguf)",
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads (lamina serve's default: the cores minus one, kept for its "
        "event loop)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "serve"), help="path prefix of .json / .md")
    args = p.parse_args(argv)

    from lamina.loading.resolve import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    tok = _load_tokenizer(model)
    prompts = make_prompts(tok, args.num_prompts, args.input_len, args.seed)
    from lamina.server.cli import serving_threads

    env = run_environment(threads=args.threads)
    env["lamina_server_threads"] = serving_threads(None)  # what `lamina serve` picks by default
    print(summary(env), flush=True)
    load_start = list(os.getloadavg())  # other work on the machine skews every number
    report: dict[str, Any] = {
        "environment": env,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "config": {**vars(args), "model": str(model)},
        "backends": {},
    }
    for backend in args.backends:
        if backend == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            why = (
                "llama-cpp-python is not installed; `pip install 'llama-cpp-python[server]'` "
                "(compiles llama.cpp, ~12 min on 2 cores) to benchmark it"
            )
            print(f"== llama.cpp: SKIPPED: {why}", flush=True)
            report["backends"][backend] = {"skipped": why}
            continue
        report["backends"][backend] = bench_backend(backend, model, prompts, args, tok)
    report["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
