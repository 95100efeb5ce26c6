"""Guided decoding (structured output) on SmolLM2-135M-Instruct: what a JSON-schema constraint
costs in decode throughput, how long schemas take to compile, and how many token masks are
computed ahead (while the model runs) rather than in the sampler.

1. Throughput, at batch 1 (requests one after another) and batch 16 (one batched `generate`):
   chat prompts asking for a JSON description of a person or a product, constrained by a
   realistic schema (bounded strings, a bounded integer, an enum, a short array of strings,
   additionalProperties false, required fields), greedy. To compare like with like each repeat
   first runs the constrained requests, records each one's output length (it ends when its JSON
   is complete), then runs the same prompts unconstrained with max_tokens = that length and
   ignore_eos, so both generate the same tokens' count. Output tok/s = total output tokens /
   wall time (prefill included, the same on both sides). Constrained and unconstrained runs
   alternate; one warm-up pair (which also fills the compile cache) comes first. Reported:
   both tok/s and the ratio constrained / unconstrained, median (min-max) over repeats, plus
   lamina's per-step time outside the model forward. The target: constrained decoding costs
   < 10% throughput at batch 16 (ratio >= 0.90).
2. Compile time: `llm.engine.grammars.matcher(GuidedDecoding(json=schema))` with the backend's
   compile cache cleared (cold) and with it filled (cached: a copy of the compiled matcher), for
   the throughput schemas and a larger one (20 properties, nested objects); median (min-max).
   Also the one-time build of llguidance's tokenizer: the engine's first `grammars.backend()`
   call, then fresh `LLGuidanceBackend(info)` constructions.
3. The fraction of masks computed ahead: `grammars.processor.masks_ahead / (masks_ahead +
   masks_now)` over the measured constrained runs.

Run from benchmarks/ (or the repository root):

    python benchmarks/structured.py [--dtype bfloat16] [--repeats 3] [--model PATH] [--quick]

Results: benchmarks/results/structured.json (environment + every number) and structured.md;
--quick (1 repeat, batch 1 and 4, at most 24 tokens per request, fewer compile repeats) writes
structured_quick.json / structured_quick.md instead. `--ahead on|off` forces or forbids computing
masks while the model runs (default: the engine's rule), `--batches 16` picks batch sizes;
either adds a suffix to the result files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from environment import model_path, run_environment, summary

from lamina import LLM, GuidedDecoding, SamplingParams
from lamina.guided.llguidance_backend import LLGuidanceBackend

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 0.90  # constrained >= 90% of unconstrained throughput at batch 16
TARGET_BATCH = 16

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "occupation": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "status": {"enum": ["active", "retired", "student", "unknown"]},
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "maxItems": 4,
        },
    },
    "required": ["name", "occupation", "city", "age", "status", "skills"],
    "additionalProperties": False,
}

PRODUCT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "brand": {"type": "string", "maxLength": 30},
        "category": {"enum": ["electronics", "kitchen", "clothing", "toys", "garden", "other"]},
        "price_usd": {"type": "integer", "minimum": 1, "maximum": 100000},
        "description": {"type": "string", "maxLength": 80},
        "features": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "maxItems": 4,
        },
        "in_stock": {"type": "boolean"},
    },
    "required": ["name", "brand", "category", "price_usd", "features", "in_stock"],
    "additionalProperties": False,
}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def large_schema() -> dict[str, Any]:
    """A company record: 20 top-level properties, nested objects, an array of objects."""
    text = lambda n: {"type": "string", "maxLength": n}
    address = _object(
        {
            "street": text(60),
            "city": text(40),
            "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["US", "CA", "GB", "DE", "FR", "JP", "other"]},
            "geo": _object(
                {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                }
            ),
        }
    )
    person = _object(
        {
            "name": text(40),
            "role": text(30),
            "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,4}$"},
            "years": {"type": "integer", "minimum": 0, "maximum": 60},
        },
        required=["name", "role"],
    )
    props: dict[str, Any] = {
        "id": {"type": "integer", "minimum": 1, "maximum": 10**9},
        "name": text(60),
        "legal_name": text(80),
        "industry": {"enum": ["software", "retail", "finance", "health", "energy", "other"]},
        "founded": {"type": "integer", "minimum": 1800, "maximum": 2030},
        "public": {"type": "boolean"},
        "ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"},
        "revenue_musd": {"type": "number", "minimum": 0},
        "employees_count": {"type": "integer", "minimum": 0, "maximum": 5000000},
        "headquarters": address,
        "offices": {"type": "array", "items": address, "maxItems": 5},
        "ceo": person,
        "board": {"type": "array", "items": person, "maxItems": 8},
        "website": {"type": "string", "pattern": "^https://[a-z0-9.-]+\\.[a-z]{2,6}/?$"},
        "description": text(200),
        "tags": {"type": "array", "items": text(20), "maxItems": 10},
        "rating": {"enum": [1, 2, 3, 4, 5]},
        "contact": _object(
            {"email": text(60), "phone": {"type": "string", "pattern": "^\\+?[0-9 -]{7,15}$"}},
            required=["email"],
        ),
        "subsidiaries": {
            "type": "array",
            "items": _object({"name": text(40), "share_pct": {"type": "number"}}),
            "maxItems": 10,
        },
        "status": {"enum": ["active", "acquired", "bankrupt", "private"]},
    }
    assert len(props) == 20
    return _object(props, required=["id", "name", "industry", "founded", "headquarters", "ceo"])


SYSTEM = "You are a helpful assistant. You answer with a single JSON object and nothing else."
PEOPLE = [
    "a retired firefighter from Chicago",
    "a marine biologist who studies octopuses",
    "a teenage chess champion",
    "a baker who runs a small shop in Lyon",
    "an astronaut training for a Mars mission",
    "a jazz pianist in New Orleans",
    "a software engineer who builds compilers",
    "a nurse working night shifts in Toronto",
]
PRODUCTS = [
    "a cordless vacuum cleaner",
    "a stainless steel water bottle",
    "a pair of trail running shoes",
    "a wooden toy train set",
    "a smart thermostat",
    "a cast iron frying pan",
    "a folding garden chair",
    "noise-cancelling headphones",
]


def workload() -> list[tuple[list[dict[str, str]], dict[str, Any]]]:
    """16 chat conversations with their schema, people and products interleaved."""
    person_fields = "name, occupation, city, age, status (active, retired, student or unknown)"
    person_fields += " and skills (a list of up to 4 short strings)"
    product_fields = "name, brand, category (electronics, kitchen, clothing, toys, garden or "
    product_fields += "other), price_usd (an integer), description, features (a list of up to 4 "
    product_fields += "short strings) and in_stock (true or false)"
    convs = []
    for who, what in zip(PEOPLE, PRODUCTS):
        for subject, fields, schema in (
            (who, person_fields, PERSON_SCHEMA),
            (what, product_fields, PRODUCT_SCHEMA),
        ):
            user = f"Describe {subject} as a JSON object with the fields {fields}."
            convs.append(
                ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], schema)
            )
    return convs


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def run_batch(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams], batch: int
) -> tuple[dict[str, Any], list[Any]]:
    """Generate `prompts` in groups of `batch` (one `generate` each); the timing and outputs."""
    stats = llm.engine.stats
    steps0, step_s0, fwd_s0 = stats.num_steps, stats.step_seconds, stats.forward_seconds
    outs: list[Any] = []
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += llm.generate(
            [{"prompt_token_ids": p} for p in prompts[i : i + batch]],
            params[i : i + batch],
            use_tqdm=False,
        )
    dt = time.perf_counter() - t
    steps = stats.num_steps - steps0
    overhead = (stats.step_seconds - step_s0) - (stats.forward_seconds - fwd_s0)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "seconds": dt,
        "output_tokens": tokens,
        "output_tok_s": tokens / dt,
        "steps": steps,
        "overhead_ms_per_step": 1e3 * overhead / max(steps, 1),
    }, outs


def check_json(text: str, schema: dict[str, Any]) -> bool:
    """Whether `text` is JSON valid under `schema` (jsonschema when installed, else parses)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - a dev dependency
        return True
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def constrained_pair(
    llm: LLM,
    prompts: list[list[int]],
    schemas: list[dict[str, Any]],
    batch: int,
    max_tokens: int,
) -> dict[str, Any]:
    """A constrained run, then the unconstrained run of the same output lengths."""
    proc = llm.engine.grammars.processor
    ahead0, now0 = proc.masks_ahead, proc.masks_now
    guided = [
        SamplingParams(temperature=0, max_tokens=max_tokens, guided={"json": s}) for s in schemas
    ]
    con, outs = run_batch(llm, prompts, guided, batch)
    con["masks_ahead"] = proc.masks_ahead - ahead0
    con["masks_now"] = proc.masks_now - now0
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    finish = [o.outputs[0].finish_reason for o in outs]
    con["lengths"] = lengths
    con["finished_by_length"] = sum(f == "length" for f in finish)
    con["valid_json"] = sum(
        check_json(o.outputs[0].text, s) for o, s in zip(outs, schemas) if o.outputs[0].text
    )
    con["texts"] = [o.outputs[0].text for o in outs]
    plain = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    unc, outs = run_batch(llm, prompts, plain, batch)
    got = [len(o.outputs[0].token_ids) for o in outs]
    assert got == lengths, (got, lengths)
    return {"constrained": con, "unconstrained": unc}


