#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <stdexcept>

#include "parallel/layout.h"

namespace fastllm {

Model::DeviceArray Model::allocate(DType dtype, std::initializer_list<std::int64_t> shape) {
  DeviceArray a;
  const Tensor probe(nullptr, dtype, shape);
  a.buffer = backend_.allocate(probe.bytes());
  a.t = a.buffer.tensor(dtype, shape);
  return a;
}

namespace {

Tensor shaped(void* data, DType dtype, const std::vector<std::int64_t>& shape) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.rank = static_cast<int>(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i)
    t.dims[i] = shape[i];
  return t;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// How a parameter is cut over tensor-parallel ranks (Megatron): column-parallel layers split their
// output rows, row-parallel ones their input columns, the vocabulary its rows; norms, the router
// and the biases added after a row-parallel sum are whole on every rank.
enum class Split { Whole, Column, Row, KeyValue, Vocab };

Split split_of(const std::string& name) {
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return Split::Vocab;
  for (const char* kv : {"self_attn.k_proj.", "self_attn.v_proj."}) {
    if (name.find(kv) != std::string::npos) return Split::KeyValue;
  }
  for (const char* row : {"self_attn.o_proj.weight", "mlp.down_proj.weight", ".w2.weight"}) {
    if (ends_with(name, row)) return Split::Row;
  }
  for (const char* column :
       {"self_attn.q_proj.", "mlp.gate_proj.", "mlp.up_proj.", ".w1.", ".w3."}) {
    if (name.find(column) != std::string::npos) return Split::Column;
  }
  return Split::Whole;
}

// The layer a parameter belongs to, or -1 for the embedding, final norm and LM head.
std::int64_t layer_of(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return -1;
  return std::stoll(name.substr(prefix.size()));
}

}  // namespace

std::vector<ParameterShape> parameter_shapes(const Architecture& arch) {
  const std::int64_t h = arch.hidden_size, f = arch.ffn_hidden_size;
  const bool layer_norm = arch.normalization == NormType::LayerNorm;
  std::vector<ParameterShape> out;
  auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
    out.push_back({name, std::move(shape)});
  };
  auto add_norm = [&](const std::string& name) {
    add(name + ".weight", {h});
    if (layer_norm) add(name + ".bias", {h});
  };
  auto add_linear = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    add(name + ".weight", {rows, cols});
    if (arch.add_linear_biases) add(name + ".bias", {rows});
  };
  auto add_mlp = [&](const std::string& gate, const std::string& up, const std::string& down) {
    if (arch.gated) add_linear(gate, f, h);
    add_linear(up, f, h);
    add_linear(down, h, f);
  };

  add("model.embed_tokens.weight", {arch.vocab_size, h});
  for (std::int64_t l = 0; l < arch.num_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    add_norm(prefix + "input_layernorm");
    add_linear(prefix + "self_attn.q_proj", arch.q_size(), h);
    add_linear(prefix + "self_attn.k_proj", arch.kv_size(), h);
    add_linear(prefix + "self_attn.v_proj", arch.kv_size(), h);
    add_linear(prefix + "self_attn.o_proj", h, arch.q_size());
    add_norm(prefix + "post_attention_layernorm");
    if (arch.is_moe()) {
      add(prefix + "block_sparse_moe.gate.weight", {arch.num_experts, h});
      for (std::int64_t e = 0; e < arch.num_experts; ++e) {
        const std::string expert = prefix + "block_sparse_moe.experts." + std::to_string(e) + ".";
        add_mlp(expert + "w1", expert + "w3", expert + "w2");
      }
    } else {
      add_mlp(prefix + "mlp.gate_proj", prefix + "mlp.up_proj", prefix + "mlp.down_proj");
    }
  }
  add_norm("model.norm");
  if (!arch.tie_word_embeddings) add("lm_head.weight", {arch.vocab_size, h});
  return out;
}

