#!/usr/bin/env bash
# Create .venv (if missing) and install the project with every version pinned, in one
# pip step (constraints.txt): a loose install makes pip backtrack for minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
echo "environment ready: .venv ($(.venv/bin/python --version))"
