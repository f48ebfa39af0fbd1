#!/usr/bin/env bash
# The search demonstration: 12 trials with median pruning on the demo digits (CPU), against one
# run of the config's defaults for the search's longest trial (4 epochs). The small CNN at 16 px
# (tiny_cnn) keeps a trial to seconds on a shared CPU; set MODEL=simple_cnn SIZE=24 for the demo's own.
#
#   benchmarks/search_demo.sh [OUT]        # default OUT: runs/search-demo (git ignores runs/)
#
# Prints the defaults' best val_acc, the search's table, its best trial and what complete and
# pruned trials cost; the pictures are OUT/search/*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${1:-runs/search-demo}
BASE=(--config configs/demo.toml "model.name=${MODEL:-tiny_cnn}" "data.image_size=${SIZE:-16}")
[ -d datasets/digits ] || "$PY" launch/prepare_demo.py datasets/digits
mkdir -p "$OUT"

start=$(date +%s)
"$PY" launch/train.py "${BASE[@]}" train.epochs=4 run.dir="$OUT/defaults" > "$OUT/defaults.log" 2>&1
echo "defaults (configs/demo.toml ${BASE[*]:2}, 4 epochs): $(grep '^best epoch' "$OUT/defaults.log"), $(( $(date +%s) - start ))s"

start=$(date +%s)
"$PY" launch/search.py "${BASE[@]}" --space benchmarks/search_demo_space.toml --trials 12 \
    --out "$OUT/search" --seed 0
echo "search wall time: $(( $(date +%s) - start ))s"