std::vector<Parameter> partition_parameters(const Architecture& arch,
                                            const ModelPartition& partition) {
  const int tp = partition.tensor_parallel, tp_rank = partition.tp_rank;
  const std::int64_t vocab_slice = vocab_per_rank(arch.vocab_size, tp);
  const std::int64_t vocab_begin = tp_rank * vocab_slice;
  const std::int64_t vocab_rows = std::min(vocab_slice, arch.vocab_size - vocab_begin);
  const LayerRange stage =
      stage_layers(arch.num_layers, partition.pipeline_parallel, partition.pp_rank);
  const bool first = partition.pp_rank == 0;
  const bool last = partition.pp_rank == partition.pipeline_parallel - 1;
  // Key/value heads shared by several tensor-parallel ranks when there are fewer than ranks.
  const int kv_replicas = arch.head_groups % tp == 0 ? 1 : tp / static_cast<int>(arch.head_groups);

  std::vector<Parameter> out;
  auto add = [&](const ParameterShape& whole, std::size_t index) {
    Parameter p;
    p.name = whole.name;
    p.index = index;
    p.global_shape = whole.shape;
    p.shape = whole.shape;
    p.decay = p.shape.size() >= 2;
    auto cut = [&](int axis, std::int64_t begin, std::int64_t count) {
      p.split_axis = axis;
      p.split_begin = begin;
      p.shape[axis] = count;
    };
    if (tp > 1) {
      switch (split_of(p.name)) {
        case Split::Whole:
          p.primary = tp_rank == 0;
          break;
        case Split::Column:
          cut(0, tp_rank * (whole.shape[0] / tp), whole.shape[0] / tp);
          break;
        case Split::Row:
          cut(1, tp_rank * (whole.shape[1] / tp), whole.shape[1] / tp);
          break;
        case Split::KeyValue:
          if (kv_replicas == 1) {
            cut(0, tp_rank * (whole.shape[0] / tp), whole.shape[0] / tp);
          } else {
            cut(0, (tp_rank / kv_replicas) * arch.kv_channels, arch.kv_channels);
            p.primary = tp_rank % kv_replicas == 0;
            p.sync = GradientSync::KvReplicas;
          }
          break;
        case Split::Vocab:
          cut(0, vocab_begin, vocab_rows);
          break;
      }
    }
    p.numel = 1;
    for (auto d : p.shape)
      p.numel *= d;
    p.offset = out.empty() ? 0 : out.back().offset + out.back().numel;
    out.push_back(std::move(p));
  };

  const bool tied_across_stages = arch.tie_word_embeddings && !(first && last);
  const std::vector<ParameterShape> shapes = parameter_shapes(arch);
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::string& name = shapes[i].name;
    const std::int64_t layer = layer_of(name);
    bool held = false;
    if (name == "model.embed_tokens.weight") {
      held = first;
    } else if (layer >= 0) {
      held = layer >= stage.begin && layer < stage.end;
    } else {
      held = last;
    }
    if (!held) continue;
    add(shapes[i], i);
    if (tied_across_stages && name == "model.embed_tokens.weight")
      out.back().sync = GradientSync::TiedEmbedding;
  }
  if (tied_across_stages && last) {
    add(shapes[0], 0);  // the LM head: a copy of the first stage's embedding
    out.back().primary = false;
    out.back().sync = GradientSync::TiedEmbedding;
  }
  return out;
}

std::vector<float> local_part(const Parameter& p, std::span<const float> whole) {
  if (p.split_axis < 0) return {whole.begin(), whole.end()};
  std::vector<float> out(static_cast<std::size_t>(p.numel));
  if (p.split_axis == 0) {
    const std::int64_t row = p.shape.size() > 1 ? p.shape[1] : 1;
    std::copy_n(whole.begin() + p.split_begin * row, p.numel, out.begin());
    return out;
  }
  const std::int64_t cols = p.global_shape[1], local_cols = p.shape[1];
  for (std::int64_t r = 0; r < p.shape[0]; ++r)
    std::copy_n(whole.begin() + r * cols + p.split_begin, local_cols, out.begin() + r * local_cols);
  return out;
}

void place_part(const Parameter& p, std::span<const float> part, std::span<float> whole) {
  if (p.split_axis < 0) {
    std::copy(part.begin(), part.end(), whole.begin());
  } else if (p.split_axis == 0) {
    const std::int64_t row = p.shape.size() > 1 ? p.shape[1] : 1;
    std::copy(part.begin(), part.end(), whole.begin() + p.split_begin * row);
  } else {
    const std::int64_t cols = p.global_shape[1], local_cols = p.shape[1];
    for (std::int64_t r = 0; r < p.shape[0]; ++r)
      std::copy_n(part.begin() + r * local_cols, local_cols,
                  whole.begin() + r * cols + p.split_begin);
  }
}

