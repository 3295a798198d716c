# aligntool for GPU machines: CUDA runtime + PyTorch (CUDA build) + aligntool with DeepSpeed and bitsandbytes.
#   docker build -t aligntool .
#   docker run --gpus all -v $PWD/runs:/work/runs aligntool train --recipe dpo
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    ALIGNTOOL_CACHE=/cache/aligntool HF_HOME=/cache/huggingface
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git build-essential \
    && rm -rf /var/lib/apt/lists/* && ln -s /usr/bin/python3 /usr/local/bin/python

# torch first, from the CUDA 12.4 index, so the package install below keeps it
RUN python3 -m pip install --upgrade pip && \
    python3 -m pip install torch --index-url https://download.pytorch.org/whl/cu124

WORKDIR /opt/aligntool
COPY pyproject.toml README.md requirements-lock.txt ./
COPY aligntool ./aligntool
COPY scripts ./scripts
# the tested versions (requirements-lock.txt); drop the -c for the newest ones
RUN python3 -m pip install -c requirements-lock.txt -e ".[deepspeed,bitsandbytes,plots]"

WORKDIR /work
ENTRYPOINT ["aligntool"]
CMD ["--help"]
