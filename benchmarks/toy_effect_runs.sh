#!/bin/bash
# Every run behind docs/TOY.md's tables: the default `qstar train` (3 seeds), its ablations and the toy recipe's
# deviations from the default preset (each set back), each measured by benchmarks/toy_effect.py on the fixed
# held-out set. One thread on one core (OMP_NUM_THREADS=1; prefix with `taskset -c N` to pin it).
#   bash benchmarks/toy_effect_runs.sh OUT_DIR [NAME ...]     # no NAME: all of them, about 35 minutes
# Writes OUT_DIR/NAME/ (the run), OUT_DIR/NAME.wall (seconds of `qstar train`), OUT_DIR/NAME.log, .txt and .json.
set -euo pipefail
out=${1:?usage: toy_effect_runs.sh OUT_DIR [NAME ...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A FLAGS=(
  [seed0]=""
  [seed1]="--seed 1"
  [seed2]="--seed 2"
  [policy0]="--policy-weight 0"
  [mixing_only]="--train-only mixing_head"
  [mlx]="--backend mlx --iters 100 --warmup-steps 5"
  [scale100]="--embedding-scale 100"
  [init_dashes]="--init-token=---"
  [lookahead4]="--lookahead 4"
  [thought8]="--thought-tokens 8"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(before seed0 seed1 seed2 policy0 mixing_only mlx scale100 init_dashes lookahead4 thought8)
mkdir -p "$out"
for name in "${names[@]}"; do
  if [ "$name" = before ]; then  # the shipped model before any Quiet-STaR training (its mixing head outputs 0)
    python benchmarks/toy_effect.py weights/arith-llama --recipe toy --json "$out/before.json" > "$out/before.txt"
    echo "before: $(sed -n 3p "$out/before.txt")"
    continue
  fi
  flags=${FLAGS[$name]}
  [[ $flags == *"--backend"* ]] || flags="--backend torch $flags"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  qstar train --out "$out/$name" --overwrite $flags > "$out/$name.log" 2>&1
  python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)" > "$out/$name.wall"
  # measured with the torch backend whichever backend trained (the checkpoint format and the math are the same)
  python benchmarks/toy_effect.py "$out/$name/model" --json "$out/$name.json" > "$out/$name.txt"
  echo "$name ($flags): $(cat "$out/$name.wall") s"; sed -n 3p "$out/$name.txt"
done
