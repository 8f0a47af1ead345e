#include "model/model.h"

#include <algorithm>
#include <random>
#include <stdexcept>

#include "io/error.h"

namespace fastllm {

DeviceArray device_array(Backend& backend, DType dtype, std::initializer_list<std::int64_t> shape) {
  DeviceArray a;
  const Tensor probe(nullptr, dtype, shape);
  a.buffer = backend.allocate(probe.bytes());
  a.t = a.buffer.tensor(dtype, shape);
  return a;
}

Recompute parse_recompute(const std::string& text) {
  if (text == "none") return Recompute::None;
  if (text == "selective") return Recompute::Selective;
  if (text == "full") return Recompute::Full;
  throw UserError("--recompute=" + text + ": expected none, selective or full");
}

const char* recompute_name(Recompute mode) {
  switch (mode) {
    case Recompute::None:
      return "none";
    case Recompute::Selective:
      return "selective";
    case Recompute::Full:
      return "full";
  }
  return "?";
}

DeviceArray Model::allocate(DType dtype, std::initializer_list<std::int64_t> shape) {
  return device_array(backend_, dtype, shape);
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

bool is_bias(Role role) {
  switch (role) {
    case Role::Norm1Bias:
    case Role::QBias:
    case Role::KBias:
    case Role::VBias:
    case Role::OBias:
    case Role::Norm2Bias:
    case Role::GateBias:
    case Role::UpBias:
    case Role::DownBias:
    case Role::FinalNormBias:
      return true;
    default:
      return false;
  }
}

}  // namespace

Model::Model(Backend& backend, const Architecture& arch, const RunSettings& run,
             const ModelPartition& partition, Recompute recompute)
    : backend_(backend),
      arch_(arch),
      run_(run),
      partition_(partition),
      recompute_(recompute),
      parameters_(partition_parameters(arch, partition)) {
  const Layout& layout = partition.layout;
  const int tp = layout.tensor_parallel;
  if (tp > 1 && !partition.tensor)
    throw std::invalid_argument("Model: a tensor-parallel partition needs its communicator");
  heads_ = arch.num_attention_heads / tp;
  groups_ = layout.kv_heads_per_rank(arch);
  ffn_ = arch.ffn_hidden_size / tp;
  vocab_ = layout.vocab_slice(arch.vocab_size, partition.at.tp);

  const std::int64_t total = parameters_.back().offset + parameters_.back().numel;
  const std::int64_t align = std::max<std::int64_t>(1, partition.flat_alignment);
  const std::int64_t padded = (total + align - 1) / align * align;
  const DType dtype = backend_.compute_dtype();
  weights_buffer_ = backend_.allocate(static_cast<std::size_t>(padded) * dtype_size(dtype));
  padded_weights_ = weights_buffer_.tensor(dtype, {padded});
  flat_weights_ = padded_weights_.rows(0, total);
  if (!partition.gradient_buckets) {
    grads_buffer_ = backend_.allocate(static_cast<std::size_t>(padded) * sizeof(float));
    padded_grads_ = grads_buffer_.tensor(DType::F32, {padded});
    flat_grads_ = padded_grads_.rows(0, total);
  }
  backend_.fill(padded_weights_, 0.0f);

  for (Parameter& p : parameters_) {
    p.weight = shaped(static_cast<char*>(weights_buffer_.data()) + p.offset * dtype_size(dtype),
                      dtype, p.shape);
    p.grad = shaped(
        grads_buffer_.data() ? static_cast<float*>(grads_buffer_.data()) + p.offset : nullptr,
        DType::F32, p.shape);
  }
  StageWeights wired = wire_stage(arch, partition, parameters_);
  layers_ = std::move(wired.layers);
  embedding_ = wired.embedding;
  final_norm_ = wired.final_norm;
  final_norm_bias_ = wired.final_norm_bias;
  lm_head_ = wired.lm_head;
  if (partition.gradient_buckets) make_buckets();
  zero_grads();
}

// A bucket per layer of the stage and one per whole-model parameter, so that each is complete when
// its part of backward ends.
void Model::make_buckets() {
  bucket_of_.resize(parameters_.size());
  std::int64_t layer = -1;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    Parameter& p = parameters_[i];
    if (p.layer < 0 || p.layer != layer) buckets_.emplace_back();
    layer = p.layer;
    GradientBucket& b = buckets_.back();
    if (b.params.empty()) b.begin = p.offset;
    b.params.push_back(&p);
    b.end = p.offset + p.numel;
    b.deferred = b.deferred || p.sync == GradientSync::TiedEmbedding;
    bucket_of_[i] = buckets_.size() - 1;
  }
}

