"""The PyTorch peer of bench_step: one training step of transformers' MistralForCausalLM on the CPU.

Same architecture, batch and sequence as benchmarks/bench_step.cpp: random initialisation, fp32,
random tokens with labels = input ids (transformers shifts them), zero_grad + forward + backward
(+ AdamW with --optimizer). Prints one JSON object per attention implementation.
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import MistralConfig, MistralForCausalLM


def build(impl, window):
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        sliding_window=window or None,
        tie_word_embeddings=False,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).float().train()


def measure(impl, args):
    model = build(impl, args.window)
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=generator)
    optimizer = None
    if args.optimizer:
        # fused=True is PyTorch's fastest AdamW on CPU (one kernel over all parameters).
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    rates = []
    loss = 0.0
    for _ in range(args.repetitions):
        start = time.perf_counter()
        for _ in range(args.iterations):
            loss = step()
        elapsed = time.perf_counter() - start
        rates.append(args.batch * args.seq * args.iterations / elapsed)
    return {
        "impl": impl,
        "batch": args.batch,
        "seq": args.seq,
        "window": args.window,
        "optimizer": int(args.optimizer),
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_best": max(rates),
        "loss": loss,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--window", type=int, default=0, help="sliding window, 0 = none")
    parser.add_argument("--optimizer", action="store_true", help="add an AdamW step")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--impl", default="sdpa,eager", help="attention implementations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3, help="steps per repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for impl in args.impl.split(","):
        print(json.dumps(measure(impl, args)), flush=True)


if __name__ == "__main__":
    main()