def throughput(
    llm: LLM,
    convs: list[tuple[list[int], dict[str, Any]]],
    batch: int,
    requests: int,
    repeats: int,
    max_tokens: int,
) -> dict[str, Any]:
    prompts = [p for p, _ in convs[:requests]]
    schemas = [s for _, s in convs[:requests]]
    pairs = [constrained_pair(llm, prompts, schemas, batch, max_tokens) for _ in range(repeats)]
    con = [p["constrained"] for p in pairs]
    unc = [p["unconstrained"] for p in pairs]
    ahead = sum(c["masks_ahead"] for c in con)
    now = sum(c["masks_now"] for c in con)
    return {
        "batch": batch,
        "requests": requests,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": [c["output_tokens"] for c in con],
        "unconstrained_tok_s": spread([u["output_tok_s"] for u in unc]),
        "constrained_tok_s": spread([c["output_tok_s"] for c in con]),
        "ratio": spread([c["output_tok_s"] / u["output_tok_s"] for c, u in zip(con, unc)]),
        "unconstrained_overhead_ms_per_step": statistics.median(
            u["overhead_ms_per_step"] for u in unc
        ),
        "constrained_overhead_ms_per_step": statistics.median(
            c["overhead_ms_per_step"] for c in con
        ),
        "masks_ahead": ahead,
        "masks_now": now,
        "masks_ahead_fraction": ahead / max(ahead + now, 1),
        "finished_by_length": [c["finished_by_length"] for c in con],
        "valid_json": [c["valid_json"] for c in con],
        "sample_output": con[-1]["texts"][0],
        "runs": [
            {k: v for k, v in p[side].items() if k != "texts"}
            for p in pairs
            for side in ("constrained", "unconstrained")
        ],
    }


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compile_times(llm: LLM, schemas: dict[str, dict[str, Any]], cold: int, warm: int) -> dict:
    grammars = llm.engine.grammars
    backend = grammars.backend()
    out = {}
    for name, schema in schemas.items():
        spec = GuidedDecoding(json=schema)
        cold_s = []
        for _ in range(cold):
            backend._compiled.clear()  # type: ignore[attr-defined]
            cold_s.append(timed(lambda spec=spec: grammars.matcher(spec)))
        warm_s = [timed(lambda spec=spec: grammars.matcher(spec)) for _ in range(warm)]
        out[name] = {
            "properties": len(schema.get("properties", {})),
            "schema_chars": len(json.dumps(schema)),
            "cold_ms": spread([1e3 * s for s in cold_s]),
            "cached_ms": spread([1e3 * s for s in warm_s]),
        }
    return out


