#!/usr/bin/env bash
# What a lent CUDA GPU runs, from the repository root, in under 8 minutes with compilation (each part has its own
# time limit; what matters most runs first, and each report is written the moment it is measured):
# 1. the compiled two-pass step report, bfloat16, a random Qwen2-0.5B-shaped model, L=256, k=12, A=4, P=2 (step time,
#    both prices against transformers' LM step, tokens/s, memory, MFU; CUDA graphs of the sampling loop; inductor's
#    cache is kept in $QSTAR_INDUCTOR_CACHE, default /tmp/qstar-inductor, so a rerun on the same machine starts warm);
# 2. the same step eager, and with FlexAttention;
# 3. the CUDA test subset (tests/torch/test_cuda.py: logits against transformers, CPU vs GPU, bfloat16 training,
#    two-pass vs one-pass, FlexAttention's backward vs the split attention, the CUDA-graph sampling loop);
# 4. the kernel counts of a two-pass step (benchmarks/profile_step.py);
# 5. the peak memory of that step with --grad-checkpoint against qstar/core/memory.py's estimate.
# Results go to $OUT (default: the current directory); a failing part does not stop the others.
set -uo pipefail
out="${OUT:-.}"
export TORCHINDUCTOR_CACHE_DIR="${QSTAR_INDUCTOR_CACHE:-/tmp/qstar-inductor}"
status=0
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: PyTorch sees no CUDA GPU here: run it on a machine with one" >&2
  exit 1
fi
python3 -c "import torch, transformers; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
report=(--backend torch --device cuda --dtype bfloat16 --shape Qwen2.5-0.5B --seq-len 256 --thought-tokens 12
  --lookahead 4 --thoughts-per-position 2 --steps 5 --no-generation)
part() {  # part SECONDS NAME COMMAND...: run with a time limit, note a failure, go on
  local limit=$1 name=$2
  shift 2
  echo "== $name" >&2
  timeout "$limit" "$@" || { echo "== $name failed or ran out of time ($limit s)" >&2; status=1; }
}
part 150 "two-pass, compiled" qstar bench "${report[@]}" --step-mode two-pass --compile --out "$out/gpu-compiled.json"
part 60 "two-pass" qstar bench "${report[@]}" --step-mode two-pass --out "$out/gpu-two-pass.json"
part 60 "two-pass, flex" qstar bench "${report[@]}" --step-mode two-pass --attention flex --out "$out/gpu-flex.json"
part 100 "CUDA tests" python3 -m pytest -q tests/torch/test_cuda.py
part 40 "profile" python3 benchmarks/profile_step.py --device cuda --shape Qwen2.5-0.5B --dtype bfloat16 --seq-len 256 \
  --thought-tokens 12 --step-mode two-pass --kind qstar --rows 30 >"$out/gpu-profile.txt" 2>&1
part 60 "memory" qstar bench --memory --measure --backend torch --device cuda --dtype bfloat16 --shape Qwen2.5-0.5B \
  --seq-len 256 --thought-tokens 12 --grad-checkpoint --step-mode two-pass --out "$out/gpu-memory.json"
grep -E "^== " "$out/gpu-profile.txt"
exit $status
