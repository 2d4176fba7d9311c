# Sourced by the README commands: create or reuse .venv and install relsegcore.
# Usage: source Testing/setup_env.sh [test]
venv="${RELSEG_VENV:-$PWD/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # A CUDA build already present is kept; otherwise take the CPU wheel (2.13.0+cpu where
  # the machine has it on disk), which pyproject's range admits.
  echo "== installing PyTorch"
  python -m pip install -q "torch==2.13.0"
fi
# fast: OpenVINO, the faster CPU engine (relsegcore.engines); the tests check its labels against PyTorch's.
extras="[fast]"
[ "${1:-}" = "test" ] && extras="[test,fast]"
stamp="$venv/.relsegcore-installed$extras"
if [ ! -f "$stamp" ] || [ RelSegCore/pyproject.toml -nt "$stamp" ]; then
  echo "== installing relsegcore$extras"
  python -m pip install -q -e "RelSegCore$extras"
  touch "$stamp"
fi
