"""Flags shared by the commands that rewrite a model into a new folder (quantize, prune)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lamina.commands.boundary import add_force_flag


def add_source_and_output_args(
    p: argparse.ArgumentParser, methods: Sequence[str], calib_for: str
) -> None:
    """--method, --model, --out (with --force) and --calib (used by the `calib_for` methods)."""
    p.add_argument("--method", required=True, choices=methods)
    p.add_argument(
        "--model", "-m", default=None, help="float HF folder or .gguf (default: SmolLM2 GGUF)"
    )
    p.add_argument("--out", required=True, help="output folder")
    add_force_flag(p)
    p.add_argument("--calib", default=None, help=f"UTF-8 text file for calibration ({calib_for})")


def add_calibration_size_args(p: argparse.ArgumentParser) -> None:
    """How much of --calib is read, and in what lengths."""
    p.add_argument(
        "--num-calib-tokens", type=int, default=16384, help="calibration tokens read from --calib"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
