#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: a virtual environment in .venv with this project installed.
#
# The traps it avoids (docs: README.md, set-up):
# - an unpinned torch requirement makes pip fetch the newest CUDA torch (several GB). Every install below
#   runs with a constraints file that pins the torch chosen first: the one the base Python already has
#   (a user's CUDA build, seen through --system-site-packages), else the CPU build STGC_TORCH names.
# - lmms-eval requires torchvision, whose registry build is CUDA-only and breaks CPU imports; lmms-eval is
#   installed without its dependencies, and pyproject.toml lists the part of them its core imports.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
LMMS_EVAL_VERSION=0.7.3
STAMP_INPUTS=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
STAMP="$VENV/.stgc-setup-$STAMP_INPUTS"
if [ -f "$STAMP" ]; then
  exit 0
fi
start=$(date +%s)

base_torch=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "$base_torch" ]; then
    echo "setup: reusing the base interpreter's torch $base_torch (system site packages)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# pip's notice for each configured package location that does not exist on this machine (one per package
# and location, ~200 lines on a fresh set-up) says nothing about this project: drop it, keep the rest
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ -z "$torch_version" ]; then
  # CPU build. On this project's CPU machines `torch==2.13.0` resolves to a local CPU wheel; elsewhere set
  # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (or install your CUDA torch first).
  pip install -q "torch==${STGC_TORCH:-2.13.0}"
  torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
fi
constraints="$VENV/constraints.txt"
echo "torch==$torch_version" > "$constraints"
echo "setup: torch $torch_version pinned in $constraints"

pip install -q -c "$constraints" -e ".[dev]"
pip install -q -c "$constraints" --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
# A torchvision that cannot load its ops (CUDA build next to CPU torch) breaks transformers and lmms-eval.
if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then :; else
  pip uninstall -q -y torchvision 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, transformers, datasets, lmms_eval, deepspeed, stgc" \
  || { echo "setup: the environment does not import; see the errors above" >&2; exit 1; }
rm -f "$VENV"/.stgc-setup-*
touch "$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s"
