"""`lamina quantize`: load a float model, quantize it, write a folder `lamina run --model` loads.

    lamina quantize --method awq --model M --calib text.txt --out DIR \\
        [--group-size 128] [--num-calib-tokens 16384] [--seq-len 512]
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
from lamina.quant.apply import METHODS, validate


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `quantize` sub-command; its handler is `cmd_quantize`."""
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model (int8, rtn4, awq, smoothquant) into a folder lamina loads",
        description="Post-training quantization of the decoder linears. awq and smoothquant "
        "calibrate on --calib text; int8 and rtn4 need no data.",
    )
    add_source_and_output_args(p, METHODS, "awq, smoothquant")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128, 256")
    add_calibration_size_args(p)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run `lamina quantize`; returns the exit status."""
    from rich.console import Console

    from lamina.loading.loader import load_model
    from lamina.loading.resolve import resolve_model
    from lamina.quant.apply import quantize_model
    from lamina.quant.calibrate import calib_ids_from_text
    from lamina.quant.checkpoint import save_quantized

    calibrated = args.method in ("awq", "smoothquant")
    if calibrated and not args.calib:
        raise UsageError(f"--method {args.method} needs --calib FILE (text)")
    with usage_errors():  # every argument is checked before the model loads
        validate(args.method, args.group_size)
        check_min("--num-calib-tokens", args.num_calib_tokens, 1)
        check_min("--seq-len", args.seq_len, 2)
        out = check_out_dir(args.out, args.force, source=args.model)
        text = Path(args.calib).read_text(encoding="utf-8") if calibrated else None
        resolve_model(args.model)
    t0 = time.perf_counter()
    with loading(args.model), Console(stderr=True).status("Loading model…", spinner="dots"):
        loaded = load_model(args.model, "float32")
    calib = None
    if text is not None:
        calib = calib_ids_from_text(
            loaded.require_tokenizer("calibration text"), text, args.num_calib_tokens, args.seq_len
        )
    cfg = quantize_model(
        loaded.model,
        args.method,
        calib,
        group_size=args.group_size,
        alpha=args.alpha,
        clip=not args.no_clip,
        seq_len=args.seq_len,
    )
    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"{cfg.method}: wrote {out} ({size / 1e6:.1f} MB of weights) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
