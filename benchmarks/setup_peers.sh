#!/usr/bin/env bash
# Builds benchmarks/.venv-peers (git-ignored): the peers the benchmarks run for real
# (trainscope, wandb) beside torch and transformers, and rankguard itself from this tree.
# Nothing of theirs is committed. Used by benchmarks/trainscope_runs.py and
# benchmarks/probe_overhead.py --peers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${RANKGUARD_TORCH_VERSION:-2.13.0}
VENV=benchmarks/.venv-peers
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first, pinned, so that no later install resolves it to a CUDA build
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
"$VENV/bin/pip" install -q --disable-pip-version-check trainscope wandb "transformers>=4.45"
"$VENV/bin/pip" install -q --disable-pip-version-check -e .
# trainscope 1.8.1 has no __version__: ask the installed metadata
"$VENV/bin/python" -c "import trainscope, wandb; from importlib.metadata import version; print('trainscope', version('trainscope'), 'wandb', wandb.__version__)"