void Model::open_bucket(const Parameter* p) {
  if (!partition_.gradient_buckets) return;
  GradientBucket& b = buckets_[bucket_of_[static_cast<std::size_t>(p - parameters_.data())]];
  if (b.grads.t.data) return;
  b.grads = allocate(DType::F32, {b.end - b.begin});
  backend_.fill(b.grads.t, 0.0f);
  for (Parameter* q : b.params)
    q->grad.data = b.grads.t.as<float>() + (q->offset - b.begin);
}

void Model::close_bucket(const Parameter* p) {
  if (!partition_.gradient_buckets) return;
  GradientBucket& b = buckets_[bucket_of_[static_cast<std::size_t>(p - parameters_.data())]];
  if (!b.deferred) release(b);
}

void Model::release(GradientBucket& b) {
  if (!sink_) throw std::logic_error("Model: gradient buckets without a sink");
  sink_->take(b.params, b.begin, b.grads.t);
  b.grads = {};
  for (Parameter* q : b.params)
    q->grad.data = nullptr;
}

void Model::flush_deferred_gradients() {
  for (GradientBucket& b : buckets_) {
    if (b.deferred && b.grads.t.data) release(b);
  }
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
    if (p.shape.size() >= 2) {
      std::int64_t whole = 1;
      for (auto d : p.global_shape)
        whole *= d;
      values.resize(static_cast<std::size_t>(whole));
      for (auto& v : values)
        v = static_cast<float>(normal(gen));
      values = local_part(p, values);
    } else {
      values.assign(static_cast<std::size_t>(p.numel), is_bias(p.role) ? 0.0f : 1.0f);
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
  if (!p.grad.data)
    throw std::logic_error("Model::read_grad: " + p.name + " is in a gradient bucket");
  std::vector<float> out(static_cast<std::size_t>(p.numel));
  backend_.copy_to_host(out.data(), p.grad);
  return out;
}

void Model::zero_grads() {
  if (!partition_.gradient_buckets) {
    backend_.fill(padded_grads_, 0.0f);
    return;
  }
  for (GradientBucket& b : buckets_) {
    if (b.grads.t.data) backend_.fill(b.grads.t, 0.0f);
  }
}

// ---- primitives ----

void Model::tp_sum(Tensor t) {
  if (partition_.layout.tensor_parallel > 1) partition_.tensor->all_reduce(t, ReduceOp::Sum);
}

bool Model::sequence_parallel() const {
  return partition_.layout.sequence_parallel && partition_.layout.tensor_parallel > 1;
}

Tensor Model::whole_rows(Tensor x, DeviceArray& gathered) {
  if (!sequence_parallel()) return x;
  gathered = allocate(x.dtype, {x.size(0) * partition_.layout.tensor_parallel, x.size(1)});
  partition_.tensor->all_gather(x, gathered.t);
  return gathered.t;
}

DeviceArray Model::reduce_rows(DeviceArray partial) {
  if (!sequence_parallel()) {
    tp_sum(partial.t);
    return partial;
  }
  const int tp = partition_.layout.tensor_parallel;
  DeviceArray mine = allocate(partial.t.dtype, {partial.t.size(0) / tp, partial.t.size(1)});
  partition_.tensor->reduce_scatter(partial.t, mine.t, ReduceOp::Sum);
  return mine;
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

DeviceArray Model::norm_output(Tensor x, const Parameter* weight, const Parameter* bias,
                               Tensor mean, Tensor rstd) {
  DeviceArray y = allocate(backend_.compute_dtype(), {x.size(0), x.size(1)});
  norm_forward(x, weight, bias, y.t, mean, rstd);
  return y;
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
  backend_.linear_forward(x, weight->weight, bias ? bias->weight : Tensor(), y);
}

void Model::linear_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor dy,
                            Tensor dx, float beta) {
  const std::int64_t out = weight->shape[0], in = weight->shape[1];
  const std::int64_t rows = x.numel() / in;
  // Weight gradients first, so that dx may reuse the memory of x.
  backend_.linear_backward_weight(x, dy, weight->grad, bias ? bias->grad : Tensor());
  if (dx.data) backend_.gemm(false, false, rows, in, out, 1.0f, dy, weight->weight, beta, dx);
}

// ---- attention: y = x + o(attention(rope(q(h)), rope(k(h)), v(h))), h = norm1(x) ----
// With tensor parallelism the input is whole on every rank, each rank computes its heads, and the
// row-parallel output o is a partial sum added up over the group before the residual; the
// gradients each rank's column-parallel q/k/v send back to the (whole) input are partial and
// summed too.

void Model::attention_forward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                              Tensor positions, AttentionActivations& a) {
  const std::int64_t tokens = batch * seq, rows = x.size(0), h = arch_.hidden_size;
  const std::int64_t d = arch_.kv_channels, heads = heads_, groups = groups_;
  const DType dt = backend_.compute_dtype();
  const double theta = arch_.rope_theta();

  a.mean = allocate(DType::F32, {rows});
  a.rstd = allocate(DType::F32, {rows});
  a.h = norm_output(x, layer.norm1, layer.norm1_bias, a.mean.t, a.rstd.t);
  DeviceArray gathered;
  const Tensor hw = whole_rows(a.h.t, gathered);
  a.q = allocate(dt, {tokens, heads * d});
  a.k = allocate(dt, {tokens, groups * d});
  a.v = allocate(dt, {tokens, groups * d});
  linear_forward(hw, layer.q, layer.q_bias, a.q.t);
  linear_forward(hw, layer.k, layer.k_bias, a.k.t);
  linear_forward(hw, layer.v, layer.v_bias, a.v.t);
  const Tensor q4 = a.q.t.view({batch, seq, heads, d}), k4 = a.k.t.view({batch, seq, groups, d});
  a.out = allocate(dt, {tokens, heads * d});
  a.lse = allocate(DType::F32, {batch, heads, seq});
  const Tensor v4 = a.v.t.view({batch, seq, groups, d});
  const Tensor out4 = a.out.t.view({batch, seq, heads, d});
  if (positions.data) {
    backend_.rope_positions(q4, positions, theta, false);
    backend_.rope_positions(k4, positions, theta, false);
    backend_.document_attention_forward(q4, k4, v4, positions, run_.window_size, out4, a.lse.t);
  } else {
    backend_.rope(q4, theta, false);
    backend_.rope(k4, theta, false);
    backend_.attention_forward(q4, k4, v4, run_.window_size, out4, a.lse.t);
  }
  DeviceArray partial = allocate(dt, {tokens, h});
  linear_forward(a.out.t, layer.o, row_parallel_bias(layer.o_bias), partial.t);
  a.y = reduce_rows(std::move(partial));
  backend_.add(a.y.t, x, 1.0f);
}

