"""Quality and speed of every weight format lamina offers, on SmolLM2, in one table.

For float32, bfloat16, int8 weight-only, RTN int4, AWQ int4, SmoothQuant W8A8, GGUF Q4_1 run
natively, Wanda 50%, Wanda 2:4 and magnitude 50%: perplexity on held-out text (Hamlet,
calibration on Macbeth), model memory (parameters + buffers), prefill tokens/s (one 512-token
prompt) and single-stream decode tokens/s (128 tokens), each speed the median (min-max) of
--repeats runs. Results: benchmarks/results/quantization.{md,json}; the JSON holds the rows under
"rows" and the run's environment (environment.py) under "environment", whose "row_commits" names
the commit each row was measured at (rows an --only run kept keep theirs).

    python benchmarks/quantization.py [--repeats 3] [--eval-tokens 4096] [--only int8,awq]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from environment import run_environment, summary

from lamina import LLM, SamplingParams
from lamina.eval.corpus import load_corpus
from lamina.eval.perplexity import perplexity
from lamina.prune import prune_model
from lamina.quant import quantize_model
from lamina.quant.calibrate import calib_ids_from_text
from lamina.quant.gguf_native import model_bytes as weight_bytes

RESULTS = Path(__file__).parent / "results"


def model_bytes(llm: LLM) -> int:
    """Weight bytes in memory, packed copies included (lamina.quant.gguf_native.model_bytes)."""
    return weight_bytes(llm.engine.loaded.model)


def speed(llm: LLM, repeats: int) -> tuple[list[float], list[float]]:
    """Prefill tok/s of a 512-token prompt and decode tok/s of 128 greedy tokens."""
    prompt = [(i * 37) % 40000 + 100 for i in range(512)]
    short = prompt[:16]
    prefill, decode = [], []
    llm.generate({"prompt_token_ids": short}, SamplingParams(max_tokens=4), use_tqdm=False)
    for _ in range(repeats):
        t = time.perf_counter()
        llm.engine.prompt_logits(prompt[:-1])
        prefill.append(len(prompt) / (time.perf_counter() - t))
        engine = llm.engine
        engine.add_request(
            "decode", short, SamplingParams(temperature=0, max_tokens=129, ignore_eos=True)
        )
        engine.step()  # the prefill (and first token)
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        decode.append(steps / (time.perf_counter() - t))
    return prefill, decode


def load_rows(data: dict) -> tuple[dict, dict]:
    """The rows of a quantization.json and each row's commit (older files held the rows at the
    top level, without an environment)."""
    if "rows" in data:
        rows, env = data["rows"], data.get("environment") or {}
    else:
        rows = {k: v for k, v in data.items() if k != "environment"}
        env = data.get("environment") or {}
    commits = env.get("row_commits") or {}
    return rows, {name: commits.get(name, env.get("commit")) for name in rows}


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of the rows (re-measured; the other rows of an earlier "
        "results JSON are kept)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    env = run_environment()
    print(summary(env), flush=True)
    eval_text = load_corpus(["hamlet"])
    calib_text = load_corpus(["macbeth"])

    def calib(llm: LLM) -> list[list[int]]:
        return calib_ids_from_text(llm.tokenizer, calib_text, args.calib_tokens, 512)

    def quantized(method: str) -> Callable[[], LLM]:
        def build() -> LLM:
            llm = LLM(dtype="float32", max_model_len=2048)
            ids = calib(llm) if method in ("awq", "smoothquant") else None
            quantize_model(llm.engine.loaded.model, method, ids, progress=False)
            return llm

        return build

    def pruned(method: str, **kw) -> Callable[[], LLM]:
        def build() -> LLM:
            llm = LLM(dtype="float32", max_model_len=2048)
            ids = calib(llm) if method == "wanda" else None
            prune_model(llm.engine.loaded.model, method, ids, progress=False, **kw)
            return llm

        return build

    rows: dict[str, Callable[[], LLM]] = {
        "float32": lambda: LLM(dtype="float32", max_model_len=2048),
        "bfloat16": lambda: LLM(dtype="bfloat16", max_model_len=2048),
        "int8": quantized("int8"),
        "rtn4 (g128)": quantized("rtn4"),
        "awq4 (g128)": quantized("awq"),
        "smoothquant w8a8": quantized("smoothquant"),
        "gguf q4_1 native": lambda: LLM(quantization="gguf", max_model_len=2048),
        "wanda 50%": pruned("wanda", sparsity=0.5),
        "wanda 2:4": pruned("wanda", n_m=(2, 4)),
        "magnitude 50%": pruned("magnitude", sparsity=0.5),
    }
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        rows = {k: v for k, v in rows.items() if any(k.startswith(w) for w in wanted)}
    results: dict = {}
    row_commits: dict = {}
    earlier = RESULTS / "quantization.json"
    if args.only and earlier.exists():  # re-measure some rows, keep the others (in order)
        results, row_commits = load_rows(json.loads(earlier.read_text()))
    for name, build in rows.items():
        try:
            llm = build()
        except (TypeError, ValueError) as e:  # e.g. an option this build of lamina lacks
            print(f"{name:18s} skipped: {e}", flush=True)
            results[name] = {"skipped": str(e)}
            row_commits[name] = env["commit"]
            continue
        ids = llm.tokenizer.encode(eval_text)[5000 : 5000 + args.eval_tokens]
        ppl = perplexity(
            llm, ids, context_length=args.context, stride=args.context, progress=False
        ).ppl
        prefill, decode = speed(llm, args.repeats)
        results[name] = {
            "ppl": ppl,
            "model_mb": model_bytes(llm) / 2**20,
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
        }
        row_commits[name] = env["commit"]
        print(
            f"{name:18s} ppl {ppl:8.2f}  model {results[name]['model_mb']:6.0f} MB  "
            f"prefill {med(prefill)}  decode {med(decode)} tok/s",
            flush=True,
        )
        del llm
    env["row_commits"] = {name: row_commits.get(name) for name in results}
    lines = [
        "# Weight formats on SmolLM2-135M-Instruct",
        "",
        f"Perplexity on {args.eval_tokens} held-out Hamlet tokens ({args.context}-token windows); "
        f"AWQ / SmoothQuant / Wanda calibrated on {args.calib_tokens} Macbeth tokens. Speeds: "
        f"median (min-max) of {args.repeats} runs, {env['cores']}-core CPU, "
        f"{time.strftime('%Y-%m-%d')}. The source weights are the Q4_1 GGUF dequantized.",
        "",
        summary(env)
        + (
            " Some rows come from earlier runs: see row_commits in the JSON."
            if len(set(env["row_commits"].values())) > 1
            else ""
        ),
        "",
        "| format | perplexity | model MB | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {name} | {r['ppl']:.2f} | {r['model_mb']:.0f} | "
                f"{med(r['prefill_tok_s'])} | {med(r['decode_tok_s'])} |"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantization.md").write_text("\n".join(lines) + "\n")
    report = {"environment": env, "rows": results}
    (RESULTS / "quantization.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
