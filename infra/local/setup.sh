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
# headless Chromium for the tests that open the MLflow UI as a user does (bench/ui_screenshots.py)
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q chromium >/dev/null || $SUDO sh -c 'apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null'
fi
echo "environment ready: .venv ($(.venv/bin/python --version))"
