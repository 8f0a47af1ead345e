#!/usr/bin/env bash
# A small Mistral trained from scratch on the demo's corpus as scripts/demo.sh trains it, exported in fp32 and bf16, then
# compared with transformers by check_generate.py.
#   test_export_generate.sh FASTLLM_BINARY PYTHON_WITH_TRANSFORMERS
set -euo pipefail
fastllm="$1"
python="$2"
here="$(cd "$(dirname "$0")" && pwd)"
if [[ ! -x "$python" ]]; then
  echo "test_export_generate: $python not found; FASTLLM_HF=1 scripts/setup.sh installs" \
       "transformers and PyTorch there" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

bash "$here/../../scripts/make_demo_data.sh" "$work" 3000 >/dev/null
"$fastllm" prepare --input "$work/jargon.jsonl" --tokenizer "$work/tokenizer.model" \
  --output "$work/jargon" >/dev/null
"$fastllm" train --num_layers=4 --hidden_size=128 --num_attention_heads=4 --head_groups=2 \
  --ffn_hidden_size=384 --vocab_size=3000 --window_size=0 --data_path="$work/jargon" \
  --split=100,0,0 --sequence_length=128 --batch_size=8 --micro_batch_size=8 --lr=3e-3 \
  --lr_warmup_iters=20 --lr_decay_style=cosine --min_lr=3e-4 --weight_decay=0.1 --clip_grad=1.0 \
  --adam_beta2=0.95 --train_iters=300 --log_interval=100 --save="$work/run" >/dev/null
for dtype in fp32 bf16; do
  "$fastllm" export --load="$work/run" --output="$work/hf-$dtype" --dtype="$dtype" \
    --tokenizer="$work/tokenizer.model" >/dev/null
  "$python" "$here/check_generate.py" "$fastllm" "$work/hf-$dtype" "$work/jargon.txt"
done
