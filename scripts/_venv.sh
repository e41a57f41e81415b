# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv and
# install the project into it (editable, with test and data extras).
# Re-installs only when setup.py changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))" >&2
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.qtoolkit-installed
WANT="$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "installing qtoolkit and its dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  # setuptools notes every editable install ("Editable installation ... be careful with folders"): information
  # about the mechanism, not about this project, so it is silenced; real warnings still show.
  PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e '.[test,data,plots]'
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES=""
