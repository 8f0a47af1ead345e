"""A fastllm export as transformers sees it: from_pretrained loads the model and its tokenizer,
the tokenizer encodes every line of the corpus as SentencePiece does (BOS first), greedy generate
stops at the folder's EOS, and greedy `fastllm generate` on the same folder gives the same token
ids and the same text.

    python check_generate.py FASTLLM_BINARY EXPORTED_FOLDER CORPUS_TXT
"""
import subprocess
import sys

import sentencepiece
import torch
import transformers

# The last two end where a Jargon File entry ends: a trained model then says EOS.
PROMPTS = ["The hacker", "A bug is", "When the program crashed, the", "Compare {bar}", "See {foo}."]
MAX_NEW = 100


def fastllm_generate(binary, folder, *flags):
    out = subprocess.run([binary, "generate", f"--pretrained_checkpoint_path={folder}",
                          f"--max_new_tokens={MAX_NEW}", *flags],
                         check=True, capture_output=True, text=True).stdout
    return out[:-1] if out.endswith("\n") else out


def check_tokenizer(tokenizer, folder, corpus):
    reference = sentencepiece.SentencePieceProcessor(model_file=f"{folder}/tokenizer.model")
    with open(corpus, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    for line in lines:
        want = [reference.bos_id()] + reference.encode(line)
        got = tokenizer(line).input_ids
        assert got == want, f"{folder}: {line!r} encodes as {got}, SentencePiece {want}"
        assert tokenizer.decode(got, skip_special_tokens=True) == reference.decode(want), line
    print(f"{folder}: {type(tokenizer).__name__} encodes and decodes {len(lines)} lines as "
          "SentencePiece")


def main():
    binary, folder, corpus = sys.argv[1], sys.argv[2], sys.argv[3]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    check_tokenizer(tokenizer, folder, corpus)
    # fastllm generates in fp32 on the host: transformers too, from the same (maybe bf16) weights.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    assert eos == tokenizer.eos_token_id == 2, (eos, tokenizer.eos_token_id)
    stopped = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tokenizer.bos_token_id, f"{prompt!r}: no BOS first"
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1]:]
        want = want.tolist()
        if want[-1] == eos:
            assert len(want) <= MAX_NEW and eos not in want[:-1], want
            stopped += 1
        got = fastllm_generate(binary, folder, "--prompt_ids=" + ",".join(map(str, ids[0].tolist())))
        got = [int(t) for t in got.split(",")]
        assert got == want, f"{folder} {prompt!r}: fastllm {got} != transformers {want}"
        text = fastllm_generate(binary, folder, f"--prompt={prompt}")
        want_text = tokenizer.decode(want, skip_special_tokens=True)
        assert text == want_text, f"{folder} {prompt!r}: fastllm {text!r} != {want_text!r}"
        print(f"{folder}: {prompt!r} -> {len(want)} tokens equal"
              f"{', ending at EOS' if want[-1] == eos else ''}")
    assert stopped > 0, f"{folder}: no greedy continuation reached EOS within {MAX_NEW} tokens"


if __name__ == "__main__":
    main()
