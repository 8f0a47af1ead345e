"""Prints the README's flag reference (markdown) from `fastllm <command> --help`.
    /usr/bin/python3 scripts/flag_reference.py build/src/fastllm
tests/cli/test_readme.cpp checks that README.md documents every flag."""
import re
import subprocess
import sys

GROUPS = [
    ("Model (inspect, probe, train, convert)", "inspect",
     ["pretrained_checkpoint_type", "pretrained_checkpoint_path", "load_pretrained_weights",
      "num_layers", "hidden_size", "vocab_size", "num_attention_heads", "head_groups",
      "kv_channels", "ffn_hidden_size", "add_linear_biases", "use_rotary_embeddings",
      "rotary_embedding_scale", "gated", "activation_type", "normalization_type", "norm_epsilon",
      "tie_word_embeddings", "num_experts", "num_experts_per_token", "window_size",
      "moe_aux_loss_coeff", "max_sequence_length"]),
    ("Layout (inspect, probe, train)", "inspect", ["tensor_parallel", "pipeline_parallel", "zero_stage"]),
    ("Backend (probe, train)", "train", ["backend", "dtype"]),
    ("inspect", "inspect", ["data_parallel", "format"]),
    ("probe", "probe", ["input", "output", "seed"]),
    ("Training (train)", "train", None),
    ("prepare", "prepare", None),
    ("convert", "convert", ["save"]),
    ("export", "export", ["load", "output", "dtype", "max_shard_size"]),
    ("Every command", "inspect", ["config", "help"]),
]


def flags(binary, command):
    out = subprocess.run([binary, command, "--help"], capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"  --(\w+) \(([^)]*)\)\s+(.*)", line)
        if m:
            name, kind, rest = m.groups()
            d = re.search(r" \[default: (.*)\]$", rest)
            rows[name] = (kind, d.group(1) if d else "", rest[:d.start()] if d else rest)
    return rows


def main(binary):
    listed = {n for _, _, names in GROUPS if names for n in names}
    for title, command, names in GROUPS:
        rows = flags(binary, command)
        if names is None:
            names = [n for n in rows if n not in listed]
        print(f"#### {title}\n\n| flag | values | default | meaning |\n| --- | --- | --- | --- |")
        for n in names:
            kind, default, meaning = (x.replace("|", "\\|") for x in rows[n])
            print(f"| `--{n}` | {kind} | {default and '`' + default + '`'} | {meaning} |")
        print()


main(sys.argv[1])
