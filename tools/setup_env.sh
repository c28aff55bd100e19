#!/usr/bin/env bash
# Creates .venv with Python 3.10 and installs the pinned environment plus this project (editable).
# Idempotent: does nothing when the requirement files and setup.py are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python() {
  local cand
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return 0; fi
  # A plain python3.10 first (machines without pyenv), then pyenv's installs.
  if command -v python3.10 >/dev/null 2>&1 && python3.10 -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
    command -v python3.10; return 0
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/3.10*/bin/python3.10; do
      if [ -x "$cand" ]; then echo "$cand"; return 0; fi
    done
  fi
  for cand in /usr/bin/python3.10 /usr/local/bin/python3.10; do
    if [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}

stamp_inputs="requirements/base.txt requirements/detectron2.txt requirements/constraints.txt setup.py"
want=$(cat $stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

if ! PY=$(find_python); then
  echo "setup: no Python 3.10 found. selftrain-d2 needs CPython 3.10 (the Detectron2 wheel is cp310 only)." >&2
  echo "       Install one (e.g. 'pyenv install 3.10.13' or 'apt-get install python3.10 python3.10-venv')," >&2
  echo "       or point PYTHON=/path/to/python3.10 at it, then run 'make setup' again." >&2
  exit 1
fi
echo "setup: using $PY ($("$PY" --version 2>&1))"

venv_flags=""
reqs="-r requirements/base.txt"
if "$PY" -c 'import detectron2' >/dev/null 2>&1; then
  echo "setup: $PY already imports Detectron2 ($("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')); using it instead of sal-detectron2"
  venv_flags="--system-site-packages"
else
  reqs="$reqs -r requirements/detectron2.txt"
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv $venv_flags "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $reqs -c requirements/constraints.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c 'import detectron2, torch; print("setup: torch", torch.__version__, "| detectron2", detectron2.__version__)'
echo "$want" > "$VENV/.setup-stamp"
