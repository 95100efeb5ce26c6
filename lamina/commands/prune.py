"""`lamina prune`: load a float model, prune it (Wanda or magnitude), write a folder that
lamina and transformers load.

    lamina prune --method wanda --model M --calib text.txt --out DIR \\
        [--sparsity 0.5 | --n-m 2:4] [--num-calib-tokens 16384] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lamina.commands.boundary import (
    UsageError,
    check_min,
    check_out_dir,
    loading,
    usage_errors,
)
from lamina.commands.model_edit import add_calibration_size_args, add_source_and_output_args
from lamina.prune.checkpoint import save_pruned
from lamina.prune.magnitude import parse_n_m, sparsity_of
from lamina.prune.wanda import METHODS


def _n_m(text: str) -> tuple[int, int]:
    try:
        return parse_n_m(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_prune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `prune` sub-command; its handler is `cmd_prune`."""
    p = subparsers.add_parser(
        "prune",
        help="prune a model (wanda, magnitude) into a Hugging Face folder lamina loads",
        description="Unstructured or N:M pruning of the decoder linears. wanda scores weights "
        "by |W| x input norm on --calib text; magnitude by |W| alone.",
    )
    add_source_and_output_args(p, METHODS, "wanda")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--sparsity", type=float, default=0.5, help="fraction of weights pruned (unstructured)"
    )
    kind.add_argument("--n-m", type=_n_m, default=None, help="semi-structured N:M, e.g. 2:4")
    p.add_argument(
        "--group",
        choices=("row", "layer"),
        default=None,
        help="comparison group for unstructured pruning (default: row for wanda, layer for "
        "magnitude)",
    )
    add_calibration_size_args(p)
    p.add_argument(
        "--dense-calibration",
        action="store_true",
        help="wanda: statistics of the dense model in one pass (default: layer by layer through "
        "the already-pruned layers, as the paper)",
    )
    p.add_argument(
        "--dtype", default="float32", help="float32 (default), bfloat16, float16: compute and save"
    )
    p.set_defaults(func=cmd_prune)
    return p


def cmd_prune(args: argparse.Namespace) -> int:
    """Run `lamina prune`; returns the exit status."""
    from rich.console import Console

    from lamina.config import parse_dtype
    from lamina.loading.loader import load_model
    from lamina.loading.resolve import resolve_model
    from lamina.prune.wanda import prune_model
    from lamina.quant.calibrate import calib_ids_from_text

    if args.method == "wanda" and not args.calib:
        raise UsageError("--method wanda needs --calib FILE (text)")
    with usage_errors():  # every argument is checked before the model loads
        if args.n_m is None and not 0.0 <= args.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
        check_min("--num-calib-tokens", args.num_calib_tokens, 1)
        check_min("--seq-len", args.seq_len, 2)
        parse_dtype(args.dtype)
        out = check_out_dir(args.out, args.force, source=args.model)
        text = Path(args.calib).read_text(encoding="utf-8") if args.method == "wanda" else None
        resolve_model(args.model)
    t0 = time.perf_counter()
    console = Console(stderr=True)
    with loading(args.model), console.status("Loading model…", spinner="dots"):
        loaded = load_model(args.model, args.dtype)
    calib = None
    if text is not None:
        calib = calib_ids_from_text(
            loaded.require_tokenizer("calibration text"), text, args.num_calib_tokens, args.seq_len
        )
    cfg = prune_model(
        loaded.model,
        args.method,
        calib,
        sparsity=args.sparsity,
        n_m=args.n_m,
        group=args.group,
        sequential=not args.dense_calibration,
        seq_len=args.seq_len,
    )
    with console.status("Saving…", spinner="dots"):
        out = save_pruned(
            loaded.model, loaded.config, loaded.tokenizer, out, loaded.generation_config
        )
    kind = f"{cfg.n_m} semi-structured" if cfg.n_m else f"{cfg.sparsity:.0%} unstructured"
    print(
        f"{cfg.method} {kind}: {sparsity_of(loaded.model):.1%} of decoder-linear weights are "
        f"zero; wrote {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0