Model::Model(Backend& backend, const Architecture& arch, const RunSettings& run,
             const ModelPartition& partition)
    : backend_(backend),
      arch_(arch),
      run_(run),
      partition_(partition),
      parameters_(partition_parameters(arch, partition)) {
  const int tp = partition.tensor_parallel;
  if (tp > 1 && !partition.tensor)
    throw std::invalid_argument("Model: a tensor-parallel partition needs its communicator");
  heads_ = arch.num_attention_heads / tp;
  groups_ = arch.head_groups % tp == 0 ? arch.head_groups / tp : 1;
  ffn_ = arch.ffn_hidden_size / tp;
  const std::int64_t vocab_slice = vocab_per_rank(arch.vocab_size, tp);
  vocab_begin_ = partition.tp_rank * vocab_slice;
  vocab_rows_ = std::min(vocab_slice, arch.vocab_size - vocab_begin_);
  const LayerRange stage =
      stage_layers(arch.num_layers, partition.pipeline_parallel, partition.pp_rank);

  const std::int64_t total = parameters_.back().offset + parameters_.back().numel;
  const std::int64_t align = std::max<std::int64_t>(1, partition.flat_alignment);
  const std::int64_t padded = (total + align - 1) / align * align;
  const DType dtype = backend_.compute_dtype();
  weights_buffer_ = backend_.allocate(static_cast<std::size_t>(padded) * dtype_size(dtype));
  grads_buffer_ = backend_.allocate(static_cast<std::size_t>(padded) * sizeof(float));
  padded_weights_ = weights_buffer_.tensor(dtype, {padded});
  padded_grads_ = grads_buffer_.tensor(DType::F32, {padded});
  flat_weights_ = padded_weights_.rows(0, total);
  flat_grads_ = padded_grads_.rows(0, total);
  backend_.fill(padded_weights_, 0.0f);
  std::map<std::string, const Parameter*> by_name;
  for (Parameter& p : parameters_) {
    p.weight = shaped(static_cast<char*>(weights_buffer_.data()) + p.offset * dtype_size(dtype),
                      dtype, p.shape);
    p.grad = shaped(static_cast<float*>(grads_buffer_.data()) + p.offset, DType::F32, p.shape);
    by_name.emplace(p.name, &p);
  }
  auto find = [&](const std::string& name) -> const Parameter* {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : it->second;
  };
  auto mlp_of = [&](const std::string& gate, const std::string& up, const std::string& down) {
    Mlp m;
    m.gate = find(gate + ".weight");
    m.up = find(up + ".weight");
    m.down = find(down + ".weight");
    m.gate_bias = find(gate + ".bias");
    m.up_bias = find(up + ".bias");
    m.down_bias = find(down + ".bias");
    return m;
  };
  for (std::int64_t l = stage.begin; l < stage.end; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    Layer layer;
    layer.norm1 = find(prefix + "input_layernorm.weight");
    layer.norm1_bias = find(prefix + "input_layernorm.bias");
    layer.norm2 = find(prefix + "post_attention_layernorm.weight");
    layer.norm2_bias = find(prefix + "post_attention_layernorm.bias");
    layer.q = find(prefix + "self_attn.q_proj.weight");
    layer.k = find(prefix + "self_attn.k_proj.weight");
    layer.v = find(prefix + "self_attn.v_proj.weight");
    layer.o = find(prefix + "self_attn.o_proj.weight");
    layer.q_bias = find(prefix + "self_attn.q_proj.bias");
    layer.k_bias = find(prefix + "self_attn.k_proj.bias");
    layer.v_bias = find(prefix + "self_attn.v_proj.bias");
    layer.o_bias = find(prefix + "self_attn.o_proj.bias");
    if (arch.is_moe()) {
      layer.router = find(prefix + "block_sparse_moe.gate.weight");
      for (std::int64_t e = 0; e < arch.num_experts; ++e) {
        const std::string expert = prefix + "block_sparse_moe.experts." + std::to_string(e) + ".";
        layer.mlps.push_back(mlp_of(expert + "w1", expert + "w3", expert + "w2"));
      }
    } else {
      layer.mlps.push_back(
          mlp_of(prefix + "mlp.gate_proj", prefix + "mlp.up_proj", prefix + "mlp.down_proj"));
    }
    layers_.push_back(std::move(layer));
  }
  if (first_stage()) embedding_ = find("model.embed_tokens.weight");
  if (last_stage()) {
    final_norm_ = find("model.norm.weight");
    final_norm_bias_ = find("model.norm.bias");
    if (!arch.tie_word_embeddings) {
      lm_head_ = find("lm_head.weight");
    } else {
      lm_head_ = first_stage() ? embedding_ : &parameters_.back();
    }
  }
  zero_grads();
}

const Parameter& Model::parameter(const std::string& name) const {
  for (const Parameter& p : parameters_) {
    if (p.name == name) return p;
  }
  throw std::out_of_range("no parameter named " + name);
}

void Model::initialize(std::uint64_t seed, double std) {
  std::normal_distribution<double> normal(0.0, std);
  std::vector<float> values;
  for (const Parameter& p : parameters_) {
    std::seed_seq seeds{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                        static_cast<std::uint32_t>(p.index)};
    std::mt19937_64 gen(seeds);
    normal.reset();
    const bool is_bias = p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
    if (p.shape.size() >= 2) {
      std::int64_t whole = 1;
      for (auto d : p.global_shape)
        whole *= d;
      values.resize(static_cast<std::size_t>(whole));
      for (auto& v : values)
        v = static_cast<float>(normal(gen));
      values = local_part(p, values);
    } else {
      values.assign(static_cast<std::size_t>(p.numel), is_bias ? 0.0f : 1.0f);
    }
    write_weight(p, values.data());
  }
}

