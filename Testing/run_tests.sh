#!/usr/bin/env bash
# The README's test command: create or reuse .venv, install relsegcore with its test
# extras, then run ruff and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
source Testing/setup_env.sh test
echo "== ruff"
ruff check .
echo "== pytest"
cd Testing
set +e
QT_QPA_PLATFORM=offscreen python -m pytest "$@"
status=$?
set -e
# 5 = no tests collected: treat as a failure, CI must run tests.
exit $status
