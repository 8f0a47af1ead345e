#!/usr/bin/env python3
"""benchmarks/scaling/comm_model.py against numbers worked out by hand in this file for a tiny
architecture, rank placements reasoned from docs/DESIGN.md's rank order, and the per-rank parameter
counts of `fastllm inspect` (the C++ implementation) for Mistral-7B and Mixtral-8x7B layouts.

  test_comm_model.py FASTLLM_BINARY [unittest options]
"""
import json
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "scaling", "comm_model.py")
if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit("usage: test_comm_model.py FASTLLM_BINARY [unittest options]")
FASTLLM = sys.argv.pop(1)

# layers 2, hidden 16, 4 heads of 4, 2 KV heads, FFN 32, vocabulary 64; 8 samples of 8 tokens.
TINY = ["--model", "custom", "--layers", "2", "--hidden", "16", "--heads", "4", "--kv_heads", "2",
        "--head_dim", "4", "--ffn", "32", "--vocab", "64", "--sequence", "8", "--micro_batch", "1",
        "--global_batch", "8"]
# Per layer: q 16x16 + k 8x16 + v 8x16 + o 16x16 = 768, gate/up/down 3 x 16 x 32 = 1536, two norms
# 32: 2336. Embedding and LM head 64 x 16 each, final norm 16.
TINY_PARAMETERS = 2 * 2336 + 2 * 64 * 16 + 16  # 6736
# A [b, s, h] bf16 tensor: 1 x 8 x 16 x 2 bytes.
TINY_ACTIVATION = 256