void Model::attention_backward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                               Tensor positions, AttentionActivations& a, Tensor dy) {
  const std::int64_t tokens = batch * seq, rows = x.size(0), h = arch_.hidden_size;
  const std::int64_t d = arch_.kv_channels, heads = heads_, groups = groups_;
  const DType dt = backend_.compute_dtype();
  DeviceArray dy_gathered;
  const Tensor dyw = whole_rows(dy, dy_gathered);
  DeviceArray dout = allocate(dt, {tokens, heads * d});
  linear_backward(a.out.t, layer.o, layer.o_bias, dyw, dout.t, 0.0f);
  DeviceArray dq = allocate(dt, {tokens, heads * d});
  DeviceArray dk = allocate(dt, {tokens, groups * d});
  DeviceArray dv = allocate(dt, {tokens, groups * d});
  const Tensor dq4 = dq.t.view({batch, seq, heads, d}), dk4 = dk.t.view({batch, seq, groups, d});
  const Tensor q4 = a.q.t.view({batch, seq, heads, d}), k4 = a.k.t.view({batch, seq, groups, d});
  const Tensor v4 = a.v.t.view({batch, seq, groups, d});
  const Tensor out4 = a.out.t.view({batch, seq, heads, d});
  const Tensor dout4 = dout.t.view({batch, seq, heads, d});
  const Tensor dv4 = dv.t.view({batch, seq, groups, d});
  const double theta = arch_.rope_theta();
  if (positions.data) {
    backend_.document_attention_backward(q4, k4, v4, out4, a.lse.t, dout4, positions,
                                         run_.window_size, dq4, dk4, dv4);
    backend_.rope_positions(dq4, positions, theta, true);
    backend_.rope_positions(dk4, positions, theta, true);
  } else {
    backend_.attention_backward(q4, k4, v4, out4, a.lse.t, dout4, run_.window_size, dq4, dk4, dv4);
    backend_.rope(dq4, theta, true);
    backend_.rope(dk4, theta, true);
  }
  DeviceArray h_gathered;
  const Tensor hw = whole_rows(a.h.t, h_gathered);
  DeviceArray dh = allocate(dt, {tokens, h});
  linear_backward(hw, layer.q, layer.q_bias, dq.t, dh.t, 0.0f);
  linear_backward(hw, layer.k, layer.k_bias, dk.t, dh.t, 1.0f);
  linear_backward(hw, layer.v, layer.v_bias, dv.t, dh.t, 1.0f);
  dh = reduce_rows(std::move(dh));
  DeviceArray dnorm = allocate(dt, {rows, h});
  norm_backward(x, layer.norm1, layer.norm1_bias, a.mean.t, a.rstd.t, dh.t, dnorm.t);
  backend_.add(dy, dnorm.t, 1.0f);
}

