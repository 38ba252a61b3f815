#!/usr/bin/env bash
# Create .venv and install mmtune into it. With --test, the test dependencies too.
# torch comes first: the CUDA build where an NVIDIA GPU is present, otherwise the CPU wheel
# (a plain `pip install torch` on a CPU-only Linux machine pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${MMTUNE_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=".setup-stamp${extras}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import mmtune, torch" 2>/dev/null; then
  exit 0
fi

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install "torch==${TORCH_VERSION}"
  else
    # CPU-only machine: a local CPU wheel on pip's find-links is taken when present; otherwise the
    # CPU wheel index of the PyTorch project.
    local_wheel=""
    for d in ${PIP_FIND_LINKS:-}; do
      ls "$d"/torch-"${TORCH_VERSION}"+cpu-*.whl >/dev/null 2>&1 && local_wheel=yes
    done
    if [ -n "$local_wheel" ]; then
      "$VPY" -m pip install "torch==${TORCH_VERSION}"
    else
      "$VPY" -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
  fi
fi
"$VPY" -m pip install -e ".${extras}"
echo "$want" > "$stamp"
