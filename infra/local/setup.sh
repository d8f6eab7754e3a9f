#!/usr/bin/env bash
# Create .venv (if missing) and install the project with every version pinned, in one
# step (constraints.txt): a loose install makes the resolver backtrack for minutes.
# The install is uv's `pip install` (same resolution, same pins): a fresh .venv in about
# 30 s where pip takes over 2 minutes, most of CI's set-up time. Bytecode is compiled at
# install, as pip does: where PYTHONDONTWRITEBYTECODE is set nothing caches it later, and
# every process would compile torch, Ray and MLflow again (tests twice as slow).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check uv==0.13.9
.venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python -c constraints.txt -e ".[test]"
echo "environment ready: .venv ($(.venv/bin/python --version))"
