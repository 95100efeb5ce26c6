"""`lamina serve` bounds oneDNN's and ideep's GEMM primitive caches before the model loads:
with their default 1024 entries, the row counts of a server's steps grew its RSS by ~1 GB over
hours (the 30-minute soak, benchmarks/results/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lamina.server import cli
from lamina.server.cli import GEMM_PRIMITIVE_CACHE_CAPACITY, bound_gemm_primitive_caches

VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def test_sets_both_unless_the_environment_does(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_gemm_primitive_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(GEMM_PRIMITIVE_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def test_serve_bounds_them_before_loading_the_model(monkeypatch, smollm2_path):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    seen: dict[str, str | None] = {}

    class LoadedError(Exception):
        pass

    class FakeLLM:
        def __init__(self, config: object) -> None:
            seen.update({name: os.environ.get(name) for name in VARS})
            raise LoadedError

    monkeypatch.setattr("lamina.llm.LLM", FakeLLM)
    parser = cli.argparse.ArgumentParser()
    cli.add_serve_args(parser)
    args = parser.parse_args(["--model", str(smollm2_path), "--port", "0"])
    with pytest.raises(LoadedError):
        cli.cmd_serve(args)
    assert seen == {name: str(GEMM_PRIMITIVE_CACHE_CAPACITY) for name in VARS}


PROBE = textwrap.dedent(
    """
    import os, sys
    os.environ.update({v: sys.argv[1] for v in sys.argv[2:]})
    import torch
    from lamina.layers.linear import can_pack, pack_weight, packed_linear
    torch.set_num_threads(1)
    dtype = torch.bfloat16
    w = torch.randn(3072, 576, dtype=dtype)
    if not can_pack(w):
        print("skip"); sys.exit(0)
    packed = pack_weight(w)
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    packed_linear(torch.randn(1, 576, dtype=dtype), packed)
    before = rss()
    for m in range(2, 402):
        packed_linear(torch.randn(m, 576, dtype=dtype), packed)
    print((rss() - before) / 2**20)
    """
)


def _growth_mb(capacity: int) -> float | None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(capacity), *VARS],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout.split()[-1]
    return None if out == "skip" else float(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_variables_bound_the_memory_of_new_row_counts():
    """The variables' names are the libraries' (a torch upgrade could change them): 400 new
    row counts on one packed weight hold ~250 MB with the default caches, ~10 MB with 8 entries."""
    bounded = _growth_mb(8)
    if bounded is None:
        pytest.skip("no oneDNN-packed bfloat16 GEMM in this torch build")
    unbounded = _growth_mb(1024)
    assert unbounded is not None
    assert bounded < 100 < unbounded, (bounded, unbounded)
