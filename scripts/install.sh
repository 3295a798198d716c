#!/usr/bin/env bash
# Install aligntool without pulling a second PyTorch:
#   - a torch that is already installed (your CUDA build, say) is kept;
#   - on a machine with an NVIDIA GPU, pip's default torch (a CUDA build) is installed;
#   - otherwise the CPU wheel torch==2.13.0 (small and fast; a plain `torch` requirement would pull GBs of CUDA).
# Usage: bash scripts/install.sh [--dev] [--extras deepspeed,bitsandbytes,plots]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dev) extras="${extras:+$extras,}dev"; shift ;;
    --extras) extras="${extras:+$extras,}$2"; shift 2 ;;
    *) echo "install.sh: unknown option $1 (expected --dev or --extras LIST)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA GPU found: installing the default (CUDA) torch"
  "$PY" -m pip install torch
else
  echo "install.sh: no GPU: installing the CPU wheel torch==2.13.0"
  "$PY" -m pip install "torch==2.13.0"
fi

"$PY" -m pip install -e ".${extras:+[$extras]}"
