#!/usr/bin/env bash
# Makes the demo's corpus and tokenizer from the Jargon File 4.0.0 (public domain, about 1.5 MB of
# English), which Debian's `jargon` package installs as /usr/share/info/jargon.info.gz:
#   <out>/jargon.jsonl      one entry per line, {"title": ..., "text": ...} (about 2,100 documents)
#   <out>/jargon.txt        one paragraph per line, the tokenizer's training text
#   <out>/tokenizer.model   SentencePiece BPE trained like Mistral's tokenizer.model (byte fallback,
#                           digits split, no normalisation, <unk>=0 <s>=1 </s>=2)
# Usage: scripts/make_demo_data.sh [out folder, default build/demo] [vocab size, default 3000]
# Needs: jargon, sentencepiece (spm_train) and python3, all Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/demo}"
vocab="${2:-3000}"
source_file=/usr/share/info/jargon.info.gz

if [[ ! -r "$source_file" ]]; then
  echo "make_demo_data.sh: $source_file not found; install Debian's jargon package" \
       "(apt-get install jargon)" >&2
  exit 2
fi
if ! command -v spm_train >/dev/null; then
  echo "make_demo_data.sh: spm_train not found; install Debian's sentencepiece package" >&2
  exit 2
fi
mkdir -p "$out"

# Info nodes are separated by \x1f; each dictionary entry is a node. Menus and the tag table are
# navigation, not text; wrapped lines are joined into one line per paragraph.
python3 - "$source_file" "$out/jargon.jsonl" "$out/jargon.txt" <<'EOF'
import gzip, json, re, sys

source, jsonl_path, text_path = sys.argv[1:4]
with gzip.open(source, "rt", encoding="latin-1") as f:
    nodes = f.read().split("\x1f")
documents = []
for node in nodes:
    lines = node.strip("\n").split("\n")
    if not lines or not lines[0].startswith("File: "):
        continue
    title = re.search(r"Node: ([^,]*)", lines[0]).group(1).strip()
    body = []
    for line in lines[1:]:
        if line.startswith("* Menu:"):
            break
        body.append(line)
    paragraphs, current = [], []
    for line in body + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    text = "\n".join(paragraphs)
    if len(text) >= 40:
        documents.append({"title": title, "text": text})
with open(jsonl_path, "w", encoding="utf-8") as f:
    for doc in documents:
        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
with open(text_path, "w", encoding="utf-8") as f:
    for doc in documents:
        f.write(doc["text"] + "\n")
print(f"make_demo_data.sh: {len(documents)} documents, "
      f"{sum(len(d['text']) for d in documents)} characters", file=sys.stderr)
EOF

spm_train --input="$out/jargon.txt" --model_prefix="$out/tokenizer" --vocab_size="$vocab" \
  --model_type=bpe --byte_fallback=true --split_digits=true \
  --normalization_rule_name=identity --remove_extra_whitespaces=false \
  --character_coverage=1.0 --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 \
  --max_sentence_length=16384 --minloglevel=2
echo "make_demo_data.sh: wrote $out/jargon.jsonl, $out/jargon.txt, $out/tokenizer.model" >&2