void Model::write_weight(const Parameter& p, const float* values) {
  if (p.weight.dtype == DType::F32) {
    backend_.copy_from_host(p.weight, values);
    return;
  }
  DeviceArray staging = allocate(DType::F32, {p.numel});
  backend_.copy_from_host(staging.t, values);
  backend_.copy(p.weight.view({p.numel}), staging.t);
}

void Model::copy_to_host_f32(float* out, Tensor src) {
  if (src.dtype == DType::F32) {
    backend_.copy_to_host(out, src);
    return;
  }
  DeviceArray staging = allocate(DType::F32, {src.numel()});
  backend_.copy(staging.t, src.view({src.numel()}));
  backend_.copy_to_host(out, staging.t);
}

std::vector<float> Model::read_weight(const Parameter& p) {
  std::vector<float> out(static_cast<std::size_t>(p.numel));
  copy_to_host_f32(out.data(), p.weight);
  return out;
}

std::vector<float> Model::read_grad(const Parameter& p) {
  std::vector<float> out(static_cast<std::size_t>(p.numel));
  backend_.copy_to_host(out.data(), p.grad);
  return out;
}

void Model::zero_grads() {
  backend_.fill(padded_grads_, 0.0f);
}

void Model::tp_sum(Tensor t) {
  if (partition_.tensor_parallel > 1) partition_.tensor->all_reduce(t, ReduceOp::Sum);
}

void Model::norm_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y,
                         Tensor mean, Tensor rstd) {
  const float eps = static_cast<float>(arch_.norm_epsilon);
  if (arch_.normalization == NormType::LayerNorm) {
    backend_.layernorm_forward(x, weight->weight, bias->weight, eps, y, mean, rstd);
  } else {
    backend_.rmsnorm_forward(x, weight->weight, eps, y, rstd);
  }
}

void Model::norm_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor mean,
                          Tensor rstd, Tensor dy, Tensor dx) {
  if (arch_.normalization == NormType::LayerNorm) {
    backend_.layernorm_backward(x, weight->weight, mean, rstd, dy, dx, weight->grad, bias->grad);
  } else {
    backend_.rmsnorm_backward(x, weight->weight, rstd, dy, dx, weight->grad);
  }
}

void Model::linear_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y) {
  const std::int64_t rows = x.numel() / weight->shape[1];
  backend_.gemm(false, true, rows, weight->shape[0], weight->shape[1], 1.0f, x, weight->weight,
                0.0f, y);
  if (bias) backend_.add_bias(y, bias->weight);
}

void Model::linear_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor dy,
                            Tensor dx, float beta) {
  const std::int64_t out = weight->shape[0], in = weight->shape[1];
  const std::int64_t rows = x.numel() / in;
  // Weight gradients first, so that dx may reuse the memory of x.
  backend_.gemm(true, false, out, in, rows, 1.0f, dy, x, 1.0f, weight->grad);
  if (bias) backend_.bias_backward(dy, bias->grad);
  if (dx.data) backend_.gemm(false, false, rows, in, out, 1.0f, dy, weight->weight, beta, dx);
}

void Model::mlp_forward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor out) {
  linear_forward(x, mlp.up, mlp.up_bias, up);
  if (mlp.gate) {
    linear_forward(x, mlp.gate, mlp.gate_bias, gate);
    backend_.gated_forward(arch_.activation, gate, up, act);
  } else {
    backend_.activation_forward(arch_.activation, up, act);
  }
  linear_forward(act, mlp.down, row_parallel_bias(mlp.down_bias), out);
}

// Overwrites gate and up with their gradients, then writes dx.
void Model::mlp_backward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor dout,
                         Tensor dx) {
  const std::int64_t rows = act.size(0);
  if (rows == 0) return;
  linear_backward(act, mlp.down, mlp.down_bias, dout, act, 0.0f);  // act now holds d(act)
  if (mlp.gate) {
    backend_.gated_backward(arch_.activation, gate, up, act, gate, up);
    linear_backward(x, mlp.up, mlp.up_bias, up, dx, 0.0f);
    linear_backward(x, mlp.gate, mlp.gate_bias, gate, dx, 1.0f);
  } else {
    backend_.activation_backward(arch_.activation, up, act, up);
    linear_backward(x, mlp.up, mlp.up_bias, up, dx, 0.0f);
  }
}

