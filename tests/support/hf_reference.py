"""What Hugging Face transformers computes, for the tests that compare fastllm with it beyond the
fixtures' own reference files: greedy `generate` on each fixture model (and on a copy whose
generation_config.json names a second EOS token, where generate stops), and the Mixtral fixture's
expert load on the first batch of its trajectory.

Runs where transformers and PyTorch are installed (`FASTLLM_HF=1 scripts/setup.sh` makes
build-deps/hf-venv); writes tests/support/hf_reference.json, which the default suite reads, so the
suite itself needs no PyTorch:

    build-deps/hf-venv/bin/python tests/support/hf_reference.py ../shared/fixtures
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file

# The same prompt as tests/cli/generate_support.h's kPrompt, and more new tokens than the fixtures'
# sliding window of 16.
PROMPT = [1, 17, 503, 88, 941, 2, 260, 77, 391, 12]
NEW_TOKENS = 24


def load(folder):
    """In float64, with the plain attention and expert loops (the grouped kernels lack float64)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager")
    model.eval()
    return model


def greedy(folder):
    model = load(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS,
            "eos_token_id": model.generation_config.eos_token_id,
            "tokens": out[0, len(PROMPT):].tolist()}


def greedy_to_eos(folder, reference):
    """Greedy generate from a copy of the folder whose generation_config.json lists, next to its
    EOS, the eighth greedy token as a second end token: generate stops right after it."""
    eos = [reference["eos_token_id"], reference["tokens"][7]]
    with tempfile.TemporaryDirectory() as copy:
        shutil.copytree(folder, copy, dirs_exist_ok=True)
        path = os.path.join(copy, "generation_config.json")
        with open(path) as f:
            config = json.load(f)
        config["eos_token_id"] = eos
        with open(path, "w") as f:
            json.dump(config, f)
        result = greedy(copy)
    assert result["tokens"] == reference["tokens"][:8], "generate did not stop at the new EOS"
    return result


def expert_load(folder):
    """Each expert's share of the top-k slots over all layers for trajectory batch 0."""
    model = load(folder)
    batch = load_file(os.path.join(folder, "trajectory.safetensors"))["batches"][0]
    with torch.no_grad():
        out = model(input_ids=batch, output_router_logits=True)
    k = model.config.num_experts_per_tok
    counts = torch.zeros(model.config.num_local_experts, dtype=torch.float64)
    for logits in out.router_logits:
        top = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1).indices
        counts += torch.bincount(top.flatten(), minlength=counts.numel()).double()
    return {"batch": "trajectory.safetensors batches[0]", "top_k": k,
            "load": (counts / counts.sum()).tolist()}


def main():
    fixtures = sys.argv[1]
    result = {"made_by": f"transformers {transformers.__version__}, torch {torch.__version__}",
              "generate": {}}
    for name in ("dev-mistral", "dev-mixtral", "dev-tied-nowindow"):
        result["generate"][name] = greedy(os.path.join(fixtures, name))
    result["generate_to_eos"] = {"dev-mistral": greedy_to_eos(
        os.path.join(fixtures, "dev-mistral"), result["generate"]["dev-mistral"])}
    result["expert_load"] = {"dev-mixtral": expert_load(os.path.join(fixtures, "dev-mixtral"))}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_reference.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
