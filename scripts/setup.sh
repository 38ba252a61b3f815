#!/usr/bin/env bash
# Create .venv and install mmtune into it. With --test, the test dependencies too.
# torch comes first, from the indexes pip is configured with (see the README for a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${MMTUNE_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
extras="[all]"
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
  # pip's own configuration decides where torch comes from (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
  # PIP_FIND_LINKS, pip.conf). MMTUNE_TORCH_INDEX names one more index just for torch, e.g. the
  # PyTorch project's CPU wheel index on a CPU-only machine whose configured indexes offer only the
  # multi-GB CUDA build.
  if [ -n "${MMTUNE_TORCH_INDEX:-}" ]; then
    "$VPY" -m pip install "torch==${TORCH_VERSION}" --extra-index-url "${MMTUNE_TORCH_INDEX}"
  else
    "$VPY" -m pip install "torch==${TORCH_VERSION}"
  fi
fi
"$VPY" -m pip install -e ".${extras}"
echo "$want" > "$stamp"
