#!/usr/bin/env bash
# Plots loss (training and validation), learning rate and throughput over iterations from a run's
# metrics.jsonl into a PNG, with gnuplot.
#   scripts/plot_metrics.sh RUN_DIR [OUT.png]      (default RUN_DIR/metrics.png)
set -euo pipefail
run="${1:?usage: scripts/plot_metrics.sh RUN_DIR [OUT.png]}"
png="${2:-$run/metrics.png}"
metrics="$run/metrics.jsonl"
[[ -r "$metrics" ]] || { echo "plot_metrics.sh: $metrics not found" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# JSON lines -> whitespace-separated columns gnuplot reads.
/usr/bin/python3 - "$metrics" "$tmp/train.tsv" "$tmp/eval.tsv" <<'PY'
import json, sys
src, train, evaluation = sys.argv[1:4]
with open(src) as f, open(train, "w") as t, open(evaluation, "w") as e:
    for line in f:
        r = json.loads(line)
        if "loss" in r:
            t.write(f'{r["iteration"]} {r["loss"]} {r["lr"]} {r["tokens_per_second"]}\n')
        elif "eval_loss" in r:
            e.write(f'{r["iteration"]} {r["eval_loss"]}\n')
PY
[[ -s "$tmp/eval.tsv" ]] || echo "nan nan" > "$tmp/eval.tsv"

gnuplot <<GP
set terminal pngcairo size 1200,900 noenhanced
set output "$png"
set multiplot layout 3,1 title "$run"
set grid
set xlabel "iteration"
set ylabel "loss"
plot "$tmp/train.tsv" using 1:2 with lines title "training", \
     "$tmp/eval.tsv" using 1:2 with linespoints title "validation"
set ylabel "learning rate"
plot "$tmp/train.tsv" using 1:3 with lines notitle
set ylabel "tokens/s"
plot "$tmp/train.tsv" using 1:4 with lines notitle
unset multiplot
GP
echo "$png"
