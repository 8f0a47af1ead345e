#include "model/model.h"

#include <cmath>
#include <map>
#include <random>
#include <stdexcept>

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
  for (std::size_t i = 0; i < shape.size(); ++i) t.dims[i] = shape[i];
  return t;
}

}  // namespace

Model::Model(Backend& backend, const Architecture& arch, const RunSettings& run)
    : backend_(backend), arch_(arch), run_(run) {
  const std::int64_t h = arch.hidden_size, f = arch.ffn_hidden_size;
  const bool layer_norm = arch.normalization == NormType::LayerNorm;
  auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
    Parameter p;
    p.name = name;
    p.shape = std::move(shape);
    p.numel = 1;
    for (auto d : p.shape) p.numel *= d;
    p.decay = p.shape.size() >= 2;
    p.offset = parameters_.empty() ? 0 : parameters_.back().offset + parameters_.back().numel;
    parameters_.push_back(std::move(p));
  };
  auto add_norm = [&](const std::string& name) {
    add(name + ".weight", {h});
    if (layer_norm) add(name + ".bias", {h});
  };
  auto add_linear = [&](const std::string& name, std::int64_t out, std::int64_t in) {
    add(name + ".weight", {out, in});
    if (arch.add_linear_biases) add(name + ".bias", {out});
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

  const std::int64_t total = parameters_.back().offset + parameters_.back().numel;
  const DType dtype = backend_.compute_dtype();
  weights_buffer_ = backend_.allocate(static_cast<std::size_t>(total) * dtype_size(dtype));
  grads_buffer_ = backend_.allocate(static_cast<std::size_t>(total) * sizeof(float));
  flat_weights_ = weights_buffer_.tensor(dtype, {total});
  flat_grads_ = grads_buffer_.tensor(DType::F32, {total});
  std::map<std::string, const Parameter*> by_name;
  for (Parameter& p : parameters_) {
    p.weight = shaped(static_cast<char*>(weights_buffer_.data()) + p.offset * dtype_size(dtype),
                      dtype, p.shape);
    p.grad = shaped(static_cast<float*>(grads_buffer_.data()) + p.offset, DType::F32, p.shape);
    by_name[p.name] = &p;
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
  for (std::int64_t l = 0; l < arch.num_layers; ++l) {
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
  embedding_ = find("model.embed_tokens.weight");
  final_norm_ = find("model.norm.weight");
  final_norm_bias_ = find("model.norm.bias");
  lm_head_ = arch.tie_word_embeddings ? embedding_ : find("lm_head.weight");
  zero_grads();
}

const Parameter& Model::parameter(const std::string& name) const {
  for (const Parameter& p : parameters_) {
    if (p.name == name) return p;
  }
  throw std::out_of_range("no parameter named " + name);
}

void Model::initialize(std::uint64_t seed, double std) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, std);
  std::vector<float> values;
  for (Parameter& p : parameters_) {
    values.assign(static_cast<std::size_t>(p.numel), 0.0f);
    const bool is_bias = p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
    if (p.shape.size() >= 2) {
      for (auto& v : values) v = static_cast<float>(normal(gen));
    } else if (!is_bias) {
      std::fill(values.begin(), values.end(), 1.0f);
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

std::vector<float> Model::read_weight(const Parameter& p) {
  std::vector<float> out(static_cast<std::size_t>(p.numel));
  if (p.weight.dtype == DType::F32) {
    backend_.copy_to_host(out.data(), p.weight);
  } else {
    DeviceArray staging = allocate(DType::F32, {p.numel});
    backend_.copy(staging.t, p.weight.view({p.numel}));
    backend_.copy_to_host(out.data(), staging.t);
  }
  return out;
}

std::vector<float> Model::read_grad(const Parameter& p) {
  std::vector<float> out(static_cast<std::size_t>(p.numel));
  backend_.copy_to_host(out.data(), p.grad);
  return out;
}

void Model::zero_grads() { backend_.fill(flat_grads_, 0.0f); }

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
  linear_forward(act, mlp.down, mlp.down_bias, out);
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

void Model::forward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                          LayerActivations& a, RouterTotals& router) {
  const std::int64_t tokens = batch * seq, h = arch_.hidden_size, d = arch_.kv_channels;
  const std::int64_t heads = arch_.num_attention_heads, groups = arch_.head_groups;
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
  linear_forward(a.attn.t, layer.o, layer.o_bias, a.x2.t);
  backend_.add(a.x2.t, x, 1.0f);

  a.h2 = allocate(dt, {tokens, h});
  a.mean2 = allocate(DType::F32, {tokens});
  a.rstd2 = allocate(DType::F32, {tokens});
  norm_forward(a.x2.t, layer.norm2, layer.norm2_bias, a.h2.t, a.mean2.t, a.rstd2.t);

  a.x_out = allocate(dt, {tokens, h});
  const std::int64_t f = arch_.ffn_hidden_size;
  if (!layer.router) {
    a.gate = allocate(dt, {tokens, f});
    a.up = allocate(dt, {tokens, f});
    a.act = allocate(dt, {tokens, f});
    mlp_forward(layer.mlps[0], a.h2.t, a.gate.t, a.up.t, a.act.t, a.x_out.t);
  } else {
    const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
    const std::int64_t slots = tokens * k;
    DeviceArray logits = allocate(DType::F32, {tokens, experts});
    linear_forward(a.h2.t, layer.router, nullptr, logits.t);
    a.probs = allocate(DType::F32, {tokens, experts});
    a.topk_index = allocate(DType::I32, {tokens, k});
    a.topk_weight = allocate(DType::F32, {tokens, k});
    backend_.router_forward(logits.t, static_cast<int>(k), a.probs.t, a.topk_index.t,
                            a.topk_weight.t);
    backend_.router_statistics(a.probs.t, a.topk_index.t, router.counts.t, router.prob_sums.t);
    router.tokens += tokens;
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
  backend_.add(a.x_out.t, a.x2.t, 1.0f);
}

void Model::backward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                           LayerActivations& a, Tensor dprob_per_expert, Tensor dres) {
  const std::int64_t tokens = batch * seq, h = arch_.hidden_size, d = arch_.kv_channels;
  const std::int64_t heads = arch_.num_attention_heads, groups = arch_.head_groups;
  const DType dt = backend_.compute_dtype();

  // dres = dL/d(layer output); the MLP branch first.
  DeviceArray dh = allocate(dt, {tokens, h});
  if (!layer.router) {
    mlp_backward(layer.mlps[0], a.h2.t, a.gate.t, a.up.t, a.act.t, dres, dh.t);
  } else {
    const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
    const std::int64_t slots = tokens * k;
    DeviceArray dslot_weight = allocate(DType::F32, {slots, 1});
    backend_.dot_rows_gathered(a.mlp_out.t, dres, a.sorted_token.t, dslot_weight.t.view({slots}));
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
    DeviceArray dtopk = allocate(DType::F32, {slots, 1});
    backend_.fill(dtopk.t, 0.0f);
    backend_.scatter_add_rows(dslot_weight.t, a.sorted_slot.t, Tensor(), dtopk.t);
    DeviceArray dlogits = allocate(DType::F32, {tokens, experts});
    backend_.router_backward(a.probs.t, a.topk_index.t, dtopk.t.view({tokens, k}),
                             dprob_per_expert, dlogits.t);
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
  norm_backward(x, layer.norm1, layer.norm1_bias, a.mean1.t, a.rstd1.t, dh.t, dnorm.t);
  backend_.add(dres, dnorm.t, 1.0f);  // dres = dL/d(layer input)
}


std::unique_ptr<Model::ForwardState> Model::forward(const MicroBatch& mb, MicroBatchResult& result,
                                    float* logits_out) {
  const std::int64_t tokens = mb.batch * mb.seq, h = arch_.hidden_size, vocab = arch_.vocab_size;
  const DType dt = backend_.compute_dtype();
  if (static_cast<std::int64_t>(mb.input_ids.size()) != tokens ||
      static_cast<std::int64_t>(mb.targets.size()) != tokens)
    throw std::invalid_argument("Model::forward: micro-batch sizes disagree");

  auto st = std::make_unique<ForwardState>();
  st->batch = mb.batch;
  st->seq = mb.seq;
  st->ids = allocate(DType::I32, {tokens});
  st->targets = allocate(DType::I32, {tokens});
  backend_.copy_from_host(st->ids.t, mb.input_ids.data());
  backend_.copy_from_host(st->targets.t, mb.targets.data());
  st->x0 = allocate(dt, {tokens, h});
  backend_.embedding_forward(st->ids.t, embedding_->weight, 0, st->x0.t);

  RouterTotals& router = st->router;
  if (arch_.is_moe()) {
    router.counts = allocate(DType::F32, {arch_.num_experts});
    router.prob_sums = allocate(DType::F32, {arch_.num_experts});
    backend_.fill(router.counts.t, 0.0f);
    backend_.fill(router.prob_sums.t, 0.0f);
  }
  st->layers.resize(layers_.size());
  for (std::size_t l = 0; l < layers_.size(); ++l)
    forward_layer(layers_[l], l == 0 ? st->x0.t : st->layers[l - 1].x_out.t, mb.batch, mb.seq,
                  st->layers[l], router);

  const Tensor x_last = layers_.empty() ? st->x0.t : st->layers.back().x_out.t;
  st->xf = allocate(dt, {tokens, h});
  st->mean_f = allocate(DType::F32, {tokens});
  st->rstd_f = allocate(DType::F32, {tokens});
  norm_forward(x_last, final_norm_, final_norm_bias_, st->xf.t, st->mean_f.t, st->rstd_f.t);
  st->logits = allocate(dt, {tokens, vocab});
  linear_forward(st->xf.t, lm_head_, nullptr, st->logits.t);
  if (logits_out) backend_.copy_to_host(logits_out, st->logits.t);

  st->row_max = allocate(DType::F32, {tokens});
  st->row_sumexp = allocate(DType::F32, {tokens});
  DeviceArray target_logit = allocate(DType::F32, {tokens});
  backend_.cross_entropy_stats(st->logits.t, st->targets.t, 0, st->row_max.t, st->row_sumexp.t,
                               target_logit.t);
  std::vector<float> mx(tokens), se(tokens), tl(tokens);
  backend_.copy_to_host(mx.data(), st->row_max.t);
  backend_.copy_to_host(se.data(), st->row_sumexp.t);
  backend_.copy_to_host(tl.data(), target_logit.t);
  result = {};
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (mb.targets[t] < 0) continue;
    result.ce_sum += std::log(static_cast<double>(se[t])) + mx[t] - tl[t];
    ++result.predicted;
  }
  if (arch_.is_moe()) {
    const std::int64_t experts = arch_.num_experts;
    std::vector<float> counts(experts), prob_sums(experts);
    backend_.copy_to_host(counts.data(), router.counts.t);
    backend_.copy_to_host(prob_sums.data(), router.prob_sums.t);
    const double total = static_cast<double>(router.tokens);
    for (std::int64_t e = 0; e < experts; ++e)
      result.aux_loss += experts * (counts[e] / total) * (prob_sums[e] / total);
  }
  return st;
}

void Model::backward(std::unique_ptr<ForwardState> st, double ce_scale, double aux_scale) {
  const std::int64_t tokens = st->batch * st->seq, h = arch_.hidden_size;
  const DType dt = backend_.compute_dtype();
  // The load-balancing loss couples all layers: d aux / d probs[t, e] = E * count_e / T^2 with the
  // totals of the whole forward.
  DeviceArray dprob;
  if (arch_.is_moe()) {
    const std::int64_t experts = arch_.num_experts;
    std::vector<float> counts(experts), grad(experts);
    backend_.copy_to_host(counts.data(), st->router.counts.t);
    const double total = static_cast<double>(st->router.tokens);
    for (std::int64_t e = 0; e < experts; ++e)
      grad[e] = static_cast<float>(aux_scale * experts * counts[e] / (total * total));
    dprob = allocate(DType::F32, {experts});
    backend_.copy_from_host(dprob.t, grad.data());
  }

  backend_.cross_entropy_backward(st->logits.t, st->targets.t, 0, st->row_max.t,
                                  st->row_sumexp.t, static_cast<float>(ce_scale), st->logits.t);
  // xf takes its own gradient once the LM head's weight gradient has used it.
  linear_backward(st->xf.t, lm_head_, nullptr, st->logits.t, st->xf.t, 0.0f);
  st->logits = {};
  DeviceArray dres = allocate(dt, {tokens, h});
  auto layer_input = [&](std::size_t l) { return l == 0 ? st->x0.t : st->layers[l - 1].x_out.t; };
  norm_backward(layer_input(layers_.size()), final_norm_, final_norm_bias_, st->mean_f.t,
                st->rstd_f.t, st->xf.t, dres.t);
  for (std::size_t l = layers_.size(); l-- > 0;) {
    backward_layer(layers_[l], layer_input(l), st->batch, st->seq, st->layers[l], dprob.t, dres.t);
    st->layers[l] = {};
  }
  backend_.embedding_backward(st->ids.t, dres.t, 0, embedding_->grad);
}

}  // namespace fastllm
