#!/bin/bash
# docs/TOY.md's two pictures from a default run's directory (runs/qstar, or seed0 of toy_effect_runs.sh): its curves
# (plot_run.py) and a screenshot of `qstar inspect`'s page on the held-out documents (headless Chromium).
#   bash benchmarks/toy_pictures.sh RUN_DIR
set -euo pipefail
run=${1:?usage: toy_pictures.sh RUN_DIR}
here=$(cd "$(dirname "$0")" && pwd)
docs="$here/../docs"
page=$(mktemp -d)/inspect.html
python "$here/plot_run.py" "$run" "$docs/default-run.svg"
qstar inspect --model "$run/model" --text "$docs/toy-heldout.txt" --out "$page"
chromium --headless --no-sandbox --hide-scrollbars --window-size=1000,760 --screenshot="$docs/toy-inspect.png" \
  "file://$page" 2>/dev/null
