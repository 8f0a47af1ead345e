#!/usr/bin/env bash
# The embedded default, end to end on this machine: installs what is missing, builds, inspects the
# published Mistral-7B architecture, then trains a small Mistral-architecture model from scratch
# on the Jargon File (public domain, Debian's `jargon` package) with a SentencePiece tokenizer
# trained on it: prepare, train, save, resume, export to Hugging Face format, plot.
#   scripts/demo.sh [OUT_DIR, default build/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/demo}"
bash scripts/setup.sh
cmake -S . -B build -G Ninja >/dev/null
cmake --build build -j "$(nproc)" --target fastllm
fastllm=build/src/fastllm
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

ARCHITECTURE_ARGS_MISTRAL=(
  --num_layers=32 --hidden_size=4096 --vocab_size=32000 --num_attention_heads=32 --head_groups=8
  --add_linear_biases=0 --ffn_hidden_size=14336 --kv_channels=128 --use_rotary_embeddings=1
  --rotary_embedding_scale=-9.210340371976184 --gated=1 --activation_type=silu
  --normalization_type=rms_norm --tie_word_embeddings=0 --window_size=4096
)
echo "== 1. Mistral-7B-v0.1 (the tutorial's flags) on 64 GPUs: tensor 8 x data 8, ZeRO-1"
"$fastllm" inspect "${ARCHITECTURE_ARGS_MISTRAL[@]}" --tensor_parallel=8 --data_parallel=8 --zero_stage=1
echo

echo "== 2. Corpus and tokenizer: the Jargon File, SentencePiece BPE with 3000 pieces"
bash scripts/make_demo_data.sh "$out" 3000
echo
echo "== 3. fastllm prepare: JSONL -> Megatron indexed dataset"
"$fastllm" prepare --input "$out/jargon.jsonl" --tokenizer "$out/tokenizer.model" --output "$out/jargon"
echo

run="$out/run"
rm -rf "$run" "$out/hf"
TRAIN_ARGS=(
  --num_layers=4 --hidden_size=128 --num_attention_heads=4 --head_groups=2 --ffn_hidden_size=384
  --vocab_size=3000 --window_size=0
  --data_path="$out/jargon" "--split=95,5,0" --sequence_length=128
  --batch_size=8 --micro_batch_size=4
  --lr=3e-3 --min_lr=3e-4 --lr_warmup_iters=20 --lr_decay_style=cosine --lr_decay_iters=300
  --weight_decay=0.1 --clip_grad=1.0 --adam_beta2=0.95
  --log_interval=20 --eval_interval=50 --eval_iters=8
  --save="$run" --load="$run" --save_interval=100
)
echo "== 4. fastllm train from scratch: 200 iterations, a checkpoint every 100"
"$fastllm" train "${TRAIN_ARGS[@]}" --train_iters=200
echo
echo "== 5. fastllm train again with --train_iters=300: resumes from the newest checkpoint"
"$fastllm" train "${TRAIN_ARGS[@]}" --train_iters=300
echo
echo "== 6. fastllm export: the trained model as a Hugging Face folder"
"$fastllm" export --load="$run" --output="$out/hf" --dtype=bf16 --tokenizer="$out/tokenizer.model"
echo
bash scripts/plot_metrics.sh "$run" >/dev/null

first=$(grep -m1 eval_loss "$run/metrics.jsonl")
last=$(grep eval_loss "$run/metrics.jsonl" | tail -n 1)
echo "== Done"
echo "validation loss: first evaluation $first"
echo "                 last evaluation  $last"
echo "dataset:     $out/jargon.bin, $out/jargon.idx (tokenizer $out/tokenizer.model)"
echo "checkpoints: $run/checkpoint-*.h5 (config $run/config.json, metrics $run/metrics.jsonl)"
echo "plot:        $run/metrics.png"
echo "hugging face folder: $out/hf (config.json, generation_config.json, model.safetensors, tokenizer)"
