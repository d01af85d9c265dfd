#!/usr/bin/env bash
# What a lent CUDA GPU runs, from the repository root (about 4 minutes on an H100 machine): the CUDA test subset, the
# performance issue's GPU report (bfloat16, a random Qwen2-0.5B-shaped model, L=256, k=12, A=4, P=2: step time,
# ratio, tokens/s, memory, MFU) and a profile of where a step's time goes. `gpu_check.sh --compile` measures the
# report with the thought steps compiled instead (its first step compiles for more than 3 minutes).
# Results go to $OUT (default: the current directory); a failing part does not stop the others.
set -uo pipefail
out="${OUT:-.}"
status=0
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1
report=(--backend torch --device cuda --dtype bfloat16 --shape qwen2-0.5b --seq-len 256 --thought-tokens 12
  --lookahead 4 --thoughts-per-position 2 --steps 5 --no-generation)
if [[ "${1:-}" == "--compile" ]]; then
  qstar bench "${report[@]}" --compile --out "$out/gpu-bench-compiled.json"
  exit
fi
python3 -m pytest -q tests/torch/test_cuda.py || status=1
qstar bench "${report[@]}" --out "$out/gpu-bench.json" || status=1
python3 benchmarks/profile_step.py --device cuda --shape qwen2-0.5b --dtype bfloat16 --seq-len 256 \
  --thought-tokens 12 --rows 30 >"$out/gpu-profile.txt" 2>&1 || status=1
grep -E "^== " "$out/gpu-profile.txt"
exit $status
