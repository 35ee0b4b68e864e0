#!/usr/bin/env bash
# Launch from the repository root:  bash scripts/gpu_check.sh
# Times bf16 SFT and RepNoise training steps of a random-weight SmolLM2-135M-sized model on one CUDA
# GPU and prints step time, tokens/s, MFU and peak memory (scripts/gpu_check.py; options pass
# through: bash scripts/gpu_check.sh --help). CPU smoke run:
#   bash scripts/gpu_check.sh --device cpu --dtype fp32 --layers 2 --hidden 64 --vocab 256 --seq_len 32 --batch 4 --warmup 1 --steps 1
# Needs torch, transformers and accelerate, no network and no install: immunize is imported from
# src/, on a path that avoids trl, datasets, lm_eval and gguf. PYTHON picks the interpreter
# (default: .venv/bin/python if there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1  # lines show as they come
# Stop at 9 minutes, inside the GPU machine's 10-minute limit, so the lines printed so far come back.
exec timeout 540 "$python" scripts/gpu_check.py "$@"
