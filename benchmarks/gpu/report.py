"""Reading the results of one GPU run (benchmarks/gpu/run.sh): plain Python, no packages.

    python3 report.py line JSON                   # one result as one line, as it arrives
    python3 report.py table RESULTS.jsonl ANCHORS # the summary table, printed last

RESULTS.jsonl holds one JSON object per result with its "stage" (device, smoke, tests, probe,
throughput) or "peer" (device, live). ANCHORS is .gpu/anchors: the peer figures recorded on an
H200 (hf-pytorch-h200.json, hf-pytorch-h200-compiled.json), used where no live peer ran, and the
torch.compile peers, the strongest on the card, which take minutes each to compile.
"""
import json
import os
import sys

# fastllm's configuration names -> hf_baseline.py's.
PEER_NAMES = {"mistral-7b": "mistral-7b", "mistral-0.85b": "mistral-0.85b",
              "mixtral-8e": "mixtral-8e-2.4b"}


def profile_text(r):
    p = r.get("profile_s")
    if not p:
        return "-"
    return "/".join(f"{1e3 * p.get(k, 0):.0f}" for k in ("forward", "backward", "grad_norm",
                                                        "optimizer"))


def line(text):
    r = json.loads(text)
    if r.get("peer") == "device":
        return (f"{r.get('device', '?')}, torch {r.get('torch', '?')}, bf16 GEMM "
                f"{r.get('gemm_bf16_tflops', 0):.0f} TFLOP/s")
    if "error" in r:
        who = " ".join(str(w) for w in (r.get("model"), r.get("mode")) if w)
        return f"{who} error: {str(r['error'])[:160]}"
    name = r["model"]
    if r.get("peer"):
        name += f" HF {r['mode']}{' +recompute' if r.get('recompute') else ''}"
    else:
        name += f" fastllm {r.get('dtype', '')} recompute={r.get('recompute', '?')}"
        if r.get("attention_kernel"):
            name += f" attention={r['attention_kernel']}"
    text = (f"{name}: {r['tokens_per_s']:,.0f} tokens/s, {r['model_tflops']:.0f} TFLOP/s, "
            f"peak {r['peak_gib']:.1f} GiB")
    if r.get("profile_s"):
        text += f", forward/backward/norm/optimizer ms {profile_text(r)}"
    return text


def recorded_peers(anchors):
    """Recorded peer runs in hf_peer.py's form, from the anchors JSON files."""
    runs = []
    try:
        with open(os.path.join(anchors, "hf-pytorch-h200.json")) as f:
            plain = json.load(f)
        for key, r in plain.items():
            if key.startswith("hf_") and isinstance(r, dict) and "tokens_per_s" in r:
                model = ("mistral-7b" if "mistral7b" in key else
                         "mistral-0.85b" if "mistral1b" in key else "mixtral-8e-2.4b")
                runs.append({"model": model, "mode": r["mode"], "recompute": r["ckpt"],
                             "compile": r["compile"], "tokens_per_s": r["tokens_per_s"],
                             "peak_gib": r["peak_gib"], "layers": None})
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(os.path.join(anchors, "hf-pytorch-h200-compiled.json")) as f:
            for r in json.load(f):
                runs.append(dict(r, layers=None))
    except (OSError, ValueError):
        pass
    return runs


def table(results_path, anchors):
    results = []
    with open(results_path) as f:
        for text in f:
            try:
                results.append(json.loads(text))
            except ValueError:
                continue
    device = next((r for r in results if r.get("stage") == "device"), {})
    ours = [r for r in results if r.get("stage") == "throughput"]
    live = [r for r in results if r.get("peer") == "live" and "tokens_per_s" in r]
    recorded = recorded_peers(anchors)
    print()
    print(f"card: {device.get('name', '?')} ({device.get('memory_mib', 0) / 1024:.0f} GiB)")
    tests = [r for r in results if r.get("stage") == "tests"]
    if tests:
        bad = [r["name"] for r in tests if r.get("rc")]
        print(f"GPU tests: {len(tests) - len(bad)} of {len(tests)} executables passed"
              + (f"; failed: {', '.join(bad)}" if bad else ""))
    probes = [r for r in results if r.get("stage") == "probe"]
    if probes:
        bad = [f"{r['fixture']} {r['dtype']}" for r in probes if not r.get("ok")]
        print(f"fixture probes: {len(probes) - len(bad)} of {len(probes)} within tolerance"
              + (f"; beyond: {', '.join(bad)}" if bad else ""))
    head = (f"{'model':<14}{'layers':>6} {'recompute':<10}{'fastllm tok/s':>14}{'TFLOP/s':>8}"
            f"{'GiB':>6}  {'fwd/bwd/norm/opt ms':<20}{'peer (numerics)':<22}{'tok/s':>8}"
            f"{'ratio':>7}{'compiled peer':>14}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in ours:
        model = r.get("model", "?")
        peer_model = PEER_NAMES.get(model, model)
        recompute = r.get("recompute", "none") != "none"
        left = f"{model:<14}{r.get('layers', '-'):>6} {r.get('recompute', '?'):<10}"
        if "tokens_per_s" not in r:
            print(left + "error (see the logs)")
            continue
        left += (f"{r['tokens_per_s']:>14,.0f}{r['model_tflops']:>8.0f}{r['peak_gib']:>6.1f}  "
                 f"{profile_text(r):<20}")
        # The peer in fastllm's numerics (autocast bf16, fp32 master weights and AdamW) with the
        # same recompute choice: measured in this run, else recorded on an H200.
        same = [p for p in live if p["model"] == peer_model and p["mode"] == "amp"
                and bool(p.get("recompute")) == recompute and p.get("layers") == r.get("layers")]
        source = "live"
        full_size = model != "mistral-7b" or r.get("layers") == 32
        if not same and full_size:
            same = [p for p in recorded if p["model"] == peer_model and p["mode"] == "amp"
                    and bool(p.get("recompute")) == recompute and not p.get("compile")]
            source = "recorded"
        if same:
            p = same[0]
            label = f"amp{'+recompute' if recompute else ''} ({source})"
            left += (f"{label:<22}{p['tokens_per_s']:>8,.0f}"
                     f"{r['tokens_per_s'] / p['tokens_per_s']:>7.2f}")
        else:
            left += f"{'none':<22}{'-':>8}{'-':>7}"
        compiled = [p for p in recorded if p["model"] == peer_model and p.get("compile")]
        if compiled and full_size:
            best = max(compiled, key=lambda p: p["tokens_per_s"])
            left += f"{best['tokens_per_s']:>14,.0f}{r['tokens_per_s'] / best['tokens_per_s']:>7.2f}"
        else:
            left += f"{'-':>14}{'-':>7}"
        print(left)
    others = [p for p in live if not any(
        PEER_NAMES.get(r.get("model")) == p["model"] and p["mode"] == "amp" and
        bool(p.get("recompute")) == (r.get("recompute", "none") != "none") for r in ours)]
    for p in others:
        print(f"  peer also: {line(json.dumps(p))}")
    print("compiled peer: transformers + torch.compile, recorded on an H200 (../shared/anchors); "
          "ratio = fastllm / peer")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "line":
        print(line(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "table":
        table(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
