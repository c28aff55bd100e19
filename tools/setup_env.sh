#!/usr/bin/env bash
# Creates .venv with Python 3.10 and installs the pinned environment plus this project (editable).
# Idempotent: does nothing when the requirement files, setup.py and the torch override are unchanged since
# the last run.
#
# Another torch build (older drivers, V100; README "Set-up"):
#   TORCH_SPEC="torch==A torchvision==B"  a matching pair instead of the pins of requirements/base.txt
#   TORCH_INDEX_URL=URL                   the index torch is installed from, e.g. https://download.pytorch.org/whl/cu126
# pip's own PIP_INDEX_URL / PIP_EXTRA_INDEX_URL apply to every install. With any of these four set, the pins of
# torch, torchvision, triton and the nvidia-* / cuda-* runtime packages (torch's own exact requirements) are
# left out of constraints.txt. SETUP_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
DRY_RUN=${SETUP_DRY_RUN:-}

run() {
  if [ -n "$DRY_RUN" ]; then echo "+ $*"; else "$@"; fi
}

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

override=""
if [ -n "$TORCH_SPEC$TORCH_INDEX_URL${PIP_INDEX_URL:-}${PIP_EXTRA_INDEX_URL:-}" ]; then
  override="TORCH_SPEC=$TORCH_SPEC TORCH_INDEX_URL=$TORCH_INDEX_URL PIP_INDEX_URL=${PIP_INDEX_URL:-}"
  override="$override PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-}"
fi
names=$(for req in $TORCH_SPEC; do echo "${req%%[=<>!~;\[]*}"; done | sort -u | tr '\n' ' ')
if [ -n "$TORCH_SPEC" ] && [ "$names" != "torch torchvision " ]; then
  echo "setup: TORCH_SPEC='$TORCH_SPEC' must name torch and torchvision (only), a pair built for each other" >&2
  echo "       (e.g. TORCH_SPEC='torch==2.7.1 torchvision==0.22.1'): a torchvision left to pip would pull in" >&2
  echo "       the newest torch again" >&2
  exit 1
fi

stamp_inputs="requirements/base.txt requirements/detectron2.txt requirements/constraints.txt setup.py"
# The override is part of the stamp (the default stamp is that of the files alone): a change reinstalls.
want=$( { cat $stamp_inputs; if [ -n "$override" ]; then echo "$override"; fi; } | sha256sum | cut -d' ' -f1)
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
  run "$PY" -m venv $venv_flags "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -z "$override" ]; then
  run "${pip[@]}" $reqs -c requirements/constraints.txt
else
  # torch first, on its own (from TORCH_INDEX_URL when given); then the rest without torch's pins.
  pins=$(grep -E '^(torch|torchvision)==' requirements/base.txt | awk '{print $1}' | tr '\n' ' ')
  tmp=$(mktemp -d)
  if [ -z "$DRY_RUN" ]; then trap 'rm -rf "$tmp"' EXIT; fi
  grep -Ev '^(torch|torchvision)[=<>!~ ]' requirements/base.txt > "$tmp/base.txt"
  grep -Eiv '^(torch|torchvision|triton|nvidia-[a-z0-9_.-]+|cuda-[a-z0-9_.-]+)[=<>!~ ]' requirements/constraints.txt \
    > "$tmp/constraints.txt"
  echo "setup: torch override ($override): $tmp/constraints.txt holds the other pins"
  run "${pip[@]}" ${TORCH_SPEC:-$pins} ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  run "${pip[@]}" ${reqs//requirements\/base.txt/$tmp/base.txt} -c "$tmp/constraints.txt"
fi
run "${pip[@]}" --no-deps --no-build-isolation -e .
run "$VENV/bin/python" -c 'import detectron2, torch
print("setup: torch", torch.__version__, "CUDA", torch.version.cuda, "| detectron2", detectron2.__version__)'
if [ -z "$DRY_RUN" ]; then echo "$want" > "$VENV/.setup-stamp"; fi
