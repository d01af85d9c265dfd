#!/usr/bin/env bash
# What a lent CUDA GPU runs, from the repository root, within 8 minutes with compilation. Each part has its own time
# limit, cut to what is left of the 8 minutes (a part with under 10 s left is skipped and said so); what matters most
# runs first, and each report is written the moment it is measured:
# 1. the compiled two-pass step report, bfloat16, a random Qwen2-0.5B-shaped model, L=256, k=12, A=4, P=2 (step time,
#    both prices against transformers' LM step, tokens/s, memory, MFU; CUDA graphs of the sampling loop; inductor's
#    cache is kept in $QSTAR_INDUCTOR_CACHE, default /tmp/qstar-inductor, so a rerun on the same machine starts warm);
# 2. the same step eager; the compiled step's time over the eager one's, printed from the two reports;
# 3. the CUDA test subset (tests/torch/test_cuda.py: logits against transformers, CPU vs GPU, bfloat16 training,
#    two-pass vs one-pass, FlexAttention's backward vs the split attention, the CUDA-graph sampling loop);
# 4. where `nvidia-smi -L` lists 2 or more GPUs: a sharded run (FSDP2, NCCL, 2 processes under torchrun) saves,
#    resumes and reproduces the uninterrupted run bit for bit (benchmarks/sharded_resume.py);
# 5. the kernel counts of a two-pass step (benchmarks/profile_step.py);
# 6. the peak memory of that step with --grad-checkpoint against qstar/core/memory.py's estimate;
# 7. the two-pass step with FlexAttention.
# Results go to $OUT (default: the current directory); a failing part does not stop the others.
set -uo pipefail
out="${OUT:-.}"
export TORCHINDUCTOR_CACHE_DIR="${QSTAR_INDUCTOR_CACHE:-/tmp/qstar-inductor}"
deadline=$((SECONDS + 470))  # 8 minutes less what the checks around the parts take
status=0
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: PyTorch sees no CUDA GPU here: run it on a machine with one" >&2
  exit 1
fi
python3 -c "import torch, transformers; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
rm -f "$out/gpu-compiled.json" "$out/gpu-two-pass.json"  # the ratio below reads this run's reports only
report=(--backend torch --device cuda --dtype bfloat16 --shape Qwen2.5-0.5B --seq-len 256 --thought-tokens 12
  --lookahead 4 --thoughts-per-position 2 --steps 5 --no-generation)
part() {  # part SECONDS NAME COMMAND...: run within SECONDS and the 8 minutes' deadline, note a failure, go on
  local limit=$1 name=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 10)); then
    echo "== $name skipped: the 8 minutes are spent" >&2
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most $limit s)" >&2
  timeout "$limit" "$@" || { echo "== $name failed or ran out of time ($limit s)" >&2; status=1; }
}
part 190 "two-pass, compiled" qstar bench "${report[@]}" --step-mode two-pass --compile --out "$out/gpu-compiled.json"
part 50 "two-pass" qstar bench "${report[@]}" --step-mode two-pass --out "$out/gpu-two-pass.json"
if [[ -f "$out/gpu-compiled.json" && -f "$out/gpu-two-pass.json" ]]; then
  python3 - "$out/gpu-compiled.json" "$out/gpu-two-pass.json" <<'EOF' || status=1
import json, sys
from pathlib import Path
compiled, eager = (json.loads(Path(p).read_text())["training"][0] for p in sys.argv[1:])
print(f"compiled step / eager step: {compiled['qstar_step_s'] / eager['qstar_step_s']:.2f}")
EOF
fi
part 110 "CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/torch/test_cuda.py
if (($(nvidia-smi -L 2>/dev/null | grep -c '^GPU') >= 2)); then
  part 100 "FSDP2 save and resume, 2 GPUs" python3 benchmarks/sharded_resume.py --processes 2 --steps 3
else
  echo "== FSDP2 save and resume skipped: fewer than 2 GPUs" >&2
fi
part 40 "profile" python3 benchmarks/profile_step.py --device cuda --shape Qwen2.5-0.5B --dtype bfloat16 --seq-len 256 \
  --thought-tokens 12 --step-mode two-pass --kind qstar --rows 30 >"$out/gpu-profile.txt" 2>&1
part 50 "memory" qstar bench --memory --measure --backend torch --device cuda --dtype bfloat16 --shape Qwen2.5-0.5B \
  --seq-len 256 --thought-tokens 12 --grad-checkpoint --step-mode two-pass --out "$out/gpu-memory.json"
part 50 "two-pass, flex" qstar bench "${report[@]}" --step-mode two-pass --attention flex --out "$out/gpu-flex.json"
[[ -f "$out/gpu-profile.txt" ]] && grep -E "^== " "$out/gpu-profile.txt"
exit $status