// With tensor parallelism, attention and MLP inputs are whole on every rank, each rank computes
// its heads / FFN rows, and the row-parallel outputs (o, down) are partial sums added up over the
// group before the residual.
void Model::forward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                          LayerActivations& a, Tensor router_sums) {
  const std::int64_t tokens = batch * seq, h = arch_.hidden_size, d = arch_.kv_channels;
  const std::int64_t heads = heads_, groups = groups_;
  const DType dt = backend_.compute_dtype();
  const double theta = arch_.rope_theta();

  a.h1 = allocate(dt, {tokens, h});
  a.mean1 = allocate(DType::F32, {tokens});
  a.rstd1 = allocate(DType::F32, {tokens});
  norm_forward(x, layer.norm1, layer.norm1_bias, a.h1.t, a.mean1.t, a.rstd1.t);
  a.q = allocate(dt, {tokens, heads * d});
  a.k = allocate(dt, {tokens, groups * d});
  a.v = allocate(dt, {tokens, groups * d});
  linear_forward(a.h1.t, layer.q, layer.q_bias, a.q.t);
  linear_forward(a.h1.t, layer.k, layer.k_bias, a.k.t);
  linear_forward(a.h1.t, layer.v, layer.v_bias, a.v.t);
  const Tensor q4 = a.q.t.view({batch, seq, heads, d}), k4 = a.k.t.view({batch, seq, groups, d});
  const Tensor v4 = a.v.t.view({batch, seq, groups, d});
  backend_.rope(q4, theta, false);
  backend_.rope(k4, theta, false);
  a.attn = allocate(dt, {tokens, heads * d});
  a.lse = allocate(DType::F32, {batch, heads, seq});
  backend_.attention_forward(q4, k4, v4, run_.window_size, a.attn.t.view({batch, seq, heads, d}),
                             a.lse.t);
  a.x2 = allocate(dt, {tokens, h});
  linear_forward(a.attn.t, layer.o, row_parallel_bias(layer.o_bias), a.x2.t);
  tp_sum(a.x2.t);
  backend_.add(a.x2.t, x, 1.0f);

  a.h2 = allocate(dt, {tokens, h});
  a.mean2 = allocate(DType::F32, {tokens});
  a.rstd2 = allocate(DType::F32, {tokens});
  norm_forward(a.x2.t, layer.norm2, layer.norm2_bias, a.h2.t, a.mean2.t, a.rstd2.t);

  a.x_out = allocate(dt, {tokens, h});
  const std::int64_t f = ffn_;
  if (!layer.router) {
    a.gate = allocate(dt, {tokens, f});
    a.up = allocate(dt, {tokens, f});
    a.act = allocate(dt, {tokens, f});
    mlp_forward(layer.mlps[0], a.h2.t, a.gate.t, a.up.t, a.act.t, a.x_out.t);
  } else {
    // The router is whole on every rank, so every tensor-parallel rank routes alike.
    const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
    const std::int64_t slots = tokens * k;
    DeviceArray logits = allocate(DType::F32, {tokens, experts});
    linear_forward(a.h2.t, layer.router, nullptr, logits.t);
    a.probs = allocate(DType::F32, {tokens, experts});
    a.topk_index = allocate(DType::I32, {tokens, k});
    a.topk_weight = allocate(DType::F32, {tokens, k});
    backend_.router_forward(logits.t, static_cast<int>(k), a.probs.t, a.topk_index.t,
                            a.topk_weight.t);
    backend_.router_statistics(a.probs.t, a.topk_index.t, router_sums.rows(0, experts),
                               router_sums.rows(experts, experts));
    a.sorted_token = allocate(DType::I32, {slots});
    a.sorted_slot = allocate(DType::I32, {slots});
    a.offsets = backend_.moe_permute(a.topk_index.t, static_cast<int>(experts), a.sorted_token.t,
                                     a.sorted_slot.t);
    a.slot_weight = allocate(DType::F32, {slots, 1});
    backend_.gather_rows(a.topk_weight.t.view({slots, 1}), a.sorted_slot.t, a.slot_weight.t);
    a.mlp_in = allocate(dt, {slots, h});
    backend_.gather_rows(a.h2.t, a.sorted_token.t, a.mlp_in.t);
    a.gate = allocate(dt, {slots, f});
    a.up = allocate(dt, {slots, f});
    a.act = allocate(dt, {slots, f});
    a.mlp_out = allocate(dt, {slots, h});
    for (std::int64_t e = 0; e < experts; ++e) {
      const std::int64_t begin = a.offsets[e], count = a.offsets[e + 1] - begin;
      if (count == 0) continue;
      mlp_forward(layer.mlps[e], a.mlp_in.t.rows(begin, count), a.gate.t.rows(begin, count),
                  a.up.t.rows(begin, count), a.act.t.rows(begin, count),
                  a.mlp_out.t.rows(begin, count));
    }
    backend_.fill(a.x_out.t, 0.0f);
    backend_.scatter_add_rows(a.mlp_out.t, a.sorted_token.t, a.slot_weight.t.view({slots}),
                              a.x_out.t);
  }
  tp_sum(a.x_out.t);
  backend_.add(a.x_out.t, a.x2.t, 1.0f);
}

