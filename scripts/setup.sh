#!/usr/bin/env bash
# Sets up everything rankguard needs on a Debian machine, idempotently:
#   - a virtual environment in .venv with torch (the CPU build unless a torch is already
#     there: 2.13.0 is pinned first so that no install resolves torch to the CUDA build),
#   - rankguard itself, editable, with the [dev] extra,
#   - with --system: Debian's chromium (browser tests), prometheus/promtool (scrape tests)
#     and docker-compose (compose file validation).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${RANKGUARD_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
fi
extra=${RANKGUARD_EXTRA:-dev}
.venv/bin/pip install -q --disable-pip-version-check -e ".[${extra}]"

if [ "${1:-}" = "--system" ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The Debian prometheus package may start a daemon on :9090; the tests start their own.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus 2>/dev/null || true; fi
  pkill -x prometheus 2>/dev/null || true
fi
