#!/usr/bin/env bash
# Installs what is missing, builds, and shows what fastllm does today: the published
# Mistral-7B-v0.1 architecture, described by the tutorial's flags, inspected for a 64-GPU layout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja >/dev/null
cmake --build build -j "$(nproc)" --target fastllm

ARCHITECTURE_ARGS_MISTRAL=(
  --num_layers=32 --hidden_size=4096 --vocab_size=32000 --num_attention_heads=32 --head_groups=8
  --add_linear_biases=0 --ffn_hidden_size=14336 --kv_channels=128 --use_rotary_embeddings=1
  --rotary_embedding_scale=-9.210340371976184 --gated=1 --activation_type=silu
  --normalization_type=rms_norm --tie_word_embeddings=0 --window_size=4096
)
echo "== Mistral-7B-v0.1 on 64 GPUs: tensor 8 x data 8, ZeRO-1"
build/src/fastllm inspect "${ARCHITECTURE_ARGS_MISTRAL[@]}" --tensor_parallel=8 --data_parallel=8 --zero_stage=1
echo
echo "== Mixtral-8x7B (the same flags with --num_experts=8 --num_experts_per_token=2), 4 x 2 x 8"
build/src/fastllm inspect "${ARCHITECTURE_ARGS_MISTRAL[@]}" --num_experts=8 --num_experts_per_token=2 \
  --tensor_parallel=4 --pipeline_parallel=2 --data_parallel=8 --zero_stage=1 | tail -4
