"""The error boundary of every `lamina` command.

A command handler raises; `run_command` turns what it raised into one line on stderr,
`lamina CMD: error: MESSAGE`, and an exit status: 2 for a usage error (a bad argument, found
before any work is done), 1 for a failure while working (a corrupt checkpoint, a port already in
use), 130 for Ctrl-C. The traceback is printed only with `--debug` or `LAMINA_DEBUG=1`.

Handlers check their arguments first, inside `usage_errors()`, so a bad flag fails in
milliseconds instead of after the model has loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(SystemExit):
    """A bad argument, found before any work is done: `lamina CMD: error: MESSAGE`, exit 2.

    A SystemExit, so a handler called outside `run_command` (by a test or another program)
    still stops with the message instead of running on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = EXIT_USAGE


@contextmanager
def usage_errors() -> Iterator[None]:
    """Inside this block a ValueError or OSError (a bad value, a missing input file) is the
    caller's mistake: it becomes a UsageError with the same message."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise UsageError(describe(e)) from e


@contextmanager
def loading(model: str | Path | None) -> Iterator[None]:
    """Inside this block (loading a checkpoint) a failure names the model: `cannot load PATH:
    MESSAGE` (a corrupt safetensors header, for one, does not say which file it read)."""
    try:
        yield
    except _expected_types() as e:
        name = model if model is not None else "the default model"
        raise RuntimeError(f"cannot load {name}: {describe(e)}") from e


def _expected_types() -> tuple[type[BaseException], ...]:
    """Failures whose message says what is wrong on its own: shown without a type name."""
    kinds: list[type[BaseException]] = [ValueError, OSError, RuntimeError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(kinds)


def describe(e: BaseException) -> str:
    """One line for an exception: its message (whitespace and line breaks collapsed), with its
    type name in front unless it is a ValueError / OSError / RuntimeError / SafetensorError,
    whose messages say what is wrong on their own (a JSONDecodeError's does not)."""
    text = " ".join(str(e).split())
    expected = isinstance(e, _expected_types()) and not isinstance(e, json.JSONDecodeError)
    if expected and text:
        return text
    name = type(e).__name__
    return f"{name}: {text}" if text else name


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug`: print the traceback of an error (the same as LAMINA_DEBUG=1)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="print the traceback of an error (or set LAMINA_DEBUG=1)",
    )


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """--debug was given, or LAMINA_DEBUG is set to anything but "" / "0"."""
    env = os.environ.get("LAMINA_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no")


def run_command(prog: str, func: Callable[[argparse.Namespace], int], args: Any) -> int:
    """Run one command handler; every failure becomes one line and an exit status."""
    debug = debug_enabled(args)
    try:
        return func(args)
    except UsageError as e:
        return _fail(prog, e.message, EXIT_USAGE, debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (`lamina run ... | head`): nothing left to say to it
        _detach_stdout()
        return EXIT_ERROR
    except Exception as e:
        message = describe(e)
        if not isinstance(e, _expected_types()) and not debug:
            message += " (run with --debug for the traceback)"
        return _fail(prog, message, EXIT_ERROR, debug)


def _fail(prog: str, message: str, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def _detach_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass


# ---- checks shared by the commands --------------------------------------------------------------
def check_out_dir(
    path: str | Path, force: bool, flag: str = "--out", source: str | Path | None = None
) -> Path:
    """The folder a command writes: not an existing file, not the model being read, and, if it
    exists and has files, only with --force (files of the same name are then replaced)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is an existing file; give a folder to write")
    if source is not None and out.exists() and out.resolve() == Path(source).expanduser().resolve():
        raise UsageError(f"{flag} {out} is the model being read; write to another folder")
    if out.is_dir() and not force and any(out.iterdir()):
        raise UsageError(
            f"{flag} {out} is a folder that is not empty; pass --force to write into it "
            "(files of the same name are replaced)"
        )
    return out


def add_force_flag(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"write into {what} even if it is a folder that already has files",
    )


def check_min(flag: str, value: float | None, low: float) -> None:
    """A numeric flag below its minimum is a usage error (None: the flag was not given)."""
    if value is not None and value < low:
        raise UsageError(f"{flag} must be >= {low}, got {value}")
