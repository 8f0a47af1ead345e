#!/usr/bin/env bash
# benchmarks/scaling/run_scaling.py on a tiny model with 1 and 2 ranks: one CSV row per mode and
# layout; the data-parallel runs measured, with tokens/s recomputed here from their metrics.jsonl;
# a layout fastllm refuses recorded with fastllm's message instead of a number; the summary and,
# where gnuplot is installed, the PNG written. Times are never judged.
#   tests/jobs/test_scaling_driver.sh FASTLLM_BINARY MPIEXEC [PYTHON]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
fastllm=${1:?usage: test_scaling_driver.sh FASTLLM_BINARY MPIEXEC [PYTHON]}
mpiexec=${2:?usage: test_scaling_driver.sh FASTLLM_BINARY MPIEXEC [PYTHON]}
python=${3:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! "$python" "$root/benchmarks/scaling/run_scaling.py" --fastllm "$fastllm" --out "$work" \
  --mpiexec "$mpiexec" --ranks 1 2 --iters 3 --skip 1 --threads 1 --layers 2 --hidden 32 \
  --heads 4 --head_groups 2 --ffn 64 --vocab 128 --window 8 --sequence 16 --strong_batch 4 \
  --weak_batch_per_rank 2 >"$work/driver.log" 2>&1; then
  echo "FAIL the driver failed:"
  cat "$work/driver.log"
  exit 1
fi

# Checked with Python's csv module and the runs' own metrics.jsonl, not with the driver's code.
"$python" - "$work" <<'EOF'
import csv, json, os, shutil, statistics, sys

out = sys.argv[1]
failures = []
def check(name, condition):
    print(("ok   " if condition else "FAIL ") + name)
    if not condition:
        failures.append(name)

rows = list(csv.DictReader(open(os.path.join(out, "scaling.csv"))))
keys = {(r["scaling"], r["ranks"], r["layout"]) for r in rows}
expected = {(m, n, l) for m in ("strong", "weak")
            for n, l in (("1", "1 rank"), ("2", "DP2"), ("2", "TP2"), ("2", "PP2"))}
check(f"one row per mode and layout: {sorted(keys)}", keys == expected and len(rows) == 8)
for r in rows:
    name = f"{r['scaling']} {r['layout']}"
    tp, pp, dp = (int(r[k]) for k in ("tensor_parallel", "pipeline_parallel", "data_parallel"))
    check(f"{name}: tp x pp x dp = ranks", tp * pp * dp == int(r["ranks"]))
    batch = 4 if r["scaling"] == "strong" else 2 * int(r["ranks"])
    check(f"{name}: batch {r['batch_size']}", int(r["batch_size"]) == batch)
    if tp * pp == 1:
        check(f"{name}: measured", r["tokens_per_second"] != "" and r["error"] == "")
    else:
        # Measured where fastllm trains the layout, else fastllm's own error message.
        check(f"{name}: measured or refused by fastllm",
              (r["tokens_per_second"] != "") != r["error"].startswith("fastllm train: error:"))
    if r["tokens_per_second"]:
        run = os.path.join(out, "runs", f"{r['scaling']}-n{r['ranks']}-tp{tp}pp{pp}dp{dp}")
        steps = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        steps = [s["step_seconds"] for s in steps if "step_seconds" in s and s["iteration"] > 1]
        check(f"{name}: 2 timed iterations", int(r["iterations"]) == len(steps) == 2)
        expected_tps = batch * 16 / statistics.median(steps)
        check(f"{name}: tokens/s from metrics.jsonl",
              abs(float(r["tokens_per_second"]) - expected_tps) <= 1e-3 * expected_tps + 0.1)
        base = [b for b in rows if b["scaling"] == r["scaling"] and b["ranks"] == "1"][0]
        speedup = float(r["tokens_per_second"]) / float(base["tokens_per_second"])
        check(f"{name}: speedup and efficiency",
              abs(float(r["speedup"]) - speedup) < 2e-3
              and abs(float(r["efficiency"]) - speedup / int(r["ranks"])) < 2e-3)
summary = open(os.path.join(out, "summary.md")).read()
check("summary says it is a CPU measurement", "host backend (CPU" in summary)
check("summary has every row", summary.count("\n| strong |") + summary.count("\n| weak |") == 8)
if shutil.which("gnuplot"):
    png = os.path.join(out, "scaling.png")
    check("PNG written", os.path.exists(png) and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n")
sys.exit(1 if failures else 0)
EOF
