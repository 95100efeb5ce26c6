"""Offline throughput of lamina's continuous-batching engine beside transformers' batched
`generate`, on the same model, prompts and dtype (in the manner of nano-vllm's bench.py).

Two workloads:
- fixed: B prompts of 32 random tokens, 128 new tokens each (B = 8 and 16): the shapes in which
  transformers' batched generate is at its best (no padding waste);
- random: 64 requests, prompt lengths 32-512 and output lengths 32-256 drawn with a fixed seed,
  ignore_eos. transformers runs them in batches of 16 (left-padded), each batch generating its
  longest output; only the requested tokens are counted for it.

Each configuration is repeated (--repeats) and reported as median (min-max); output tok/s and
total (prompt + output) tok/s, plus lamina's per-step Python overhead (step time outside the
model forward), and the run's environment (environment.py). Results go to
benchmarks/results/throughput_<dtype>[_partial].json.

    python benchmarks/throughput.py [--dtype bfloat16] [--repeats 3] [--skip-hf] [--quick]
        [--batch-invariant]

The lamina engine runs with the default settings (batch invariance "auto": on for SmolLM2).
--batch-invariant runs two engines instead, batch_invariant="off" and "on", their repeats
alternating, and reports the second's throughput as a fraction of the first's (results go to
throughput_<dtype>_batch_invariant.json).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from environment import run_environment, summary

from lamina import LLM, SamplingParams

RESULTS = Path(__file__).parent / "results"


def fixed_workload(batch: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(32)] for _ in range(batch)]
    return prompts, [128] * batch


def random_workload(n: int, vocab: int, seed: int = 0, max_in: int = 512, max_out: int = 256):
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(100, vocab) for _ in range(rng.randint(32, max_in))] for _ in range(n)
    ]
    outs = [rng.randint(32, max_out) for _ in range(n)]
    return prompts, outs


def run_lamina(llm: LLM, prompts, out_lens) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    stats = llm.engine.stats
    steps0, step_s0, fwd_s0 = stats.num_steps, stats.step_seconds, stats.forward_seconds
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t
    assert [len(o.outputs[0].token_ids) for o in outs] == list(out_lens)
    steps = stats.num_steps - steps0
    overhead = (stats.step_seconds - step_s0) - (stats.forward_seconds - fwd_s0)
    return {
        "seconds": dt,
        "output_tokens": sum(out_lens),
        "total_tokens": sum(out_lens) + sum(map(len, prompts)),
        "steps": steps,
        "overhead_ms_per_step": 1e3 * overhead / max(steps, 1),
    }


def run_hf(model, prompts, out_lens, pad_id: int, batch: int) -> dict:
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk, lens = prompts[i : i + batch], out_lens[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):  # left padding, as decoder-only generation needs
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(lens),
                min_new_tokens=max(lens),
                do_sample=False,
                pad_token_id=pad_id,
            )
    dt = time.perf_counter() - t
    return {
        "seconds": dt,
        "output_tokens": sum(out_lens),
        "total_tokens": sum(out_lens) + sum(map(len, prompts)),
    }


def summarize(runs: list[dict]) -> dict:
    out_tps = [r["output_tokens"] / r["seconds"] for r in runs]
    tot_tps = [r["total_tokens"] / r["seconds"] for r in runs]
    res = {
        "output_tok_s": {
            "median": statistics.median(out_tps),
            "min": min(out_tps),
            "max": max(out_tps),
        },
        "total_tok_s": {
            "median": statistics.median(tot_tps),
            "min": min(tot_tps),
            "max": max(tot_tps),
        },
    }
    if "overhead_ms_per_step" in runs[0]:
        res["overhead_ms_per_step"] = statistics.median(r["overhead_ms_per_step"] for r in runs)
        res["steps"] = runs[0]["steps"]
    return res


def fmt(s: dict) -> str:
    o = s["output_tok_s"]
    return f"{o['median']:.1f} ({o['min']:.1f}-{o['max']:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small random workload (CI smoke)")
    ap.add_argument(
        "--workloads",
        default="fixed_b8,fixed_b16,random_64",
        help="comma-separated subset of fixed_b1 (one stream; not in the default set), "
        "fixed_b8, fixed_b16, random_64",
    )
    ap.add_argument(
        "--batch-invariant",
        action="store_true",
        help='measure batch_invariant="on" against "off", alternating',
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    settings = {"max_model_len": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 1024}
    baseline = "off" if args.batch_invariant else "auto"
    llm = LLM(args.model, dtype=args.dtype, batch_invariant=baseline, **settings)
    invariant = (
        LLM(args.model, dtype=args.dtype, batch_invariant="on", **settings)
        if args.batch_invariant
        else None
    )
    vocab = llm.engine.model_config.vocab_size
    workloads = {f"fixed_b{b}": fixed_workload(b, vocab) for b in (1, 8, 16)}
    workloads["random_64"] = (
        random_workload(8, vocab, max_in=64, max_out=32)
        if args.quick
        else random_workload(64, vocab)
    )
    keep = set(args.workloads.split(","))
    workloads = {k: v for k, v in workloads.items() if k in keep}
    hf = None
    if not args.skip_hf:
        import tempfile

        import transformers

        from lamina.loading.convert import convert_gguf_to_hf
        from lamina.loading.resolve import resolve_model

        path = resolve_model(args.model)
        dtype = llm.engine.loaded.model.dtype
        if path.is_file():
            # transformers 5 keeps a GGUF's weights packed and runs its own kernels; the
            # same-dtype comparison wants plain dense weights, so convert to a folder first.
            path = convert_gguf_to_hf(
                path, tempfile.mkdtemp(prefix="lamina-hf-"), str(dtype).removeprefix("torch.")
            )
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    results: dict = {
        "environment": run_environment(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "workloads": {},
    }
    print(summary(results["environment"]), flush=True)
    for engine in (llm, invariant):
        if engine is not None:
            run_lamina(engine, *fixed_workload(4, vocab, seed=99))  # warm-up
    for name, (prompts, outs) in workloads.items():
        if invariant is None:
            entry = {
                "lamina": summarize([run_lamina(llm, prompts, outs) for _ in range(args.repeats)])
            }
        else:  # alternate, so drift on a shared machine hits both alike
            pairs = [
                (run_lamina(llm, prompts, outs), run_lamina(invariant, prompts, outs))
                for _ in range(args.repeats)
            ]
            entry = {
                "lamina": summarize([a for a, _ in pairs]),
                "lamina_batch_invariant": summarize([b for _, b in pairs]),
            }
            fractions = [
                (b["output_tokens"] / b["seconds"]) / (a["output_tokens"] / a["seconds"])
                for a, b in pairs
            ]
            entry["batch_invariant_fraction"] = {
                "median": statistics.median(fractions),
                "min": min(fractions),
                "max": max(fractions),
            }
        line = f"{name:10s} lamina {fmt(entry['lamina'])} out tok/s"
        line += f", overhead {entry['lamina']['overhead_ms_per_step']:.2f} ms/step"
        if invariant is not None:
            frac = entry["batch_invariant_fraction"]
            line += (
                f" | batch-invariant {fmt(entry['lamina_batch_invariant'])} = "
                f"{frac['median']:.2f}x ({frac['min']:.2f}-{frac['max']:.2f})"
            )
        if hf is not None:
            batch = len(prompts) if name.startswith("fixed") else 16
            entry["transformers"] = summarize(
                [run_hf(hf, prompts, outs, 0, batch) for _ in range(args.repeats)]
            )
            ratio = (
                entry["lamina"]["output_tok_s"]["median"]
                / entry["transformers"]["output_tok_s"]["median"]
            )
            entry["ratio_vs_transformers"] = ratio
            line += f" | transformers {fmt(entry['transformers'])} | ratio {ratio:.2f}x"
        print(line, flush=True)
        results["workloads"][name] = entry
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    RESULTS.mkdir(exist_ok=True)
    if not args.quick:
        suffix = "" if keep == {"fixed_b8", "fixed_b16", "random_64"} else "_partial"
        if invariant is not None:
            suffix = "_batch_invariant" + suffix
        out = RESULTS / f"throughput_{args.dtype}{suffix}.json"
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