def tokenizer_build(llm: LLM, repeats: int, first_s: float) -> dict[str, Any]:
    info_s, build_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        info = llm.engine._grammar_tokenizer()
        info_s.append(time.perf_counter() - t)
        build_s.append(timed(lambda info=info: LLGuidanceBackend(info)))
    return {
        "first_backend_call_s": first_s,
        "tokenizer_info_s": spread(info_s),
        "llguidance_backend_s": spread(build_s),
    }


def _table_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['batch']} | {r['requests']} | {r['output_tokens'][-1]} "
        f"| {fmt(r['unconstrained_tok_s'])} | {fmt(r['constrained_tok_s'])} "
        f"| {fmt(r['ratio'], 3)} | {r['unconstrained_overhead_ms_per_step']:.2f} / "
        f"{r['constrained_overhead_ms_per_step']:.2f} "
        f"| {100 * r['masks_ahead_fraction']:.1f}% | {min(r['valid_json'])}/{r['requests']} |"
    )


def write_markdown(res: dict[str, Any], path: Path) -> None:
    lines = [
        "# Guided decoding (JSON schema) on SmolLM2-135M-Instruct",
        "",
        f"{res['dtype']}, greedy; median (min-max) of {res['repeats']} repeat(s); {res['date']}.",
        "",
        summary(res["environment"]),
        "",
        "Decode throughput, output tokens/s (prefill included); each unconstrained run generates "
        "the token counts of the constrained run before it (ignore_eos):",
        "",
        "| batch | requests | output tokens | unconstrained | constrained | ratio "
        "| overhead ms/step (unc. / con.) | masks ahead | valid JSON |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_row(r) for r in res["throughput"].values()]
    lines += ["", res["target"]["text"], "", "Schema compile time, ms:", ""]
    lines += ["| schema | properties | cold | cached |", "|---|---|---|---|"]
    for name, c in res["compile"].items():
        lines.append(
            f"| {name} | {c['properties']} | {fmt(c['cold_ms'], 2)} | {fmt(c['cached_ms'], 3)} |"
        )
    tok = res["tokenizer_build"]
    lines += [
        "",
        f"llguidance tokenizer build: first `grammars.backend()` call "
        f"{1e3 * tok['first_backend_call_s']:.0f} ms; afterwards tokenizer JSON "
        f"{1e3 * tok['tokenizer_info_s']['median']:.0f} ms + `LLGuidanceBackend(info)` "
        f"{1e3 * tok['llguidance_backend_s']['median']:.0f} ms (medians).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct's GGUF")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: writes structured_quick.*")
    ap.add_argument(
        "--ahead",
        choices=("auto", "on", "off"),
        default="auto",
        help="compute next step's masks while the model runs: auto (the engine's rule: only "
        "when a core is free of torch's threads), on, off; on/off results get a suffix",
    )
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16)")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    batches = (1, 4) if args.quick else (1, TARGET_BATCH)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    # batch 1: requests one after another; a cap that a complete JSON stays under
    b1_requests = 2 if args.quick else 4
    max_tokens = 24 if args.quick else 256
    cold_n, warm_n = (2, 5) if args.quick else (5, 50)
    torch.manual_seed(0)
    path = model_path(args.model)
    llm = LLM(
        path,
        dtype=args.dtype,
        max_model_len=1024,
        max_num_seqs=64,
        max_num_batched_tokens=1024,
    )
    results: dict[str, Any] = {
        "environment": run_environment(),
        "model": Path(path).name,
        "dtype": args.dtype,
        "repeats": repeats,
        "quick": args.quick,
        "max_tokens": max_tokens,
        "schemas": {"person": PERSON_SCHEMA, "product": PRODUCT_SCHEMA},
    }
    print(summary(results["environment"]), flush=True)
    if args.ahead != "auto":
        llm.engine.grammars.processor.ahead = args.ahead == "on"
    results["masks_ahead_mode"] = args.ahead
    results["masks_ahead_enabled"] = llm.engine.grammars.processor.ahead

    # the one-time tokenizer build, before any constrained request makes the backend
    first_s = timed(llm.engine.grammars.backend)
    results["tokenizer_build"] = tokenizer_build(llm, 2 if args.quick else 3, first_s)
    tok = results["tokenizer_build"]
    print(
        f"grammar backend: first call {1e3 * first_s:.0f} ms, LLGuidanceBackend(info) "
        f"{fmt({k: 1e3 * v for k, v in tok['llguidance_backend_s'].items()}, 0)} ms",
        flush=True,
    )

    tokenizer = llm.get_tokenizer()
    convs = [
        (tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True), s)
        for c, s in workload()
    ]
    top = max(batches)
    constrained_pair(  # warm-up: model paths, sampler, compile cache
        llm, [p for p, _ in convs[:top]], [s for _, s in convs[:top]], top, 16
    )
    results["throughput"] = {}
    for b in batches:
        r = throughput(llm, convs, b, b1_requests if b == 1 else b, repeats, max_tokens)
        results["throughput"][f"batch_{b}"] = r
        print(
            f"batch {b:2d} ({r['requests']} requests, {r['output_tokens'][-1]} output tokens): "
            f"unconstrained {fmt(r['unconstrained_tok_s'])} tok/s, constrained "
            f"{fmt(r['constrained_tok_s'])} tok/s, ratio {fmt(r['ratio'], 3)}; overhead "
            f"{r['unconstrained_overhead_ms_per_step']:.2f} / "
            f"{r['constrained_overhead_ms_per_step']:.2f} ms/step; masks ahead "
            f"{r['masks_ahead']}/{r['masks_ahead'] + r['masks_now']} "
            f"({100 * r['masks_ahead_fraction']:.1f}%); valid JSON {min(r['valid_json'])}/"
            f"{r['requests']}, cut by max_tokens {max(r['finished_by_length'])}",
            flush=True,
        )
        print(f"  e.g. {r['sample_output']!r}", flush=True)
    key = f"batch_{TARGET_BATCH}"
    if key in results["throughput"]:
        ratio = results["throughput"][key]["ratio"]["median"]
        met = ratio >= TARGET_RATIO
        text = (
            f"Target (constrained >= {TARGET_RATIO:.0%} of unconstrained throughput at batch "
            f"{TARGET_BATCH}): {'met' if met else 'NOT met'} (ratio {ratio:.3f})."
        )
    else:
        met = None
        text = f"Target not checked: this run has no batch {TARGET_BATCH} (--quick)."
    results["target"] = {"ratio": TARGET_RATIO, "batch": TARGET_BATCH, "met": met, "text": text}
    print(text, flush=True)

    schemas = {"person": PERSON_SCHEMA, "product": PRODUCT_SCHEMA, "large": large_schema()}
    results["compile"] = compile_times(llm, schemas, cold_n, warm_n)
    for name, c in results["compile"].items():
        print(
            f"compile {name:8s} ({c['properties']} properties): cold {fmt(c['cold_ms'], 2)} ms, "
            f"cached {fmt(c['cached_ms'], 3)} ms",
            flush=True,
        )
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    RESULTS.mkdir(exist_ok=True)
    stem = "structured_quick" if args.quick else "structured"
    if args.ahead != "auto" or args.batches:
        stem += f"_ahead-{args.ahead}" + (
            f"_b{args.batches.replace(',', '-')}" if args.batches else ""
        )
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps(results, indent=2))
    write_markdown(results, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