// Gradients reaching a layer's output are whole on every tensor-parallel rank; the gradients each
// rank's column-parallel layers send back to their (whole) input are partial and summed.
void Model::backward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                           LayerActivations& a, Tensor dprob_per_expert, Tensor dres) {
  const std::int64_t tokens = batch * seq, h = arch_.hidden_size, d = arch_.kv_channels;
  const std::int64_t heads = heads_, groups = groups_;
  const DType dt = backend_.compute_dtype();

  // dres = dL/d(layer output); the MLP branch first.
  DeviceArray dh = allocate(dt, {tokens, h});
  if (!layer.router) {
    mlp_backward(layer.mlps[0], a.h2.t, a.gate.t, a.up.t, a.act.t, dres, dh.t);
    tp_sum(dh.t);
  } else {
    const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
    const std::int64_t slots = tokens * k;
    DeviceArray dslot_weight = allocate(DType::F32, {slots, 1});
    backend_.dot_rows_gathered(a.mlp_out.t, dres, a.sorted_token.t, dslot_weight.t.view({slots}));
    tp_sum(dslot_weight.t);  // each rank's experts gave a partial output
    DeviceArray dmlp_out = allocate(dt, {slots, h});
    backend_.gather_rows(dres, a.sorted_token.t, dmlp_out.t);
    backend_.scale_rows(dmlp_out.t, a.slot_weight.t.view({slots}));
    DeviceArray dmlp_in = allocate(dt, {slots, h});
    for (std::int64_t e = 0; e < experts; ++e) {
      const std::int64_t begin = a.offsets[e], count = a.offsets[e + 1] - begin;
      if (count == 0) continue;
      mlp_backward(layer.mlps[e], a.mlp_in.t.rows(begin, count), a.gate.t.rows(begin, count),
                   a.up.t.rows(begin, count), a.act.t.rows(begin, count),
                   dmlp_out.t.rows(begin, count), dmlp_in.t.rows(begin, count));
    }
    backend_.fill(dh.t, 0.0f);
    backend_.scatter_add_rows(dmlp_in.t, a.sorted_token.t, Tensor(), dh.t);
    tp_sum(dh.t);  // before the router's share, which every rank computes whole
    DeviceArray dtopk = allocate(DType::F32, {slots, 1});
    backend_.fill(dtopk.t, 0.0f);
    backend_.scatter_add_rows(dslot_weight.t, a.sorted_slot.t, Tensor(), dtopk.t);
    DeviceArray dlogits = allocate(DType::F32, {tokens, experts});
    backend_.router_backward(a.probs.t, a.topk_index.t, dtopk.t.view({tokens, k}), dprob_per_expert,
                             dlogits.t);
    linear_backward(a.h2.t, layer.router, nullptr, dlogits.t, dh.t, 1.0f);
  }
  DeviceArray dnorm = allocate(dt, {tokens, h});
  norm_backward(a.x2.t, layer.norm2, layer.norm2_bias, a.mean2.t, a.rstd2.t, dh.t, dnorm.t);
  backend_.add(dres, dnorm.t, 1.0f);  // dres = dL/dx2

  // Attention branch.
  DeviceArray dattn = allocate(dt, {tokens, heads * d});
  linear_backward(a.attn.t, layer.o, layer.o_bias, dres, dattn.t, 0.0f);
  DeviceArray dq = allocate(dt, {tokens, heads * d});
  DeviceArray dk = allocate(dt, {tokens, groups * d});
  DeviceArray dv = allocate(dt, {tokens, groups * d});
  const Tensor dq4 = dq.t.view({batch, seq, heads, d}), dk4 = dk.t.view({batch, seq, groups, d});
  backend_.attention_backward(
      a.q.t.view({batch, seq, heads, d}), a.k.t.view({batch, seq, groups, d}),
      a.v.t.view({batch, seq, groups, d}), a.attn.t.view({batch, seq, heads, d}), a.lse.t,
      dattn.t.view({batch, seq, heads, d}), run_.window_size, dq4, dk4,
      dv.t.view({batch, seq, groups, d}));
  const double theta = arch_.rope_theta();
  backend_.rope(dq4, theta, true);
  backend_.rope(dk4, theta, true);
  linear_backward(a.h1.t, layer.q, layer.q_bias, dq.t, dh.t, 0.0f);
  linear_backward(a.h1.t, layer.k, layer.k_bias, dk.t, dh.t, 1.0f);
  linear_backward(a.h1.t, layer.v, layer.v_bias, dv.t, dh.t, 1.0f);
  tp_sum(dh.t);
  norm_backward(x, layer.norm1, layer.norm1_bias, a.mean1.t, a.rstd1.t, dh.t, dnorm.t);
  backend_.add(dres, dnorm.t, 1.0f);  // dres = dL/d(layer input)
}

