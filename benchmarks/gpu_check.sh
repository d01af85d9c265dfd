#!/usr/bin/env bash
# What a lent CUDA GPU runs, from the repository root: the CUDA test subset, then the performance issue's GPU report
# (bfloat16, a random Qwen2-0.5B-shaped model, L=256, k=12, A=4, P=2: step time, ratio, tokens/s, memory, MFU).
# Results go to $OUT (default: the current directory).
set -euo pipefail
out="${OUT:-.}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
pytest -q tests/torch/test_cuda.py
qstar bench --backend torch --device cuda --dtype bfloat16 --shape qwen2-0.5b --seq-len 256 --thought-tokens 12 \
  --lookahead 4 --thoughts-per-position 2 --steps 5 --no-generation --out "$out/gpu-bench.json"