// ---- one expert's MLP, or the dense one: out = down(act(gate(x)) * up(x)) ----

void Model::expert_forward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act,
                           Tensor out) {
  linear_forward(x, mlp.up, mlp.up_bias, up);
  if (mlp.gate) {
    linear_forward(x, mlp.gate, mlp.gate_bias, gate);
    backend_.gated_forward(arch_.activation, gate, up, act);
  } else {
    backend_.activation_forward(arch_.activation, up, act);
  }
  linear_forward(act, mlp.down, row_parallel_bias(mlp.down_bias), out);
}

void Model::expert_backward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act,
                            Tensor dout, Tensor dx) {
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

namespace {

// One projection's weights (or gradients) of every expert; empty when the experts have none.
template <class Mlp>
std::vector<Tensor> per_expert(const std::vector<Mlp>& mlps, const Parameter* Mlp::*projection,
                               bool gradients) {
  std::vector<Tensor> out;
  if (!(mlps[0].*projection)) return out;
  out.reserve(mlps.size());
  for (const Mlp& mlp : mlps)
    out.push_back(gradients ? (mlp.*projection)->grad : (mlp.*projection)->weight);
  return out;
}

}  // namespace

void Model::expert_forward(const std::vector<Mlp>& mlps, Tensor offsets, Tensor x, Tensor gate,
                           Tensor up, Tensor act, Tensor out) {
  auto project = [&](const Parameter* Mlp::*weight, const Parameter* Mlp::*bias, bool biased,
                     Tensor in, Tensor y) {
    const std::vector<Tensor> biases =
        biased ? per_expert(mlps, bias, false) : std::vector<Tensor>();
    backend_.grouped_linear_forward(in, per_expert(mlps, weight, false), biases, offsets, y);
  };
  project(&Mlp::up, &Mlp::up_bias, true, x, up);
  // The activation is elementwise: one call over all experts' rows gives each row's bits.
  if (mlps[0].gate) {
    project(&Mlp::gate, &Mlp::gate_bias, true, x, gate);
    backend_.gated_forward(arch_.activation, gate, up, act);
  } else {
    backend_.activation_forward(arch_.activation, up, act);
  }
  // The down bias of a row-parallel projection is added on one rank only.
  project(&Mlp::down, &Mlp::down_bias, row_parallel_bias(mlps[0].down_bias) != nullptr, act, out);
}

void Model::expert_backward(const std::vector<Mlp>& mlps, Tensor offsets, Tensor x, Tensor gate,
                            Tensor up, Tensor act, Tensor dout, Tensor dx) {
  if (act.size(0) == 0) return;
  auto weight_grads = [&](const Parameter* Mlp::*weight, const Parameter* Mlp::*bias, Tensor in,
                          Tensor dy) {
    backend_.grouped_linear_backward_weight(in, dy, offsets, per_expert(mlps, weight, true),
                                            per_expert(mlps, bias, true));
  };
  // Weight gradients before each input gradient, which overwrites act with d(act).
  weight_grads(&Mlp::down, &Mlp::down_bias, act, dout);
  backend_.grouped_linear_backward_data(dout, per_expert(mlps, &Mlp::down, false), offsets, 0.0f,
                                        act);
  if (mlps[0].gate) {
    backend_.gated_backward(arch_.activation, gate, up, act, gate, up);
  } else {
    backend_.activation_backward(arch_.activation, up, act, up);
  }
  weight_grads(&Mlp::up, &Mlp::up_bias, x, up);
  backend_.grouped_linear_backward_data(up, per_expert(mlps, &Mlp::up, false), offsets, 0.0f, dx);
  if (mlps[0].gate) {
    weight_grads(&Mlp::gate, &Mlp::gate_bias, x, gate);
    backend_.grouped_linear_backward_data(gate, per_expert(mlps, &Mlp::gate, false), offsets, 1.0f,
                                          dx);
  }
}

// ---- dense MLP: y = x + mlp(norm2(x)) ----

void Model::mlp_forward(const Layer& layer, Tensor x, MlpActivations& a) {
  const std::int64_t rows = x.size(0), h = arch_.hidden_size, f = ffn_;
  const DType dt = backend_.compute_dtype();
  a.mean = allocate(DType::F32, {rows});
  a.rstd = allocate(DType::F32, {rows});
  a.h = norm_output(x, layer.norm2, layer.norm2_bias, a.mean.t, a.rstd.t);
  DeviceArray gathered;
  const Tensor hw = whole_rows(a.h.t, gathered);
  const std::int64_t tokens = hw.size(0);
  a.gate = allocate(dt, {tokens, f});
  a.up = allocate(dt, {tokens, f});
  a.act = allocate(dt, {tokens, f});
  DeviceArray partial = allocate(dt, {tokens, h});
  expert_forward(layer.mlps[0], hw, a.gate.t, a.up.t, a.act.t, partial.t);
  a.y = reduce_rows(std::move(partial));
  backend_.add(a.y.t, x, 1.0f);
}

void Model::mlp_backward(const Layer& layer, Tensor x, MlpActivations& a, Tensor dy) {
  const std::int64_t rows = x.size(0), h = arch_.hidden_size;
  const DType dt = backend_.compute_dtype();
  DeviceArray dy_gathered, h_gathered;
  const Tensor dyw = whole_rows(dy, dy_gathered);
  const Tensor hw = whole_rows(a.h.t, h_gathered);
  DeviceArray dh = allocate(dt, {hw.size(0), h});
  expert_backward(layer.mlps[0], hw, a.gate.t, a.up.t, a.act.t, dyw, dh.t);
  dh = reduce_rows(std::move(dh));
  DeviceArray dnorm = allocate(dt, {rows, h});
  norm_backward(x, layer.norm2, layer.norm2_bias, a.mean.t, a.rstd.t, dh.t, dnorm.t);
  backend_.add(dy, dnorm.t, 1.0f);
}

// ---- mixture of experts: y = x + sum over the top-k experts of weight * expert(norm2(x)) ----
// The router is whole on every rank, so every tensor-parallel rank routes alike; each expert's
// FFN is split over the ranks like a dense MLP.

void Model::moe_forward(const Layer& layer, Tensor x, MlpActivations& a, Tensor router_sums) {
  const std::int64_t rows = x.size(0), h = arch_.hidden_size, f = ffn_;
  const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
  const DType dt = backend_.compute_dtype();
  a.mean = allocate(DType::F32, {rows});
  a.rstd = allocate(DType::F32, {rows});
  a.h = norm_output(x, layer.norm2, layer.norm2_bias, a.mean.t, a.rstd.t);
  DeviceArray gathered;
  const Tensor hw = whole_rows(a.h.t, gathered);
  const std::int64_t tokens = hw.size(0), slots = tokens * k;

  DeviceArray logits = allocate(DType::F32, {tokens, experts});
  linear_forward(hw, layer.router, nullptr, logits.t);
  a.probs = allocate(DType::F32, {tokens, experts});
  a.topk_index = allocate(DType::I32, {tokens, k});
  a.topk_weight = allocate(DType::F32, {tokens, k});
  backend_.router_forward(logits.t, static_cast<int>(k), a.probs.t, a.topk_index.t,
                          a.topk_weight.t);
  if (router_sums.data)
    backend_.router_statistics(a.probs.t, a.topk_index.t, router_sums.rows(0, experts),
                               router_sums.rows(experts, experts));
  a.sorted_token = allocate(DType::I32, {slots});
  a.sorted_slot = allocate(DType::I32, {slots});
  a.offsets = allocate(DType::I32, {experts + 1});
  backend_.moe_permute_offsets(a.topk_index.t, static_cast<int>(experts), a.sorted_token.t,
                               a.sorted_slot.t, a.offsets.t);
  a.slot_weight = allocate(DType::F32, {slots, 1});
  backend_.gather_rows(a.topk_weight.t.view({slots, 1}), a.sorted_slot.t, a.slot_weight.t);
  a.rows_in = allocate(dt, {slots, h});
  backend_.gather_rows(hw, a.sorted_token.t, a.rows_in.t);
  a.gate = allocate(dt, {slots, f});
  a.up = allocate(dt, {slots, f});
  a.act = allocate(dt, {slots, f});
  a.rows_out = allocate(dt, {slots, h});
  expert_forward(layer.mlps, a.offsets.t, a.rows_in.t, a.gate.t, a.up.t, a.act.t, a.rows_out.t);
  DeviceArray partial = allocate(dt, {tokens, h});
  backend_.fill(partial.t, 0.0f);
  backend_.scatter_add_rows(a.rows_out.t, a.sorted_token.t, a.slot_weight.t.view({slots}),
                            partial.t);
  a.y = reduce_rows(std::move(partial));
  backend_.add(a.y.t, x, 1.0f);
}

void Model::moe_backward(const Layer& layer, Tensor x, MlpActivations& a, Tensor dprob_per_expert,
                         Tensor dy) {
  const std::int64_t rows = x.size(0), h = arch_.hidden_size;
  const std::int64_t experts = arch_.num_experts, k = arch_.num_experts_per_token;
  const DType dt = backend_.compute_dtype();
  DeviceArray dy_gathered;
  const Tensor dyw = whole_rows(dy, dy_gathered);
  const std::int64_t tokens = dyw.size(0), slots = tokens * k;
  DeviceArray dslot_weight = allocate(DType::F32, {slots, 1});
  backend_.dot_rows_gathered(a.rows_out.t, dyw, a.sorted_token.t, dslot_weight.t.view({slots}));
  tp_sum(dslot_weight.t);  // each rank's experts gave a partial output
  DeviceArray drows_out = allocate(dt, {slots, h});
  backend_.gather_rows(dyw, a.sorted_token.t, drows_out.t);
  backend_.scale_rows(drows_out.t, a.slot_weight.t.view({slots}));
  DeviceArray drows_in = allocate(dt, {slots, h});
  expert_backward(layer.mlps, a.offsets.t, a.rows_in.t, a.gate.t, a.up.t, a.act.t, drows_out.t,
                  drows_in.t);
  DeviceArray dh = allocate(dt, {tokens, h});
  backend_.fill(dh.t, 0.0f);
  backend_.scatter_add_rows(drows_in.t, a.sorted_token.t, Tensor(), dh.t);
  dh = reduce_rows(std::move(dh));  // before the router's share, which every rank computes whole
  DeviceArray dtopk = allocate(DType::F32, {slots, 1});
  backend_.fill(dtopk.t, 0.0f);
  backend_.scatter_add_rows(dslot_weight.t, a.sorted_slot.t, Tensor(), dtopk.t);
  DeviceArray dlogits = allocate(DType::F32, {tokens, experts});
  backend_.router_backward(a.probs.t, a.topk_index.t, dtopk.t.view({tokens, k}), dprob_per_expert,
                           dlogits.t);
  DeviceArray h_gathered;
  const Tensor hw = whole_rows(a.h.t, h_gathered);
  if (!sequence_parallel()) {
    linear_backward(hw, layer.router, nullptr, dlogits.t, dh.t, 1.0f);
  } else {
    // The router's share of every token, of which this rank keeps its own rows.
    DeviceArray share = allocate(dt, {tokens, h});
    linear_backward(hw, layer.router, nullptr, dlogits.t, share.t, 0.0f);
    backend_.add(dh.t, share.t.rows(partition_.at.tp * rows, rows), 1.0f);
  }
  DeviceArray dnorm = allocate(dt, {rows, h});
  norm_backward(x, layer.norm2, layer.norm2_bias, a.mean.t, a.rstd.t, dh.t, dnorm.t);
  backend_.add(dy, dnorm.t, 1.0f);
}

// ---- a layer: attention, then the dense MLP or the experts ----

void Model::layer_forward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                          Tensor positions, LayerActivations& a, Tensor router_sums) {
  attention_forward(layer, x, batch, seq, positions, a.attention);
  if (layer.router) {
    moe_forward(layer, a.attention.y.t, a.mlp, router_sums);
  } else {
    mlp_forward(layer, a.attention.y.t, a.mlp);
  }
}

