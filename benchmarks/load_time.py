"""Time from process start to the first generated token, and memory left after loading.

lamina loads the default SmolLM2 GGUF; transformers (the peer) loads the same file with
`gguf_file=` (it dequantizes too). Each run is a fresh process; we report the median and
min-max of several runs. Results, with the run's environment (environment.py; the child
processes start with torch's default thread count, the one recorded):
benchmarks/results/load_time.json.

    python benchmarks/load_time.py [--runs 3] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from environment import run_environment, summary

RESULTS = Path(__file__).parent / "results"

_RSS = """
def rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
"""

LAMINA = (
    _RSS
    + """
import time, json
t0 = time.perf_counter()
import torch
base = rss_mb()
from lamina import LLM, SamplingParams
llm = LLM()
t_load = time.perf_counter() - t0
out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
t_first = time.perf_counter() - t0
from lamina.quant.gguf_native import model_bytes  # packed weights included
weights = model_bytes(llm.engine.loaded.model)
print(json.dumps(dict(load_s=t_load, first_token_s=t_first, rss_mb=rss_mb(),
                      rss_over_torch_mb=rss_mb() - base, weights_mb=weights / 2**20)))
"""
)

TRANSFORMERS = (
    _RSS
    + """
import time, json
t0 = time.perf_counter()
import torch
base = rss_mb()
from transformers import AutoModelForCausalLM, AutoTokenizer
from lamina.loading.resolve import default_model_path
p = default_model_path()
tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
t_load = time.perf_counter() - t0
ids = tok("Hello", return_tensors="pt")
model.generate(**ids, max_new_tokens=1, do_sample=False)
t_first = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(load_s=t_load, first_token_s=t_first, rss_mb=rss_mb(),
                      rss_over_torch_mb=rss_mb() - base, weights_mb=weights / 2**20)))
"""
)


def run(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    peers = {"lamina": LAMINA}
    if not args.skip_transformers:
        peers["transformers"] = TRANSFORMERS
    results: dict = {}
    for name, code in peers.items():
        runs = [run(code) for _ in range(args.runs)]
        results[name] = summarize(runs)
        s = results[name]
        print(
            f"{name:13s} first token {s['first_token_s']['median']:.2f} s "
            f"({s['first_token_s']['min']:.2f}-{s['first_token_s']['max']:.2f}), "
            f"load {s['load_s']['median']:.2f} s, RSS {s['rss_mb']['median']:.0f} MB "
            f"(+{s['rss_over_torch_mb']['median']:.0f} MB over torch; "
            f"weights {s['weights_mb']['median']:.0f} MB)"
        )
    if "transformers" in results:
        ratio = (
            results["transformers"]["first_token_s"]["median"]
            / results["lamina"]["first_token_s"]["median"]
        )
        print(f"lamina reaches its first token {ratio:.1f}x sooner than transformers")
        results["speedup_vs_transformers"] = ratio
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d"),
        "runs": args.runs,
        "machine": f"{platform.machine()}, {platform.processor() or ''}".strip(", "),
        "python": platform.python_version(),
    }
    # after the timed runs: it imports torch, which would warm the page cache for the first one
    results = {"environment": run_environment(), **results}
    print(summary(results["environment"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_time.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