Model::StageTensors Model::stage_input_buffers(std::int64_t tokens) {
  StageTensors s;
  s.x = allocate(backend_.compute_dtype(), {tokens, arch_.hidden_size});
  if (arch_.is_moe()) s.router = allocate(DType::F32, {2 * arch_.num_experts});
  return s;
}

Model::StageTensors Model::stage_grad_buffers(std::int64_t tokens) {
  StageTensors s;
  s.x = allocate(backend_.compute_dtype(), {tokens, arch_.hidden_size});
  if (arch_.is_moe()) s.router = allocate(DType::F32, {arch_.num_experts});
  return s;
}

Tensor Model::stage_output(const ForwardState& st) const {
  return st.layers.empty() ? st.x0.t : st.layers.back().x_out.t;
}

Tensor Model::stage_router_sums(const ForwardState& st) const {
  return st.router.t;
}

std::unique_ptr<Model::ForwardState> Model::forward(const MicroBatch& mb, MicroBatchResult& result,
                                                    float* logits_out) {
  if (!first_stage() || !last_stage())
    throw std::logic_error("Model::forward: the model is split into pipeline stages");
  return forward_stage(mb, {}, result, logits_out);
}

void Model::backward(std::unique_ptr<ForwardState> st, double ce_scale, double aux_scale) {
  backward_stage(std::move(st), {}, ce_scale, aux_scale);
}

std::unique_ptr<Model::ForwardState> Model::forward_stage(const MicroBatch& mb, StageTensors input,
                                                          MicroBatchResult& result,
                                                          float* logits_out) {
  const std::int64_t tokens = mb.batch * mb.seq, h = arch_.hidden_size;
  const DType dt = backend_.compute_dtype();
  if (static_cast<std::int64_t>(mb.input_ids.size()) != tokens ||
      static_cast<std::int64_t>(mb.targets.size()) != tokens)
    throw std::invalid_argument("Model::forward: micro-batch sizes disagree");

  auto st = std::make_unique<ForwardState>();
  st->batch = mb.batch;
  st->seq = mb.seq;
  if (first_stage()) {
    st->ids = allocate(DType::I32, {tokens});
    backend_.copy_from_host(st->ids.t, mb.input_ids.data());
    st->x0 = allocate(dt, {tokens, h});
    // Each rank embeds the ids of its vocabulary rows (zeros elsewhere); the sum is the embedding.
    backend_.embedding_forward(st->ids.t, embedding_->weight, vocab_begin_, st->x0.t);
    tp_sum(st->x0.t);
    if (arch_.is_moe()) {
      st->router = allocate(DType::F32, {2 * arch_.num_experts});
      backend_.fill(st->router.t, 0.0f);
    }
  } else {
    if (input.x.t.numel() != tokens * h || (arch_.is_moe() && !input.router.t.data))
      throw std::invalid_argument("Model::forward_stage: the stage input has another shape");
    st->x0 = std::move(input.x);
    st->router = std::move(input.router);
  }
  st->layers.resize(layers_.size());
  for (std::size_t l = 0; l < layers_.size(); ++l)
    forward_layer(layers_[l], l == 0 ? st->x0.t : st->layers[l - 1].x_out.t, mb.batch, mb.seq,
                  st->layers[l], st->router.t);
  result = {};
  if (last_stage()) loss_forward(*st, mb, result, logits_out);
  return st;
}