void Model::drop_recomputable(LayerActivations& a) {
  if (recompute_ == Recompute::Full) {
    DeviceArray output = std::move(a.mlp.y);  // the next layer's input
    a = {};
    a.mlp.y = std::move(output);
  } else if (recompute_ == Recompute::Selective) {
    a.attention.h = {};
    a.mlp.h = {};
    a.mlp.act = {};
  }
}

// Recomputes what drop_recomputable dropped with the kernels forward used, so the values are the
// same bits.
void Model::replay_dropped(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                           Tensor positions, LayerActivations& a) {
  if (!a.attention.y.t.data) {
    a = {};
    layer_forward(layer, x, batch, seq, positions, a, Tensor());
    return;
  }
  if (a.attention.h.t.data) return;
  a.attention.h =
      norm_output(x, layer.norm1, layer.norm1_bias, a.attention.mean.t, a.attention.rstd.t);
  MlpActivations& m = a.mlp;
  m.h = norm_output(a.attention.y.t, layer.norm2, layer.norm2_bias, m.mean.t, m.rstd.t);
  m.act = allocate(backend_.compute_dtype(), {m.up.t.size(0), m.up.t.size(1)});
  // The dense MLP's rows, or every expert's at once as the experts' forward activated them.
  if (layer.mlps[0].gate) {
    backend_.gated_forward(arch_.activation, m.gate.t, m.up.t, m.act.t);
  } else {
    backend_.activation_forward(arch_.activation, m.up.t, m.act.t);
  }
}

