#!/usr/bin/env python3
"""Scaling benchmark: `fastllm train` under mpiexec for several rank counts and every
tensor x pipeline x data layout of them, with a fixed global batch (strong scaling) and with a
batch that grows with the ranks (weak scaling), on a small Mistral-architecture model and a
synthetic dataset. Reads the step times from each run's metrics.jsonl, writes OUT/scaling.csv,
OUT/summary.md and OUT/scaling.png (gnuplot). A layout fastllm refuses is recorded with its error.

  benchmarks/scaling/run_scaling.py --fastllm build/src/fastllm --out build/scaling

Standard library only; plotting needs gnuplot (Debian gnuplot-nox).
"""
import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synthetic_dataset  # noqa: E402  (next to this file)

ROOT = os.path.dirname(os.path.dirname(HERE))

FIELDS = ["scaling", "ranks", "layout", "tensor_parallel", "pipeline_parallel", "data_parallel",
          "batch_size", "micro_batch_size", "sequence_length", "threads_per_rank", "iterations",
          "step_seconds", "tokens_per_second", "speedup", "efficiency", "error"]


def layouts(ranks):
    """Every (tp, pp, dp) with tp x pp x dp = ranks, data-parallel only first."""
    out = []
    for tp in range(1, ranks + 1):
        for pp in range(1, ranks // tp + 1):
            if ranks % (tp * pp) == 0:
                out.append((tp, pp, ranks // (tp * pp)))
    return sorted(out, key=lambda l: (l[0] * l[1] > 1, l[0] == 1, l))


def layout_name(tp, pp, dp):
    parts = [f"TP{tp}" if tp > 1 else "", f"PP{pp}" if pp > 1 else "", f"DP{dp}" if dp > 1 else ""]
    return "x".join(p for p in parts if p) or "1 rank"


def family(tp, pp, dp):
    """The plot series a layout belongs to: which kinds of parallelism it mixes."""
    kinds = [k for k, n in (("TP", tp), ("PP", pp), ("DP", dp)) if n > 1]
    return "x".join(kinds) or "1 rank"


def model_flags(args):
    return [
        "--load_pretrained_weights=0", f"--num_layers={args.layers}",
        f"--hidden_size={args.hidden}", f"--num_attention_heads={args.heads}",
        f"--head_groups={args.head_groups}", f"--ffn_hidden_size={args.ffn}",
        f"--vocab_size={args.vocab}", f"--window_size={args.window}",
        f"--sequence_length={args.sequence}", f"--micro_batch_size={args.micro_batch}",
    ]


def first_error(stderr):
    for line in stderr.splitlines():
        if "error" in line.lower():
            return line.strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "failed without a message"


def run_one(args, data, mode, ranks, tp, pp, dp, batch, threads):
    name = f"{mode}-n{ranks}-tp{tp}pp{pp}dp{dp}"
    run_dir = os.path.join(args.out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    command = [args.mpiexec, *args.mpiexec_args.split(), "-np", str(ranks), args.fastllm, "train",
               *model_flags(args), f"--tensor_parallel={tp}", f"--pipeline_parallel={pp}",
               f"--batch_size={batch}", f"--train_iters={args.iters}", "--log_interval=1",
               f"--data_path={data}", f"--save={run_dir}", "--keep_checkpoints=1",
               f"--seed={args.seed}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    row = {"scaling": mode, "ranks": ranks, "layout": layout_name(tp, pp, dp),
           "tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
           "batch_size": batch, "micro_batch_size": args.micro_batch,
           "sequence_length": args.sequence, "threads_per_rank": threads, "iterations": 0,
           "step_seconds": "", "tokens_per_second": "", "speedup": "", "efficiency": "",
           "error": ""}
    if batch % (dp * args.micro_batch):
        row["error"] = (f"batch {batch} is not a multiple of data-parallel {dp} x micro-batch "
                        f"{args.micro_batch}")
        return row
    started = time.monotonic()
    try:
        p = subprocess.run(command, env=env, capture_output=True, text=True,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {args.timeout} s"
        return row
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(command) + "\n")
    with open(os.path.join(run_dir, "output.txt"), "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        row["error"] = first_error(p.stderr)
        return row
    steps = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "step_seconds" in record and record["iteration"] > args.skip:
                steps.append(record["step_seconds"])
    if not steps:
        row["error"] = f"no step after the first {args.skip} in metrics.jsonl"
        return row
    step = statistics.median(steps)
    row.update(iterations=len(steps), step_seconds=f"{step:.4f}",
               tokens_per_second=f"{batch * args.sequence / step:.1f}")
    print(f"  {name}: {float(row['tokens_per_second']):.0f} tokens/s "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return row


def add_efficiency(rows):
    for mode in ("strong", "weak"):
        base = [r for r in rows
                if r["scaling"] == mode and r["ranks"] == 1 and r["tokens_per_second"]]
        if not base:
            continue
        t1 = float(base[0]["tokens_per_second"])
        for r in rows:
            if r["scaling"] == mode and r["tokens_per_second"]:
                speedup = float(r["tokens_per_second"]) / t1
                r["speedup"] = f"{speedup:.3f}"
                r["efficiency"] = f"{speedup / r['ranks']:.3f}"


def plot(rows, out, note):
    """OUT/scaling.png: tokens/s against ranks, strong and weak side by side, one line per kind
    of layout (each starting from the 1-rank run) and the ideal N x (1-rank tokens/s)."""
    if shutil.which("gnuplot") is None:
        print("gnuplot not found: no plot (Debian package gnuplot-nox)", file=sys.stderr)
        return None
    if not any(r["tokens_per_second"] for r in rows):
        print("no run succeeded: no plot", file=sys.stderr)
        return None
    data_dir = os.path.join(out, "plot")
    os.makedirs(data_dir, exist_ok=True)
    panels = []
    for mode in ("strong", "weak"):
        ok = [r for r in rows if r["scaling"] == mode and r["tokens_per_second"]]
        base = [r for r in ok if r["ranks"] == 1]
        series = []
        for fam in sorted({family(r["tensor_parallel"], r["pipeline_parallel"],
                                  r["data_parallel"]) for r in ok if r["ranks"] > 1}):
            points = base + [r for r in ok if r["ranks"] > 1 and family(
                r["tensor_parallel"], r["pipeline_parallel"], r["data_parallel"]) == fam]
            path = os.path.join(data_dir, f"{mode}-{fam}.dat")
            with open(path, "w") as f:
                for r in sorted(points, key=lambda r: r["ranks"]):
                    f.write(f"{r['ranks']} {r['tokens_per_second']}\n")
            series.append((fam, path))
        panels.append((mode, base, series))
    max_ranks = max(r["ranks"] for r in rows)
    lines = ["set terminal pngcairo size 1200,480 font ',10'",
             f"set output '{os.path.join(out, 'scaling.png')}'",
             f"set multiplot layout 1,2 title '{note}'",
             "set logscale xy 2", "set xlabel 'MPI ranks'", "set ylabel 'tokens/s'",
             f"set xrange [0.8:{max_ranks * 1.25}]", "set key top left", "set grid"]
    cores = os.cpu_count() or 1
    if cores < max_ranks:
        # Past this many ranks the runs share cores: ideal scaling is out of reach.
        lines.append(f"set arrow from {cores}, graph 0 to {cores}, graph 1 nohead dashtype 3")
        lines.append(f"set label 'cores' at {cores}, graph 0.05 offset 0.5, 0")
    for mode, base, series in panels:
        title = "strong scaling (fixed global batch)" if mode == "strong" else \
            "weak scaling (batch grows with ranks)"
        lines.append(f"set title '{title}'")
        plots = [f"'{path}' using 1:2 with linespoints title '{fam}'" for fam, path in series]
        if base:
            plots.append(f"{float(base[0]['tokens_per_second'])} * x with lines dashtype 2 "
                         "lc rgb 'gray' title 'ideal'")
        lines.append("plot " + ", ".join(plots) if plots else "plot 1/0 notitle")
    lines.append("unset multiplot")
    script = os.path.join(out, "scaling.gp")
    with open(script, "w") as f:
        f.write("\n".join(lines) + "\n")
    subprocess.run(["gnuplot", script], check=True)
    return os.path.join(out, "scaling.png")


def summary(rows, note):
    lines = [f"{note}", "",
             "| scaling | ranks | layout | batch | tokens/s | step s | speedup | efficiency "
             "| note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['scaling']} | {r['ranks']} | {r['layout']} | {r['batch_size']} | "
                     f"{r['tokens_per_second'] or '-'} | {r['step_seconds'] or '-'} | "
                     f"{r['speedup'] or '-'} | {r['efficiency'] or '-'} | {r['error']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--fastllm", default=os.path.join(ROOT, "build", "src", "fastllm"))
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "scaling"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=["strong", "weak"],
                        default=["strong", "weak"])
    parser.add_argument("--data_parallel_only", action="store_true",
                        help="skip the layouts with tensor or pipeline parallelism")
    parser.add_argument("--iters", type=int, default=6, help="training iterations per run")
    parser.add_argument("--skip", type=int, default=2,
                        help="first iterations left out of the median step time (warm-up)")
    parser.add_argument("--strong_batch", type=int, default=8,
                        help="global batch (samples) of every strong-scaling run")
    parser.add_argument("--weak_batch_per_rank", type=int, default=2,
                        help="weak scaling: global batch = this x ranks")
    parser.add_argument("--threads", type=int, default=0,
                        help="OpenMP threads per rank; 0 = the machine's cores / ranks (min 1)")
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--mpiexec_args", default="--oversubscribe --allow-run-as-root")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--seed", type=int, default=1234)
    # A small Mistral: grouped-query attention, SwiGLU, RMSNorm, RoPE, sliding window.
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_groups", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--micro_batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.iters <= args.skip:
        parser.error("--iters must exceed --skip")
    if not os.access(args.fastllm, os.X_OK):
        parser.error(f"--fastllm {args.fastllm}: not an executable; build fastllm first")
    args.fastllm = os.path.abspath(args.fastllm)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)

    data = os.path.join(args.out, "synthetic")
    max_batch = max(args.strong_batch, args.weak_batch_per_rank * max(args.ranks))
    documents = max(64, 4 * max_batch * (args.iters + 1) * args.sequence // 256)
    synthetic_dataset.write_dataset(data, documents, 256, args.vocab, args.seed)

    cores = os.cpu_count() or 1
    note = (f"fastllm host backend (CPU, fp32), {cores} core(s), mpiexec ranks oversubscribed; "
            f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.head_groups} "
            f"KV, FFN {args.ffn}, vocab {args.vocab}, window {args.window}, sequence "
            f"{args.sequence}")
    print(note, flush=True)
    rows = []
    for mode in args.modes:
        for ranks in args.ranks:
            batch = args.strong_batch if mode == "strong" else args.weak_batch_per_rank * ranks
            threads = args.threads or max(1, cores // ranks)
            for tp, pp, dp in layouts(ranks):
                if args.data_parallel_only and tp * pp > 1:
                    continue
                rows.append(run_one(args, data, mode, ranks, tp, pp, dp, batch, threads))
                if rows[-1]["error"]:
                    print(f"  {mode}-n{ranks} {rows[-1]['layout']}: {rows[-1]['error']}",
                          flush=True)
    add_efficiency(rows)
    with open(os.path.join(args.out, "scaling.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = summary(rows, note)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    png = plot(rows, args.out, f"fastllm scaling on {cores} CPU core(s)")
    print(f"wrote {os.path.join(args.out, 'scaling.csv')}, "
          f"{os.path.join(args.out, 'summary.md')}" + (f", {png}" if png else ""))
    # Slow runs are data; no run at all means fastllm or the MPI set-up is broken.
    return 0 if any(r["tokens_per_second"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
