#!/usr/bin/env bash
# Set up (with test dependencies) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check lamina tests benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