void Model::layer_backward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                           Tensor positions, LayerActivations& a, Tensor dprob_per_expert,
                           Tensor dy) {
  replay_dropped(layer, x, batch, seq, positions, a);
  if (layer.router) {
    moe_backward(layer, a.attention.y.t, a.mlp, dprob_per_expert, dy);
  } else {
    mlp_backward(layer, a.attention.y.t, a.mlp, dy);
  }
  attention_backward(layer, x, batch, seq, positions, a.attention, dy);
}

// ---- the ends of the model: the final norm and the LM head of this rank's vocabulary ----

void Model::head_forward(ForwardState& st) {
  const std::int64_t tokens = st.batch * st.seq;
  const Tensor x = stage_output(st);
  st.mean_f = allocate(DType::F32, {x.size(0)});
  st.rstd_f = allocate(DType::F32, {x.size(0)});
  st.xf = norm_output(x, final_norm_, final_norm_bias_, st.mean_f.t, st.rstd_f.t);
  DeviceArray gathered;
  st.logits = allocate(backend_.compute_dtype(), {tokens, vocab_.rows});
  linear_forward(whole_rows(st.xf.t, gathered), lm_head_, nullptr, st.logits.t);
  if (arch_.is_moe()) {
    // Over the tokens of all layers together, as transformers computes it; with the global-batch
    // scope, over those of every data-parallel rank's micro-batch of this step, whose counts are
    // what backward uses too.
    Communicator* data = partition_.data;
    if (run_.moe_aux_loss_global && data && data->size() > 1) {
      data->all_reduce(st.router.t, ReduceOp::Sum);
      st.aux_replicas = data->size();
    }
    const std::int64_t experts = arch_.num_experts;
    std::vector<float> sums(static_cast<std::size_t>(2 * experts));
    backend_.copy_to_host(sums.data(), st.router.t);
    const double total = static_cast<double>(tokens * arch_.num_layers) * st.aux_replicas;
    const double slots = total * static_cast<double>(arch_.num_experts_per_token);
    st.expert_load.resize(static_cast<std::size_t>(experts));
    for (std::int64_t e = 0; e < experts; ++e) {
      st.aux_loss += experts * (sums[e] / total) * (sums[experts + e] / total);
      st.expert_load[e] = sums[e] / slots;
    }
  }
}

