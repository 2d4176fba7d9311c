#!/usr/bin/env bash
# The README's first command: install relsegcore (CPU PyTorch unless one is present) into
# .venv and run the main job on the built-in synthetic chest CT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
source Testing/setup_env.sh
relseg segment --demo --out relseg-demo-output "$@"
