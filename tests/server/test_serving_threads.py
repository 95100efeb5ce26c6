"""`lamina serve` leaves a core to the HTTP event loop unless told otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from lamina.server.cli import serving_threads


def test_explicit_number_wins():
    assert serving_threads(3) == 3
    with pytest.raises(SystemExit, match="--torch-threads must be >= 1"):
        serving_threads(0)


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert serving_threads(None) == torch.get_num_threads()


def test_default_keeps_one_core_for_the_event_loop(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert serving_threads(None) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert serving_threads(None) == 1
