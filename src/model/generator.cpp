#include "model/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

namespace fastllm {

std::int32_t choose_token(const std::vector<float>& logits, double temperature, double top_p,
                          double uniform) {
  if (logits.empty()) throw std::invalid_argument("choose_token: no logits");
  // The first maximum, as torch.argmax.
  const auto best = std::max_element(logits.begin(), logits.end());
  if (temperature <= 0) return static_cast<std::int32_t>(best - logits.begin());
  std::vector<double> p(logits.size());
  for (std::size_t i = 0; i < p.size(); ++i)
    p[i] = std::exp((static_cast<double>(logits[i]) - *best) / temperature);
  std::vector<std::int32_t> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int32_t a, std::int32_t b) { return p[a] > p[b]; });
  const double total = std::accumulate(p.begin(), p.end(), 0.0);
  // The nucleus: the most probable tokens until their mass reaches top_p (at least one).
  double kept = 0;
  std::size_t count = 0;
  while (count < order.size() && (count == 0 || kept < top_p * total))
    kept += p[order[count++]];
  double target = uniform * kept;
  for (std::size_t i = 0; i < count; ++i) {
    target -= p[order[i]];
    if (target < 0) return order[i];
  }
  return order[count - 1];
}

Generator::Generator(Model& model, const RunSettings& run, Communicator* stages)
    : model_(model),
      backend_(model.backend()),
      arch_(model.arch()),
      run_(run),
      partition_(model.partition()),
      stages_(stages) {
  const Layout& layout = partition_.layout;
  stage_count_ = layout.pipeline_parallel;
  stage_ = partition_.at.pp;
  if (stage_count_ > 1 && (!stages_ || stages_->size() != stage_count_))
    throw std::invalid_argument("Generator: a pipeline-parallel model needs its stage group");
  heads_ = arch_.num_attention_heads / layout.tensor_parallel;
  groups_ = layout.kv_heads_per_rank(arch_);
  StageWeights wired = wire_stage(arch_, partition_, model.parameters());
  for (LayerWeights& weights : wired.layers)
    layers_.push_back({std::move(weights), {}, {}});
  embedding_ = wired.embedding;
  final_norm_ = wired.final_norm;
  final_norm_bias_ = wired.final_norm_bias;
  lm_head_ = wired.lm_head;
}

DeviceArray Generator::allocate(DType dtype, std::initializer_list<std::int64_t> shape) {
  return device_array(backend_, dtype, shape);
}

void Generator::tp_sum(Tensor t) {
  if (partition_.layout.tensor_parallel > 1) partition_.tensor->all_reduce(t, ReduceOp::Sum);
}

// The bias of a row-parallel layer is added once, by tensor-parallel rank 0, before the sum.
const Parameter* Generator::row_parallel_bias(const Parameter* bias) const {
  return partition_.at.tp == 0 ? bias : nullptr;
}

void Generator::linear(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y) {
  backend_.linear_forward(x, weight->weight, bias ? bias->weight : Tensor(), y);
}

DeviceArray Generator::norm(Tensor x, const Parameter* weight, const Parameter* bias) {
  const std::int64_t rows = x.size(0);
  DeviceArray mean = allocate(DType::F32, {rows}), rstd = allocate(DType::F32, {rows});
  DeviceArray y = allocate(backend_.compute_dtype(), {rows, x.size(1)});
  const auto eps = static_cast<float>(arch_.norm_epsilon);
  if (arch_.normalization == NormType::LayerNorm) {
    backend_.layernorm_forward(x, weight->weight, bias->weight, eps, y.t, mean.t, rstd.t);
  } else {
    backend_.rmsnorm_forward(x, weight->weight, eps, y.t, rstd.t);
  }
  return y;
}

