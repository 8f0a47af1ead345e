"""Checks one `fastllm probe` output against a fixture's reference pass (../shared/fixtures):
||got - ref|| / ||ref|| over the logits, the loss and every gradient must stay within the
tolerance (run.sh: 1e-5 for fp32 with TF32 off, 2e-2 for bf16). Plain Python, no numpy, so that
it runs anywhere the run does.

    python3 probe_check.py --tolerance=T [--fixture=NAME --dtype=D] OUT.safetensors REF.safetensors

Prints one line for people and one JSON line; exits 0 within the tolerance, 1 beyond it or when a
tensor is missing, NaN or of another shape, 2 on unreadable input.
"""
import argparse
import array
import json
import math
import struct
import sys

FORMATS = {"F32": "f", "F64": "d", "I64": "q", "I32": "i"}


def load(path):
    """name -> (shape, list of floats) for every tensor of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        dtype = info["dtype"]
        if dtype == "BF16":
            # bf16 is the upper half of an f32.
            halves = array.array("H", raw)
            values = array.array("f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves)))
        elif dtype in FORMATS:
            values = array.array(FORMATS[dtype], raw)
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}, expected F32, F64 or BF16")
        if sys.byteorder != "little":
            values.byteswap()
        tensors[name] = (info["shape"], values)
    return tensors


def relative_error(got, ref):
    num = den = 0.0
    for g, r in zip(got, ref):
        if math.isnan(g) or math.isinf(g):
            return math.inf
        num += (g - r) * (g - r)
        den += r * r
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tolerance", type=float, required=True)
    ap.add_argument("--fixture", default="")
    ap.add_argument("--dtype", default="")
    ap.add_argument("output")
    ap.add_argument("reference")
    a = ap.parse_args()
    try:
        got, ref = load(a.output), load(a.reference)
    except (OSError, ValueError, KeyError, struct.error) as e:
        print(f"unreadable: {e}")
        return 2
    names = ["logits", "loss"] + sorted(n for n in ref if n.startswith("grad."))
    errors, problems = {}, []
    for name in names:
        if name not in ref:
            continue
        if name not in got:
            problems.append(f"{name} missing")
            continue
        if [d for d in got[name][0] if d != 1] != [d for d in ref[name][0] if d != 1]:
            problems.append(f"{name} is {got[name][0]}, expected {ref[name][0]}")
            continue
        errors[name] = relative_error(got[name][1], ref[name][1])
    grads = {n: e for n, e in errors.items() if n.startswith("grad.")}
    worst = max(grads, key=grads.get) if grads else ""
    over = sorted(n for n, e in errors.items() if not e <= a.tolerance)
    ok = not problems and not over and bool(grads)
    line = (f"{'ok' if ok else 'BEYOND'} {a.tolerance:g}: logits {errors.get('logits', math.nan):.2e}"
            f", loss {errors.get('loss', math.nan):.2e}, worst gradient "
            f"{grads.get(worst, math.nan):.2e} ({worst}), {len(grads)} gradients")
    if problems:
        line += "; " + "; ".join(problems[:3])
    if over:
        line += f"; {len(over)} over: " + ", ".join(over[:3])
    print(line)
    print(json.dumps({"stage": "probe", "fixture": a.fixture, "dtype": a.dtype, "ok": ok,
                      "tolerance": a.tolerance, "logits": errors.get("logits"),
                      "loss": errors.get("loss"), "worst_grad": grads.get(worst),
                      "worst_grad_name": worst, "problems": problems[:5]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