def run_model(*args):
    out = subprocess.run([sys.executable, SCRIPT, *args, "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def collectives(result, kind, stage=0):
    return [c for c in result["stages"][stage]["collectives"] if c["kind"] == kind]


class HandComputed(unittest.TestCase):
    def test_parameters(self):
        r = run_model(*TINY, "--gpus", "1")
        self.assertEqual(r["total_parameters"], 6736)
        self.assertEqual(r["stages"][0]["parameters"], TINY_PARAMETERS)
        self.assertEqual(r["stages"][0]["collectives"], [])

    def test_dp_all_reduce(self):
        # 4 ranks: each sends 2 x 3/4 of the fp32 gradient buffer.
        r = run_model(*TINY, "--gpus", "4", "--zero", "0")
        [ar] = collectives(r, "DP")
        self.assertEqual(ar["bytes"], 2 * 3 / 4 * 4 * 6736)  # 40416
        self.assertEqual(ar["bytes"], 40416)
        self.assertEqual(ar["link"], "NVLink")
        self.assertAlmostEqual(ar["seconds"], 40416 / 450e9, delta=1e-18)

    def test_zero1(self):
        # Reduce-scatter 3/4 of the fp32 gradients, all-gather 3/4 of the bf16 weights.
        r = run_model(*TINY, "--gpus", "4", "--zero", "1")
        rs, ag = collectives(r, "DP")
        self.assertEqual(rs["bytes"], 20208)
        self.assertEqual(ag["bytes"], 10104)
        # Static memory: 2 + 4 bytes per parameter, 12 sharded over 4.
        self.assertEqual(r["stages"][0]["static_memory_bytes"], 6736 * (2 + 4 + 3))

    def test_tp(self):
        # TP 2: ring factor 2 x 1/2 = 1. 8 micro-batches of 4 all-reduces per layer x 2 layers.
        r = run_model(*TINY, "--gpus", "2", "--tp", "2")
        layers, edges = collectives(r, "TP")
        self.assertEqual(layers["bytes"], 8 * 2 * 4 * TINY_ACTIVATION)  # 16384
        # Embedding forward + LM head backward [b,s,h], and 3 cross-entropy [b,s] fp32 reductions.
        self.assertEqual(edges["bytes"], 8 * (2 * TINY_ACTIVATION + 3 * 8 * 4))  # 4864
        # Per rank: q 8 x 16, k and v 4 x 16 (2 KV heads split), o 16 x 8, MLP 3 x 16 x 16,
        # norms 32; vocabulary 32 rows each of embedding and head, final norm 16.
        per_layer = 128 + 64 + 64 + 128 + 768 + 32
        self.assertEqual(r["stages"][0]["parameters"], 2 * per_layer + 2 * 32 * 16 + 16)

    def test_tp_replicated_kv(self):
        # TP 4 > 2 KV heads: each rank keeps one whole KV head (4 rows) instead of half of one.
        r = run_model(*TINY, "--gpus", "4", "--tp", "4")
        per_layer = 16 * 4 + 2 * 16 * 4 + 4 * 16 + 3 * 16 * 8 + 32
        self.assertEqual(r["stages"][0]["parameters"], 2 * per_layer + 2 * 16 * 16 + 16)
        [layers, _] = collectives(r, "TP")
        self.assertEqual(layers["bytes"], 8 * 2 * 4 * 1.5 * TINY_ACTIVATION)

    def test_pp(self):
        # 2 stages: stage 0 sends activations, stage 1 gradients, one [b,s,h] per micro-batch.
        r = run_model(*TINY, "--gpus", "2", "--pp", "2")
        for stage in (0, 1):
            [send] = collectives(r, "PP", stage)
            self.assertEqual(send["bytes"], 8 * TINY_ACTIVATION)
        self.assertEqual(r["stages"][0]["parameters"], 2336 + 64 * 16)
        self.assertEqual(r["stages"][1]["parameters"], 2336 + 64 * 16 + 16)
        self.assertAlmostEqual(r["pipeline_bubble"], 1 / 9)
        # A middle stage of 3 sends both ways.
        r = run_model(*TINY, "--layers", "3", "--gpus", "3", "--pp", "3")
        [send] = collectives(r, "PP", 1)
        self.assertEqual(send["bytes"], 2 * 8 * TINY_ACTIVATION)

    def test_compute_time(self):
        # 6 x (2 x (768 + 1536) + 64 x 16) matmul FLOPs + 6 x 2 layers x 4 heads x 4 x (8 / 2).
        flops = 6 * (2 * (768 + 1536) + 64 * 16) + 6 * 2 * 4 * 4 * 4
        r = run_model(*TINY, "--gpus", "4", "--zero", "0", "--mfu", "0.5", "--peak_tflops", "100")
        self.assertEqual(r["flops_per_token"], flops)
        self.assertAlmostEqual(r["compute_seconds"], flops * 64 / (4 * 100e12 * 0.5))
        [ar] = collectives(r, "DP")
        self.assertAlmostEqual(ar["fraction"], ar["seconds"] / r["compute_seconds"])

    def test_mistral_flops(self):
        # Mistral-7B at 4096 tokens, window 4096 = full causal: context 2048.
        h, f, v, kv = 4096, 14336, 32000, 1024
        matmul = 32 * (2 * h * h + 2 * h * kv + 3 * h * f) + v * h
        r = run_model("--model", "mistral-7b", "--gpus", "8")
        self.assertEqual(r["flops_per_token"], 6 * matmul + 6 * 32 * 32 * 128 * 2048)

    def test_placement(self):
        # TP 8 fills a node: a DP group has one rank per node, so one NIC.
        r = run_model("--model", "mistral-7b", "--gpus", "64", "--tp", "8")
        self.assertEqual({c["link"] for c in collectives(r, "TP")}, {"NVLink"})
        self.assertEqual({c["link"] for c in collectives(r, "DP")}, {"IB"})
        # DP 64 alone: 8 members of each node's group share the node's 8 NICs (400 GB/s).
        r = run_model("--model", "mistral-7b", "--gpus", "64")
        [rs, ag] = collectives(r, "DP")
        self.assertEqual(rs["link"], "IB x8")
        self.assertAlmostEqual(rs["seconds"], rs["bytes"] / 400e9)
        # TP 4 x PP 2 x DP 8: stages 32 ranks apart (other nodes); 2 DP members per node.
        r = run_model("--model", "mistral-7b", "--gpus", "64", "--tp", "4", "--pp", "2")
        self.assertEqual(collectives(r, "PP")[0]["link"], "IB")
        self.assertEqual({c["link"] for c in collectives(r, "DP")}, {"IB x2"})
        # TP 2 x DP 4 on 8 GPUs: one node, all NVLink.
        r = run_model("--model", "mistral-7b", "--gpus", "8", "--tp", "2")
        self.assertEqual({c["link"] for c in collectives(r, "DP")}, {"NVLink"})

    def test_bad_layout(self):
        p = subprocess.run([sys.executable, SCRIPT, "--model", "mistral-7b", "--gpus", "3",
                            "--tp", "3"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("tp 3 does not divide 32 heads", p.stderr)

    def test_projection_table(self):
        out = subprocess.run([sys.executable, SCRIPT], check=True, capture_output=True,
                             text=True).stdout
        rows = [line for line in out.splitlines() if line.startswith("| mi")]
        self.assertEqual(len(rows), 14)
        self.assertTrue(any("| mistral-7b | 64 | TP8 x DP8 |" in row for row in rows))
        self.assertTrue(any("| mistral-7b | 64 | TP4 x PP2 x DP8 |" in row for row in rows))
        self.assertIn("Assumptions:", out)


class AgainstInspect(unittest.TestCase):
    def inspect(self, flags, tp, pp, dp):
        out = subprocess.run([FASTLLM, "inspect", "--load_pretrained_weights=0", *flags,
                              f"--tensor_parallel={tp}", f"--pipeline_parallel={pp}",
                              f"--data_parallel={dp}", "--zero_stage=1", "--format=json"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def check(self, model_args, flags, tp, pp, dp):
        inspected = self.inspect(flags, tp, pp, dp)
        r = run_model(*model_args, "--gpus", str(tp * pp * dp), "--tp", str(tp), "--pp", str(pp),
                      "--global_batch", str(dp * 8))
        self.assertEqual(r["total_parameters"], inspected["parameters"]["total"])
        for mine, theirs in zip(r["stages"], inspected["stages"], strict=True):
            self.assertEqual(mine["parameters"], theirs["parameters_per_rank"])
            self.assertEqual(mine["layers"], theirs["layers"])
            static = theirs["weight_bytes"] + theirs["gradient_bytes"] + theirs["optimizer_bytes"]
            self.assertAlmostEqual(mine["static_memory_bytes"], static, delta=1)

    MISTRAL = ["--num_layers=32", "--hidden_size=4096", "--num_attention_heads=32",
               "--head_groups=8", "--ffn_hidden_size=14336", "--vocab_size=32000"]

    def test_mistral(self):
        for tp, pp, dp in ((1, 1, 64), (8, 1, 8), (4, 2, 8), (2, 4, 4)):
            self.check(["--model", "mistral-7b"], self.MISTRAL, tp, pp, dp)

    def test_mixtral(self):
        flags = self.MISTRAL + ["--num_experts=8", "--num_experts_per_token=2"]
        for tp, pp, dp in ((8, 1, 8), (8, 4, 16), (4, 4, 4)):
            self.check(["--model", "mixtral-8x7b"], flags, tp, pp, dp)

    def test_tied_and_uneven(self):
        # 5 layers over 2 stages (3 + 2), tied embeddings, 2 KV heads replicated under TP 4.
        flags = ["--num_layers=5", "--hidden_size=64", "--num_attention_heads=8",
                 "--head_groups=2", "--ffn_hidden_size=96", "--vocab_size=1001",
                 "--tie_word_embeddings=1"]
        model = ["--model", "custom", "--layers", "5", "--hidden", "64", "--heads", "8",
                 "--kv_heads", "2", "--head_dim", "8", "--ffn", "96", "--vocab", "1001",
                 "--tied", "1"]
        for tp, pp, dp in ((1, 1, 2), (4, 2, 1), (2, 1, 1)):
            self.check(model, flags, tp, pp, dp)


if __name__ == "__main__":
    unittest.main()
