#!/usr/bin/env bash
# Run the test suite against the real local stack: start S3 + MLflow + Ray on 127.0.0.1,
# run pytest, stop exactly what was started (also on failure or Ctrl-C).
#   bash infra/local/test.sh              # everything (what CI runs)
#   bash infra/local/test.sh -m "not slow" tests/test_data.py   # extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/../.."
. infra/local/env.sh
export PATH="$PWD/.venv/bin:$PATH" STACK_REQUIRED=1
# headless Chromium for the tests that open the MLflow UI as a user does (bench/ui_screenshots.py)
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q chromium >/dev/null || $SUDO sh -c 'apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null'
fi
trap 'bash infra/local/down.sh' EXIT
bash infra/local/up.sh
python -m pytest -p no:cacheprovider --timeout=2400 -q --durations=40 "$@"