void Model::loss_forward(ForwardState& st, const MicroBatch& mb, MicroBatchResult& result,
                         float* logits_out) {
  const std::int64_t tokens = mb.batch * mb.seq, h = arch_.hidden_size;
  const DType dt = backend_.compute_dtype();
  st.targets = allocate(DType::I32, {tokens});
  backend_.copy_from_host(st.targets.t, mb.targets.data());
  const Tensor x_last = stage_output(st);
  st.xf = allocate(dt, {tokens, h});
  st.mean_f = allocate(DType::F32, {tokens});
  st.rstd_f = allocate(DType::F32, {tokens});
  norm_forward(x_last, final_norm_, final_norm_bias_, st.xf.t, st.mean_f.t, st.rstd_f.t);
  st.logits = allocate(dt, {tokens, vocab_rows_});
  linear_forward(st.xf.t, lm_head_, nullptr, st.logits.t);
  if (logits_out) copy_to_host_f32(logits_out, st.logits.t);

  st.row_max = allocate(DType::F32, {tokens});
  st.row_sumexp = allocate(DType::F32, {tokens});
  DeviceArray target_logit = allocate(DType::F32, {tokens});
  backend_.cross_entropy_stats(st.logits.t, st.targets.t, vocab_begin_, st.row_max.t,
                               st.row_sumexp.t, target_logit.t);
  std::vector<float> mx(tokens), se(tokens), tl(tokens);
  if (partition_.tensor_parallel > 1) {
    // Vocab-parallel softmax: the global maximum, each slice's sum rescaled to it and summed, and
    // the target's logit from the one rank whose slice holds it.
    DeviceArray global_max = allocate(DType::F32, {tokens});
    backend_.copy(global_max.t, st.row_max.t);
    partition_.tensor->all_reduce(global_max.t, ReduceOp::Max);
    std::vector<float> gm(tokens);
    backend_.copy_to_host(mx.data(), st.row_max.t);
    backend_.copy_to_host(gm.data(), global_max.t);
    backend_.copy_to_host(se.data(), st.row_sumexp.t);
    for (std::int64_t t = 0; t < tokens; ++t)
      se[t] = static_cast<float>(se[t] * std::exp(static_cast<double>(mx[t]) - gm[t]));
    backend_.copy_from_host(st.row_sumexp.t, se.data());
    partition_.tensor->all_reduce(st.row_sumexp.t, ReduceOp::Sum);
    partition_.tensor->all_reduce(target_logit.t, ReduceOp::Sum);
    st.row_max = std::move(global_max);
  }
  backend_.copy_to_host(mx.data(), st.row_max.t);
  backend_.copy_to_host(se.data(), st.row_sumexp.t);
  backend_.copy_to_host(tl.data(), target_logit.t);
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (mb.targets[t] < 0) continue;
    result.ce_sum += std::log(static_cast<double>(se[t])) + mx[t] - tl[t];
    ++result.predicted;
  }
  if (arch_.is_moe()) {
    const std::int64_t experts = arch_.num_experts;
    std::vector<float> sums(2 * experts);
    backend_.copy_to_host(sums.data(), st.router.t);
    const double total = static_cast<double>(tokens * arch_.num_layers);
    for (std::int64_t e = 0; e < experts; ++e)
      result.aux_loss += experts * (sums[e] / total) * (sums[experts + e] / total);
  }
}

Model::StageTensors Model::backward_stage(std::unique_ptr<ForwardState> st, StageTensors grad,
                                          double ce_scale, double aux_scale) {
  const std::int64_t tokens = st->batch * st->seq, h = arch_.hidden_size;
  const DType dt = backend_.compute_dtype();
  DeviceArray dres, dprob;
  if (last_stage()) {
    // The load-balancing loss couples all layers: d aux / d probs[t, e] = E * count_e / T^2 with
    // the totals of the whole forward.
    if (arch_.is_moe()) {
      const std::int64_t experts = arch_.num_experts;
      std::vector<float> counts(experts), coefficient(experts);
      backend_.copy_to_host(counts.data(), st->router.t.rows(0, experts));
      const double total = static_cast<double>(tokens * arch_.num_layers);
      for (std::int64_t e = 0; e < experts; ++e)
        coefficient[e] = static_cast<float>(aux_scale * experts * counts[e] / (total * total));
      dprob = allocate(DType::F32, {experts});
      backend_.copy_from_host(dprob.t, coefficient.data());
    }
    backend_.cross_entropy_backward(st->logits.t, st->targets.t, vocab_begin_, st->row_max.t,
                                    st->row_sumexp.t, static_cast<float>(ce_scale), st->logits.t);
    // xf takes its own gradient once the LM head's weight gradient has used it.
    linear_backward(st->xf.t, lm_head_, nullptr, st->logits.t, st->xf.t, 0.0f);
    tp_sum(st->xf.t);
    st->logits = {};
    dres = allocate(dt, {tokens, h});
    norm_backward(stage_output(*st), final_norm_, final_norm_bias_, st->mean_f.t, st->rstd_f.t,
                  st->xf.t, dres.t);
  } else {
    if (grad.x.t.numel() != tokens * h || (arch_.is_moe() && !grad.router.t.data))
      throw std::invalid_argument("Model::backward_stage: the gradient has another shape");
    dres = std::move(grad.x);
    dprob = std::move(grad.router);
  }
  auto layer_input = [&](std::size_t l) { return l == 0 ? st->x0.t : st->layers[l - 1].x_out.t; };
  for (std::size_t l = layers_.size(); l-- > 0;) {
    backward_layer(layers_[l], layer_input(l), st->batch, st->seq, st->layers[l], dprob.t, dres.t);
    st->layers[l] = {};
  }
  if (first_stage()) {
    backend_.embedding_backward(st->ids.t, dres.t, vocab_begin_, embedding_->grad);
    return {};
  }
  StageTensors out;
  out.x = std::move(dres);
  out.router = std::move(dprob);
  return out;
}

}  // namespace fastllm
