#!/usr/bin/env bash
# Set up (with test dependencies) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check lamina tests benchmarks
.venv/bin/ruff format --check lamina tests benchmarks
.venv/bin/mypy  # lamina/, core packages strict (pyproject.toml [tool.mypy])
# Tests check correctness, not speed (speed lives in benchmarks/): one torch thread keeps them
# immune to oversubscription by the server tests' own threads and subprocesses (4 min here).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
