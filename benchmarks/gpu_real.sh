#!/usr/bin/env bash
# The real-model study (docs/REAL.md) at the paper's shape on a lent CUDA GPU, within about 8 minutes: SmolLM2-135M
# first, then (given its GGUF) Qwen2.5-Coder-0.5B, each trained with Quiet-STaR on GSM8K's train split (8 thought
# tokens at every position, lookahead 4, 2 thoughts a position, L=256, batch 8, bfloat16; the mixing head and thought
# vectors, the recipe the CPU study found to move the held-out numbers) and measured by benchmarks/real_effect.py on
# the fixed held-out set, with the content control. Every part has its own time limit and writes its results as soon
# as it has them; a failing part does not stop the others.
#   bash benchmarks/gpu_real.sh SMOLLM2_GGUF [QWEN_GGUF]       # results in $OUT (default: runs/gpu-real)
set -uo pipefail
smol=${1:?usage: gpu_real.sh SMOLLM2_GGUF [QWEN_GGUF]}
qwen=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
out="${OUT:-runs/gpu-real}"
data="$here/../../shared/data/gsm8k/train.jsonl"
mkdir -p "$out"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_real.sh: PyTorch sees no CUDA GPU here: run it on a machine with one" >&2
  exit 1
fi
status=0
part() {  # part SECONDS NAME COMMAND...: run with a time limit, note a failure, go on
  local limit=$1 name=$2
  shift 2
  echo "== $name $(date +%T)" >&2
  timeout "$limit" "$@" || { echo "== $name failed or ran out of time ($limit s)" >&2; status=1; }
}
study() {  # study NAME GGUF STEPS SECONDS
  local name=$1 gguf=$2 steps=$3 limit=$4
  part 60 "$name: convert" qstar convert "$gguf" "$out/$name-base" --thought-tokens 8 --lookahead 4
  part "$limit" "$name: train" qstar train --model "$out/$name-base" --data "$data" --text-field question,answer \
    --max-seq-length 256 --batch-size 8 --dtype bfloat16 --train-only mixing_head,thought. --learning-rate 5e-4 \
    --iters "$steps" --warmup-steps 10 --steps-per-eval 25 --val-batches 4 --val-batch-size 8 --save-every 25 \
    --out "$out/$name" --overwrite
  for control in none random; do
    part 60 "$name: held-out ($control)" python3 "$here/real_effect.py" "$out/$name/model" \
      --reference "$out/$name-base" --control "$control" --json "$out/$name-$control.json"
  done
}
study smollm2 "$smol" 100 180
[ -n "$qwen" ] && study qwen2.5-0.5b "$qwen" 50 150
exit $status