// x += o(attention(rope(q(h)), cached rope(k(h)), cached v(h))), h = norm1(x). The prefill runs
// the training attention over the prompt; later steps attend to the cache.
void Generator::attention(Layer& layer, Tensor x, std::int64_t offset) {
  const std::int64_t n = x.size(0), d = arch_.kv_channels;
  const DType dt = backend_.compute_dtype();
  const DeviceArray h = norm(x, layer.norm1, layer.norm1_bias);
  DeviceArray q = allocate(dt, {n, heads_ * d}), k = allocate(dt, {n, groups_ * d}),
              v = allocate(dt, {n, groups_ * d});
  linear(h.t, layer.q, layer.q_bias, q.t);
  linear(h.t, layer.k, layer.k_bias, k.t);
  linear(h.t, layer.v, layer.v_bias, v.t);
  const double theta = arch_.rope_theta();
  const Tensor q4 = q.t.view({1, n, heads_, d}), k4 = k.t.view({1, n, groups_, d});
  backend_.rope_at(q4, theta, offset);
  backend_.rope_at(k4, theta, offset);
  const std::int64_t capacity = layer.k_cache.t.size(1);
  backend_.copy(layer.k_cache.t.view({capacity, groups_ * d}).rows(offset, n), k.t);
  backend_.copy(layer.v_cache.t.view({capacity, groups_ * d}).rows(offset, n), v.t);
  DeviceArray out = allocate(dt, {n, heads_ * d});
  const Tensor out4 = out.t.view({1, n, heads_, d});
  if (offset == 0) {
    DeviceArray lse = allocate(DType::F32, {1, heads_, n});
    backend_.attention_forward(q4, k4, v.t.view({1, n, groups_, d}), run_.window_size, out4, lse.t);
  } else {
    backend_.attention_cached(q4, layer.k_cache.t, layer.v_cache.t, offset, run_.window_size, out4);
  }
  DeviceArray y = allocate(dt, {n, arch_.hidden_size});
  linear(out.t, layer.o, row_parallel_bias(layer.o_bias), y.t);
  tp_sum(y.t);
  backend_.add(x, y.t, 1.0f);
}

void Generator::mlp(const Layer& layer, Tensor x) {
  const DeviceArray h = norm(x, layer.norm2, layer.norm2_bias);
  const std::int64_t rows = x.size(0), f = layer.mlps[0].up->shape[0];
  const DType dt = backend_.compute_dtype();
  DeviceArray gate = allocate(dt, {rows, f}), up = allocate(dt, {rows, f}),
              act = allocate(dt, {rows, f}), y = allocate(dt, {rows, arch_.hidden_size});
  model_.expert_forward(layer.mlps[0], h.t, gate.t, up.t, act.t, y.t);
  tp_sum(y.t);
  backend_.add(x, y.t, 1.0f);
}

// The router is whole on every rank, so every tensor-parallel rank routes alike, as in training.
void Generator::moe(const Layer& layer, Tensor x) {
  const std::int64_t tokens = x.size(0), hidden = arch_.hidden_size;
  const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
  const std::int64_t slots = tokens * k;
  const DType dt = backend_.compute_dtype();
  const DeviceArray h = norm(x, layer.norm2, layer.norm2_bias);
  DeviceArray logits = allocate(DType::F32, {tokens, experts});
  linear(h.t, layer.router, nullptr, logits.t);
  DeviceArray probs = allocate(DType::F32, {tokens, experts});
  DeviceArray topk_index = allocate(DType::I32, {tokens, k});
  DeviceArray topk_weight = allocate(DType::F32, {tokens, k});
  backend_.router_forward(logits.t, static_cast<int>(k), probs.t, topk_index.t, topk_weight.t);
  DeviceArray sorted_token = allocate(DType::I32, {slots}),
              sorted_slot = allocate(DType::I32, {slots});
  DeviceArray offsets = allocate(DType::I32, {experts + 1});
  backend_.moe_permute_offsets(topk_index.t, static_cast<int>(experts), sorted_token.t,
                               sorted_slot.t, offsets.t);
  DeviceArray slot_weight = allocate(DType::F32, {slots, 1});
  backend_.gather_rows(topk_weight.t.view({slots, 1}), sorted_slot.t, slot_weight.t);
  DeviceArray rows_in = allocate(dt, {slots, hidden}), rows_out = allocate(dt, {slots, hidden});
  backend_.gather_rows(h.t, sorted_token.t, rows_in.t);
  const std::int64_t f = layer.mlps[0].up->shape[0];
  DeviceArray gate = allocate(dt, {slots, f}), up = allocate(dt, {slots, f}),
              act = allocate(dt, {slots, f});
  model_.expert_forward(layer.mlps, offsets.t, rows_in.t, gate.t, up.t, act.t, rows_out.t);
  DeviceArray y = allocate(dt, {tokens, hidden});
  backend_.fill(y.t, 0.0f);
  backend_.scatter_add_rows(rows_out.t, sorted_token.t, slot_weight.t.view({slots}), y.t);
  tp_sum(y.t);
  backend_.add(x, y.t, 1.0f);
}

