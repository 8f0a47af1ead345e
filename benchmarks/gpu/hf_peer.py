"""The Hugging Face peer of step_throughput, on the same card in the same run, with the models,
timing and FLOP count of ../shared/anchors/hf_baseline.py (copied to .gpu/anchors by
run.sh --prepare). One JSON line per run, printed as it finishes, the most telling runs first, so
that a run cut short by its time budget still leaves those:

  1. autocast bf16 with fp32 master weights and fused AdamW: fastllm's numerics (bf16 compute,
     fp32 master weights and moments), without recompute where it fits and with it for the 7B;
  2. pure bf16 weights and AdamW (the cheaper numerics transformers users also train with);
  3. the same numerics as 1 with the recompute choice flipped.

The 7B without recompute in autocast is left out: it does not fit 141 GB in transformers
(../shared/GPU.md). The torch.compile peers take minutes each: run.sh's table takes them from the
recorded anchors instead.

    python3 hf_peer.py BASELINE.py [--layers-7b N] [--only NAME ...]
"""
import argparse
import importlib.util
import json
import sys

RUNS = [  # (model, mode, recompute)
    ("mistral-7b", "amp", True),
    ("mistral-0.85b", "amp", False),
    ("mixtral-8e-2.4b", "amp", False),
    ("mistral-7b", "bf16", False),
    ("mistral-0.85b", "bf16", False),
    ("mixtral-8e-2.4b", "bf16", False),
    ("mistral-0.85b", "amp", True),
    ("mixtral-8e-2.4b", "amp", True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline")
    ap.add_argument("--layers-7b", type=int, default=32,
                    help="Mistral-7B layers (16 of 32 fit an 80 GB card, as in step_throughput)")
    ap.add_argument("--only", nargs="*", help="models to run (default: all)")
    a = ap.parse_args()

    spec = importlib.util.spec_from_file_location("hf_baseline", a.baseline)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    torch = base.torch
    base.CONFIGS["mistral-7b"][0].num_hidden_layers = a.layers_7b

    torch.set_float32_matmul_precision("high")
    x = torch.randn(8192, 8192, device=base.dev, dtype=torch.bfloat16)
    y = torch.randn_like(x)
    head = {"peer": "device", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "gemm_bf16_tflops": 2 * 8192**3 / base.bench(lambda: x @ y, 3, 10) / 1e12}
    del x, y
    torch.cuda.empty_cache()
    print(json.dumps(head), flush=True)
    for model, mode, recompute in RUNS:
        if a.only and model not in a.only:
            continue
        r = base.train_bench(model, mode, ckpt=recompute)
        r.setdefault("recompute", recompute)
        r["peer"] = "live"
        r["layers"] = base.CONFIGS[model][0].num_hidden_layers
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
