#!/usr/bin/env bash
# mypy --strict over rankguard.probe, rankguard.server and rankguard.dashboard.
#
# The folders probe/, server/ and dashboard/ import as rankguard.* through the editable
# install's import hook, which mypy cannot follow: run on the folders themselves, every
# `from rankguard.server...` import resolves to nothing (Any) and hides real errors. So mypy
# reads them through a tree of links that has the installed layout (.typecheck/rankguard).
set -euo pipefail
cd "$(dirname "$0")/.."

tree=.typecheck
rm -rf "$tree"
mkdir -p "$tree/rankguard"
: > "$tree/rankguard/__init__.py"
for name in probe server dashboard; do
  ln -s "../../$name" "$tree/rankguard/$name"
done
MYPYPATH="$tree" .venv/bin/mypy --config-file pyproject.toml --cache-dir .mypy_cache -p rankguard