std::vector<float> Generator::step(const std::vector<std::int32_t>& ids, std::int64_t offset) {
  const auto n = static_cast<std::int64_t>(ids.size());
  DeviceArray x = allocate(backend_.compute_dtype(), {n, arch_.hidden_size});
  const VocabSlice vocab = model_.vocab();
  if (stage_ == 0) {
    DeviceArray device_ids = allocate(DType::I32, {n});
    backend_.copy_from_host(device_ids.t, ids.data());
    // Each rank embeds the ids of its vocabulary rows (zeros elsewhere); the sum is the embedding.
    backend_.embedding_forward(device_ids.t, embedding_->weight, vocab.begin, x.t);
    tp_sum(x.t);
  } else {
    stages_->recv(x.t, stage_ - 1);
  }
  for (Layer& layer : layers_) {
    attention(layer, x.t, offset);
    if (layer.router) {
      moe(layer, x.t);
    } else {
      mlp(layer, x.t);
    }
  }
  if (stage_ < stage_count_ - 1) {
    stages_->send(x.t, stage_ + 1);
    return {};
  }
  const DeviceArray xf = norm(x.t.rows(n - 1, 1), final_norm_, final_norm_bias_);
  DeviceArray logits = allocate(backend_.compute_dtype(), {1, vocab.rows});
  linear(xf.t, lm_head_, nullptr, logits.t);
  const Layout& layout = partition_.layout;
  const std::int64_t vocab_size = arch_.vocab_size;
  std::vector<float> whole(static_cast<std::size_t>(vocab_size));
  if (layout.tensor_parallel == 1) {
    model_.copy_to_host_f32(whole.data(), logits.t);
    return whole;
  }
  // The slices, padded to the first (longest) one's length, gathered over the tensor group.
  const int tp = layout.tensor_parallel;
  const std::int64_t width = layout.vocab_slice(vocab_size, 0).rows;
  DeviceArray padded = allocate(DType::F32, {width});
  backend_.fill(padded.t, 0.0f);
  backend_.copy(padded.t.rows(0, vocab.rows), logits.t.view({vocab.rows}));
  DeviceArray gathered = allocate(DType::F32, {tp * width});
  partition_.tensor->all_gather(padded.t, gathered.t);
  std::vector<float> blocks(static_cast<std::size_t>(tp * width));
  backend_.copy_to_host(blocks.data(), gathered.t);
  for (int r = 0; r < tp; ++r) {
    const VocabSlice slice = layout.vocab_slice(vocab_size, r);
    std::copy_n(blocks.begin() + r * width, slice.rows, whole.begin() + slice.begin);
  }
  return whole;
}

std::int32_t Generator::share_token(std::int32_t token) {
  DeviceArray t = allocate(DType::I32, {1});
  backend_.copy_from_host(t.t, &token);
  if (stage_ == stage_count_ - 1 && partition_.layout.tensor_parallel > 1)
    partition_.tensor->broadcast(t.t, 0);
  if (stage_count_ > 1) stages_->broadcast(t.t, stage_count_ - 1);
  backend_.copy_to_host(&token, t.t);
  return token;
}

std::vector<std::int32_t> Generator::generate(const std::vector<std::int32_t>& prompt,
                                              const GenerationSettings& settings) {
  if (prompt.empty()) throw std::invalid_argument("Generator::generate: empty prompt");
  if (settings.max_new_tokens < 0)
    throw std::invalid_argument("Generator::generate: max_new_tokens < 0");
  for (std::int32_t id : prompt) {
    if (id < 0 || id >= arch_.vocab_size)
      throw std::invalid_argument("Generator::generate: token id " + std::to_string(id) +
                                  " is outside the vocabulary");
  }
  const auto capacity = static_cast<std::int64_t>(prompt.size()) + settings.max_new_tokens;
  const DType dt = backend_.compute_dtype();
  for (Layer& layer : layers_) {
    layer.k_cache = allocate(dt, {1, capacity, groups_, arch_.kv_channels});
    layer.v_cache = allocate(dt, {1, capacity, groups_, arch_.kv_channels});
  }
  std::mt19937_64 rng(settings.seed);
  const bool decides = stage_ == stage_count_ - 1 && partition_.at.tp == 0;
  std::vector<std::int32_t> out;
  std::vector<std::int32_t> input = prompt;
  std::int64_t offset = 0;
  while (static_cast<std::int64_t>(out.size()) < settings.max_new_tokens) {
    const std::vector<float> logits = step(input, offset);
    offset += static_cast<std::int64_t>(input.size());
    // 53 random bits: the same uniform number on every platform for a seed.
    const double uniform = static_cast<double>(rng() >> 11) * 0x1p-53;
    std::int32_t token = 0;
    if (decides) token = choose_token(logits, settings.temperature, settings.top_p, uniform);
    token = share_token(token);
    out.push_back(token);
    if (std::ranges::find(settings.eos_ids, token) != settings.eos_ids.end()) break;
    input.assign(1, token);
  }
  for (Layer& layer : layers_) {
    layer.k_cache = {};
    layer.v_cache = {};
  }
  return out;
}

}  // namespace fastllm