void Model::head_backward(ForwardState& st, Tensor dres) {
  // The norm's output takes its own gradient once the LM head's weight gradient has used it.
  DeviceArray dxf;
  if (sequence_parallel()) {
    DeviceArray gathered;
    whole_rows(st.xf.t, gathered);
    linear_backward(gathered.t, lm_head_, nullptr, st.logits.t, gathered.t, 0.0f);
    dxf = reduce_rows(std::move(gathered));
  } else {
    linear_backward(st.xf.t, lm_head_, nullptr, st.logits.t, st.xf.t, 0.0f);
    dxf = reduce_rows(std::move(st.xf));
  }
  st.logits = {};
  norm_backward(stage_output(st), final_norm_, final_norm_bias_, st.mean_f.t, st.rstd_f.t, dxf.t,
                dres);
}

// ---- a pipeline stage ----

Model::StageTensors Model::stage_input_buffers(std::int64_t tokens) {
  StageTensors s;
  s.x = allocate(backend_.compute_dtype(),
                 {partition_.layout.local_tokens(tokens), arch_.hidden_size});
  if (arch_.is_moe()) s.router = allocate(DType::F32, {2 * arch_.num_experts});
  return s;
}

Model::StageTensors Model::stage_grad_buffers(std::int64_t tokens) {
  StageTensors s;
  s.x = allocate(backend_.compute_dtype(),
                 {partition_.layout.local_tokens(tokens), arch_.hidden_size});
  if (arch_.is_moe()) s.router = allocate(DType::F32, {arch_.num_experts});
  return s;
}

Tensor Model::stage_output(const ForwardState& st) const {
  return st.layers.empty() ? st.x0.t : st.layers.back().mlp.y.t;
}

Tensor Model::stage_router_sums(const ForwardState& st) const {
  return st.router.t;
}

Tensor Model::logits(const ForwardState& st) const {
  return st.logits.t;
}

double Model::aux_loss(const ForwardState& st) const {
  return st.aux_loss;
}

const std::vector<double>& Model::expert_load(const ForwardState& st) const {
  return st.expert_load;
}

