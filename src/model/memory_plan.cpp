#include "model/memory_plan.h"

#include <algorithm>

namespace fastllm {

// Each term is one buffer of model.cpp (same names), in bytes.
ActivationMemory activation_memory(const Architecture& arch, const Layout& layout, int stage,
                                   const ActivationShape& shape) {
  const double T = static_cast<double>(shape.micro_batch_size * shape.sequence_length);
  const double w = static_cast<double>(shape.dtype_bytes), f32 = 4.0;
  const double H = static_cast<double>(arch.hidden_size);
  const int tp = layout.tensor_parallel;
  const double heads = static_cast<double>(arch.num_attention_heads / tp);
  const double Q = heads * static_cast<double>(arch.kv_channels);
  const double K = static_cast<double>(layout.kv_heads_per_rank(arch) * arch.kv_channels);
  const double F = static_cast<double>(arch.ffn_hidden_size / tp);
  const double V = static_cast<double>(layout.vocab_slice(arch.vocab_size, 0).rows);
  const double E = static_cast<double>(arch.num_experts);
  const double k = static_cast<double>(arch.num_experts_per_token);
  // Sequence parallelism leaves each rank 1/TP of the rows outside the tensor-parallel regions
  // (norms, residuals), and gathers them whole around the GEMMs.
  const bool sp = layout.sequence_parallel && tp > 1;
  const double R = sp ? T / tp : T;
  const double gathered = sp ? T * H * w : 0.0;
  const double norm_stats = 2 * R * f32;  // mean and rstd

  // AttentionActivations: h, mean, rstd, q, k, v, out, lse, y.
  const double attention_h = R * H * w;
  const double attention_all = attention_h + norm_stats + T * Q * w + 2 * T * K * w + T * Q * w +
                               T * heads * f32 + R * H * w;
  // MlpActivations: h, mean, rstd, gate, up, act, y, and for MoE the routing and the expert rows.
  const double mlp_h = R * H * w, layer_output = R * H * w;
  double mlp_act = 0, mlp_all = 0;
  if (arch.is_moe()) {
    mlp_act = T * k * F * w;
    mlp_all = mlp_h + norm_stats + T * E * f32 + 5 * T * k * f32 + 2 * T * k * H * w + 3 * mlp_act +
              layer_output;
  } else {
    mlp_act = T * F * w;
    mlp_all = mlp_h + norm_stats + 3 * mlp_act + layer_output;
  }
  const double layer_all = attention_all + mlp_all;
  double layer_kept = layer_all;
  if (shape.recompute == Recompute::Selective) layer_kept -= attention_h + mlp_h + mlp_act;
  if (shape.recompute == Recompute::Full) layer_kept = layer_output;

  const LayerRange layers = layout.stage_layers(arch.num_layers, stage);
  const double count = static_cast<double>(layers.end - layers.begin);
  const bool first = stage == 0, last = stage == layout.pipeline_parallel - 1;
  // The stage's input (the embeddings on the first stage), the ids and the router sums.
  double per_micro_batch = R * H * w + (first ? T * f32 : 0.0) + (arch.is_moe() ? 2 * E * f32 : 0);
  // The last stage keeps its last layer whole: the head uses it at once.
  per_micro_batch += last ? (count - 1) * layer_kept + layer_all : count * layer_kept;

  ActivationMemory m;
  m.activations = per_micro_batch * static_cast<double>(std::max<std::int64_t>(1, shape.in_flight));
  // The head: mean_f, rstd_f, xf, the logits, and the loss's targets and softmax statistics.
  if (last) m.logits = norm_stats + R * H * w + T * V * w + 3 * T * f32;

  // Backward of one layer: the gradient flowing back (dres, and the MoE per-expert gradient), the
  // larger of the attention's and the MLP's working sets (with sequence parallelism the gathered
  // output gradient and norm output on top), and what replaying the layer allocates (the last
  // stage's first layer backward replays nothing).
  const double input_grads = T * H * w + R * H * w;  // dh of every row, then this rank's
  const double attention_grads = 2 * T * Q * w + 2 * T * K * w + input_grads + 2 * gathered;
  const double mlp_grads =
      arch.is_moe() ? 2 * T * k * f32 + 2 * T * k * H * w + input_grads + T * E * f32 + 3 * gathered
                    : input_grads + 2 * gathered;
  double replay = 0;
  if (!last && shape.recompute == Recompute::Selective) replay = attention_h + mlp_h + mlp_act;
  if (!last && shape.recompute == Recompute::Full) replay = layer_all - layer_output;
  m.transient =
      R * H * w + (arch.is_moe() ? E * f32 : 0.0) + std::max(attention_grads, mlp_grads) + replay;
  return m;
}

}  // namespace fastllm
