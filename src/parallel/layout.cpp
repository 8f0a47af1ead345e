#include "parallel/layout.h"

#include <string>

#include "io/error.h"

namespace fastllm {

void validate_layout(const Layout& l, const Architecture& a) {
  auto n = [](std::int64_t v) { return std::to_string(v); };
  if (l.tensor_parallel < 1)
    throw UserError("--tensor_parallel=" + n(l.tensor_parallel) + ": expected >= 1");
  if (l.pipeline_parallel < 1)
    throw UserError("--pipeline_parallel=" + n(l.pipeline_parallel) + ": expected >= 1");
  if (l.data_parallel < 1)
    throw UserError("--data_parallel=" + n(l.data_parallel) + ": expected >= 1");
  const int tp = l.tensor_parallel;
  if (a.num_attention_heads % tp != 0)
    throw UserError("--tensor_parallel=" + n(tp) +
                    " does not divide --num_attention_heads=" + n(a.num_attention_heads));
  if (a.head_groups % tp != 0 && tp % a.head_groups != 0)
    throw UserError("--tensor_parallel=" + n(tp) + " and --head_groups=" + n(a.head_groups) +
                    ": head groups must be a multiple of the tensor-parallel size or divide it");
  if (a.ffn_hidden_size % tp != 0)
    throw UserError("--tensor_parallel=" + n(tp) +
                    " does not divide --ffn_hidden_size=" + n(a.ffn_hidden_size));
  if (a.num_layers < l.pipeline_parallel)
    throw UserError("--pipeline_parallel=" + n(l.pipeline_parallel) + " exceeds --num_layers=" +
                    n(a.num_layers) + ": every stage needs at least one layer");
  const std::int64_t rows = vocab_per_rank(a.vocab_size, tp);
  if (a.vocab_size - (tp - 1) * rows < 1)
    throw UserError("--tensor_parallel=" + n(tp) + " splits --vocab_size=" + n(a.vocab_size) +
                    " into slices of " + n(rows) + " rows, leaving the last rank none");
}

Layout resolve_layout(const Options& options, int world_size, const Architecture& arch) {
  Layout l;
  l.tensor_parallel = static_cast<int>(options.get_int("tensor_parallel"));
  l.pipeline_parallel = static_cast<int>(options.get_int("pipeline_parallel"));
  l.zero_stage = static_cast<int>(options.get_int("zero_stage"));
  auto n = [](std::int64_t v) { return std::to_string(v); };
  if (l.tensor_parallel < 1)
    throw UserError("--tensor_parallel=" + n(l.tensor_parallel) + ": expected >= 1");
  if (l.pipeline_parallel < 1)
    throw UserError("--pipeline_parallel=" + n(l.pipeline_parallel) + ": expected >= 1");
  const int model_ranks = l.tensor_parallel * l.pipeline_parallel;
  if (world_size % model_ranks != 0)
    throw UserError("--tensor_parallel=" + n(l.tensor_parallel) + " x --pipeline_parallel=" +
                    n(l.pipeline_parallel) + " = " + n(model_ranks) + " does not divide the " +
                    n(world_size) + " MPI ranks; the world must be data x tensor x pipeline");
  l.data_parallel = world_size / model_ranks;
  validate_layout(l, arch);
  return l;
}

LayerRange stage_layers(std::int64_t num_layers, int stages, int stage) {
  const std::int64_t base = num_layers / stages, extra = num_layers % stages;
  LayerRange r;
  r.begin = stage * base + std::min<std::int64_t>(stage, extra);
  r.end = r.begin + base + (stage < extra ? 1 : 0);
  return r;
}

std::int64_t vocab_per_rank(std::int64_t vocab_size, int tensor_parallel) {
  return (vocab_size + tensor_parallel - 1) / tensor_parallel;
}

std::int64_t rank_parameters(const Architecture& a, const Layout& l, int stage) {
  const int tp = l.tensor_parallel;
  const std::int64_t h = a.hidden_size;
  const std::int64_t norm = a.normalization == NormType::LayerNorm ? 2 * h : h;
  // Key/value heads are split when there are enough of them, else each rank keeps one group.
  const std::int64_t kv = a.head_groups % tp == 0 ? a.kv_size() / tp : a.kv_channels;
  const std::int64_t q = a.q_size() / tp, f = a.ffn_hidden_size / tp;
  std::int64_t attention = h * q + 2 * h * kv + q * h;
  if (a.add_linear_biases) attention += q + 2 * kv + h;
  std::int64_t expert = (a.gated ? 3 : 2) * h * f;
  if (a.add_linear_biases) expert += (a.gated ? 2 : 1) * f + h;
  const std::int64_t mlp = a.is_moe() ? a.num_experts * (expert + h) : expert;
  const LayerRange layers = stage_layers(a.num_layers, l.pipeline_parallel, stage);
  std::int64_t total = (layers.end - layers.begin) * (attention + mlp + 2 * norm);
  const std::int64_t vocab_rows = vocab_per_rank(a.vocab_size, tp) * h;
  const bool first = stage == 0, last = stage == l.pipeline_parallel - 1;
  if (first) total += vocab_rows;
  if (last) total += norm;
  if (last && (!a.tie_word_embeddings || !first)) total += vocab_rows;
  return total;
}

}  // namespace fastllm
