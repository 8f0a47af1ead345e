"""Reading the results of one GPU run (benchmarks/gpu/run.sh).

    python3 report.py probe OUT.safetensors REFERENCE.safetensors   # errors of a probe, one line
    python3 report.py table FASTLLM.jsonl HF.json                   # the throughput table
"""
import json
import sys


def probe(out_path, ref_path):
    from safetensors.numpy import load_file
    import numpy as np
    got, ref = load_file(out_path), load_file(ref_path)

    def rel(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    grads = [n for n in ref if n.startswith("grad.")]
    missing = [n for n in grads if n not in got]
    worst = max((rel(got[n], ref[n]), n) for n in grads if n in got)
    print(f"logits {rel(got['logits'], ref['logits']):.2e}  "
          f"loss {abs(float(got['loss'][0]) - float(ref['loss'][0])):.2e}  "
          f"worst grad {worst[0]:.2e} ({worst[1]})  missing grads {len(missing)}")


def table(fastllm_path, hf_path):
    ours = [json.loads(line) for line in open(fastllm_path) if line.startswith("{")]
    try:
        hf = json.load(open(hf_path))
    except (OSError, ValueError):
        hf = {"runs": []}
    names = {"mistral-7b": "mistral-7b", "mistral-0.85b": "mistral-0.85b",
             "mixtral-8e": "mixtral-8e-2.4b"}
    print(f"device: {hf.get('device', '?')}  measured bf16 GEMM {hf.get('gemm_bf16_tflops', 0):.0f} "
          f"TFLOP/s, copy {hf.get('copy_TBps', 0):.2f} TB/s")
    print(f"{'model':<15}{'layers':>7}{'tokens':>8} | {'fastllm tok/s':>13}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'GiB':>7} | {'HF (mode)':>16}{'tok/s':>9}{'TFLOP/s':>9}{'GiB':>7} | "
          f"{'ratio':>6}")
    for r in ours:
        peers = [p for p in hf.get("runs", []) if p.get("model") == names[r["model"]]]
        best = max((p for p in peers if "tokens_per_s" in p), key=lambda p: p["tokens_per_s"],
                   default=None)
        tokens = r["micro_batch"] * r["seq"]
        left = f"{r['model']:<15}{r['layers']:>7}{tokens:>8} | "
        if "error" in r:
            left += f"error: {r['error'][:60]}"
            print(left)
            continue
        left += (f"{r['tokens_per_s']:>13,.0f}{r['model_tflops']:>9.0f}{r['mfu_vs_989']:>7.1%}"
                 f"{r['peak_gib']:>7.1f} | ")
        if best:
            mode = best["mode"] + ("+compile" if best.get("compile") else "")
            right = (f"{mode:>16}{best['tokens_per_s']:>9,.0f}{best['model_tflops']:>9.0f}"
                     f"{best['peak_gib']:>7.1f} | {r['tokens_per_s'] / best['tokens_per_s']:>6.2f}")
        else:
            errors = [p.get("error", "") for p in peers]
            right = f"{'no peer':>16} {errors[0][:40] if errors else ''}"
        print(left + right)


if __name__ == "__main__":
    {"probe": probe, "table": table}[sys.argv[1]](*sys.argv[2:])