std::unique_ptr<Model::ForwardState> Model::forward_stage(const MicroBatch& mb,
                                                          StageTensors input) {
  const std::int64_t tokens = mb.batch * mb.seq, h = arch_.hidden_size;
  if (static_cast<std::int64_t>(mb.input_ids.size()) != tokens ||
      static_cast<std::int64_t>(mb.targets.size()) != tokens ||
      (!mb.positions.empty() && static_cast<std::int64_t>(mb.positions.size()) != tokens))
    throw std::invalid_argument("Model::forward_stage: micro-batch sizes disagree");

  const std::int64_t local = partition_.layout.local_tokens(tokens);
  auto st = std::make_unique<ForwardState>();
  st->batch = mb.batch;
  st->seq = mb.seq;
  if (!mb.positions.empty()) {
    st->positions = allocate(DType::I32, {mb.batch, mb.seq});
    backend_.copy_from_host(st->positions.t, mb.positions.data());
  }
  if (first_stage()) {
    st->ids = allocate(DType::I32, {tokens});
    backend_.copy_from_host(st->ids.t, mb.input_ids.data());
    DeviceArray partial = allocate(backend_.compute_dtype(), {tokens, h});
    // Each rank embeds the ids of its vocabulary rows (zeros elsewhere); the sum is the embedding.
    backend_.embedding_forward(st->ids.t, embedding_->weight, vocab_.begin, partial.t);
    st->x0 = reduce_rows(std::move(partial));
    if (arch_.is_moe()) {
      st->router = allocate(DType::F32, {2 * arch_.num_experts});
      backend_.fill(st->router.t, 0.0f);
    }
  } else {
    if (input.x.t.numel() != local * h || (arch_.is_moe() && !input.router.t.data))
      throw std::invalid_argument("Model::forward_stage: the stage input has another shape");
    st->x0 = std::move(input.x);
    st->router = std::move(input.router);
  }
  st->layers.resize(layers_.size());
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    layer_forward(layers_[l], l == 0 ? st->x0.t : st->layers[l - 1].mlp.y.t, mb.batch, mb.seq,
                  st->positions.t, st->layers[l], st->router.t);
    // The last layer's activations are used at once, by the head or the next stage.
    if (l + 1 < layers_.size() || !last_stage()) drop_recomputable(st->layers[l]);
  }
  if (last_stage()) head_forward(*st);
  return st;
}

Model::StageTensors Model::backward_stage(std::unique_ptr<ForwardState> st, StageTensors grad,
                                          double aux_scale) {
  const std::int64_t tokens = st->batch * st->seq, h = arch_.hidden_size;
  const std::int64_t local = partition_.layout.local_tokens(tokens);
  DeviceArray dres, dprob;
  if (last_stage()) {
    // The load-balancing loss couples all layers: d aux / d probs[t, e] = E * count_e / T^2 with
    // the totals of the whole forward. With the global-batch scope each of the R data-parallel
    // ranks reports the same loss, so its weight in the step's mean is R times its share.
    if (arch_.is_moe()) {
      const std::int64_t experts = arch_.num_experts;
      std::vector<float> counts(static_cast<std::size_t>(experts)), coefficient(counts.size());
      backend_.copy_to_host(counts.data(), st->router.t.rows(0, experts));
      const double replicas = st->aux_replicas;
      const double total = static_cast<double>(tokens * arch_.num_layers) * replicas;
      for (std::int64_t e = 0; e < experts; ++e)
        coefficient[e] =
            static_cast<float>(aux_scale * replicas * experts * counts[e] / (total * total));
      dprob = allocate(DType::F32, {experts});
      backend_.copy_from_host(dprob.t, coefficient.data());
    }
    dres = allocate(backend_.compute_dtype(), {local, h});
    const Parameter* head[] = {final_norm_, final_norm_bias_, lm_head_};
    for (const Parameter* p : head)
      if (p) open_bucket(p);
    head_backward(*st, dres.t);
    for (const Parameter* p : head)
      if (p) close_bucket(p);
  } else {
    if (grad.x.t.numel() != local * h || (arch_.is_moe() && !grad.router.t.data))
      throw std::invalid_argument("Model::backward_stage: the gradient has another shape");
    dres = std::move(grad.x);
    dprob = std::move(grad.router);
  }
  auto layer_input = [&](std::size_t l) { return l == 0 ? st->x0.t : st->layers[l - 1].mlp.y.t; };
  for (std::size_t l = layers_.size(); l-- > 0;) {
    open_bucket(layers_[l].norm1);
    layer_backward(layers_[l], layer_input(l), st->batch, st->seq, st->positions.t, st->layers[l],
                   dprob.t, dres.t);
    close_bucket(layers_[l].norm1);
    st->layers[l] = {};
  }
  if (first_stage()) {
    DeviceArray gathered;
    open_bucket(embedding_);
    backend_.embedding_backward(st->ids.t, whole_rows(dres.t, gathered), vocab_.begin,
                                embedding_->grad);
    close_bucket(embedding_);
    return {};
  }
  StageTensors out;
  out.x = std::move(dres);
  out.router = std::move(dprob);
  return out;
}

}  // namespace fastllm
