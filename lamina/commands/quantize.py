"""`lamina quantize`: load a float model, quantize it, write a folder `lamina run --model` loads.

    lamina quantize --method awq --model M --calib text.txt --out DIR \\
        [--group-size 128] [--num-calib-tokens 16384] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lamina.quant.apply import METHODS


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `quantize` sub-command; its handler is `cmd_quantize`."""
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model (int8, rtn4, awq, smoothquant) into a folder lamina loads",
        description="Post-training quantization of the decoder linears. awq and smoothquant "
        "calibrate on --calib text; int8 and rtn4 need no data.",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument(
        "--model", "-m", default=None, help="float HF folder or .gguf (default: SmolLM2 GGUF)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--calib", default=None, help="UTF-8 text file for calibration (awq, smoothquant)"
    )
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128, 256")
    p.add_argument(
        "--num-calib-tokens", type=int, default=16384, help="calibration tokens read from --calib"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run `lamina quantize`; returns the exit status."""
    from lamina.loading.loader import load_model
    from lamina.quant.apply import quantize_model
    from lamina.quant.calibrate import calib_ids_from_text
    from lamina.quant.checkpoint import save_quantized

    if args.method in ("awq", "smoothquant") and not args.calib:
        raise SystemExit(f"lamina quantize: --method {args.method} needs --calib FILE (text)")
    t0 = time.perf_counter()
    loaded = load_model(args.model, "float32")
    calib = None
    if args.calib and args.method in ("awq", "smoothquant"):
        text = Path(args.calib).read_text(encoding="utf-8")
        calib = calib_ids_from_text(loaded.tokenizer, text, args.num_calib_tokens, args.seq_len)
    cfg = quantize_model(
        loaded.model,
        args.method,
        calib,
        group_size=args.group_size,
        alpha=args.alpha,
        clip=not args.no_clip,
        seq_len=args.seq_len,
    )
    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, args.out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"{cfg.method}: wrote {out} ({size / 1e6:.1f} MB of weights) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
