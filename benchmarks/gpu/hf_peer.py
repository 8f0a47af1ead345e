"""The Hugging Face peer of step_throughput, on the same card in the same run: the runs of
../shared/anchors/hf_baseline.py (copied to .gpu/ by run.sh --prepare) for the three
configurations, with the Mistral-7B layer count matched to fastllm's (16 of 32 on an 80 GB H100).

    python3 hf_peer.py BASELINE.py --layers-7b N [--compile] > hf.json
"""
import argparse
import sys

ap = argparse.ArgumentParser()
ap.add_argument("baseline")
ap.add_argument("--layers-7b", type=int, default=32)
ap.add_argument("--compile", action="store_true", help="also the torch.compile peers (minutes)")
a = ap.parse_args()

source = open(a.baseline).read()
# The 7B configuration is the only one that states 32 layers.
assert source.count("num_hidden_layers=32") == 1, "hf_baseline.py changed: update hf_peer.py"
source = source.replace("num_hidden_layers=32", f"num_hidden_layers={a.layers_7b}")
# One peer per fastllm configuration: autocast bf16 with fp32 master weights, as fastllm trains
# (the 7B in pure bf16 where autocast does not fit, as the anchors record).
runs = ('RUNS = [("mistral-0.85b", "amp", False, False), ("mistral-7b", "amp", False, False), '
        '("mistral-7b", "bf16", False, False), ("mixtral-8e-2.4b", "amp", False, False)]')
start = source.index("RUNS = [")
end = source.index("]", source.index("(\"mixtral-8e-2.4b\", \"amp\", False, False)", start)) + 1
source = source[:start] + runs + source[end:]
sys.argv = [a.baseline] + (["--compile"] if a.compile else [])
exec(compile(source, a.baseline, "exec"), {"__name__": "__main__"})
