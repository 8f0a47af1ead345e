#include "model/parameters.h"

#include <algorithm>

namespace fastllm {
namespace {

// The sizes a shape is written in.
enum class Size : std::uint8_t { Hidden, Q, KV, Ffn, Experts, Vocab };

std::int64_t size_of(const Architecture& a, Size s) {
  switch (s) {
    case Size::Hidden:
      return a.hidden_size;
    case Size::Q:
      return a.q_size();
    case Size::KV:
      return a.kv_size();
    case Size::Ffn:
      return a.ffn_hidden_size;
    case Size::Experts:
      return a.num_experts;
    case Size::Vocab:
      return a.vocab_size;
  }
  return 0;
}

// When a kind of parameter exists.
enum class When : std::uint8_t { Always, LayerNorm, Biases, Gated, GatedBiases };

bool exists(const Architecture& a, When when) {
  switch (when) {
    case When::Always:
      return true;
    case When::LayerNorm:
      return a.normalization == NormType::LayerNorm;
    case When::Biases:
      return a.add_linear_biases;
    case When::Gated:
      return a.gated;
    case When::GatedBiases:
      return a.gated && a.add_linear_biases;
  }
  return false;
}

// One kind of parameter: the table every architecture's parameters are made from.
struct Kind {
  Role role;
  const char* name;     // Hugging Face name after the block's prefix
  const char* dataset;  // after "/model/" (whole-model kinds) or "/model/layers/"
  TensorSplit split;
  bool transposed;
  When when;
  std::vector<Size> shape;
};

using S = Size;
using T = TensorSplit;

// The table itself, one row a kind (kept aligned as a table).
// clang-format off
const Kind kEmbedding{Role::Embedding, "model.embed_tokens.weight", "embed", T::Vocab, false, When::Always, {S::Vocab, S::Hidden}};

// In each layer, before its MLP ("model.layers.N." + name).
const Kind kAttention[] = {
    {Role::Norm1,     "input_layernorm.weight",          "norm1",      T::Replicated, false, When::Always,    {S::Hidden}},
    {Role::Norm1Bias, "input_layernorm.bias",            "norm1_bias", T::Replicated, false, When::LayerNorm, {S::Hidden}},
    {Role::Q,         "self_attn.q_proj.weight",         "q",          T::Column,     false, When::Always,    {S::Q, S::Hidden}},
    {Role::QBias,     "self_attn.q_proj.bias",           "q_bias",     T::Column,     false, When::Biases,    {S::Q}},
    {Role::K,         "self_attn.k_proj.weight",         "k",          T::KeyValue,   false, When::Always,    {S::KV, S::Hidden}},
    {Role::KBias,     "self_attn.k_proj.bias",           "k_bias",     T::KeyValue,   false, When::Biases,    {S::KV}},
    {Role::V,         "self_attn.v_proj.weight",         "v",          T::KeyValue,   false, When::Always,    {S::KV, S::Hidden}},
    {Role::VBias,     "self_attn.v_proj.bias",           "v_bias",     T::KeyValue,   false, When::Biases,    {S::KV}},
    {Role::O,         "self_attn.o_proj.weight",         "o",          T::Row,        true,  When::Always,    {S::Hidden, S::Q}},
    {Role::OBias,     "self_attn.o_proj.bias",           "o_bias",     T::Replicated, false, When::Biases,    {S::Hidden}},
    {Role::Norm2,     "post_attention_layernorm.weight", "norm2",      T::Replicated, false, When::Always,    {S::Hidden}},
    {Role::Norm2Bias, "post_attention_layernorm.bias",   "norm2_bias", T::Replicated, false, When::LayerNorm, {S::Hidden}},
};

const Kind kRouter{Role::Router, "block_sparse_moe.gate.weight", "router", T::Replicated, false, When::Always, {S::Experts, S::Hidden}};

// A dense MLP ("mlp." + Hugging Face name) or one expert ("block_sparse_moe.experts.E." + Mixtral
// name); the datasets are the same, with an expert axis for MoE.
struct MlpKind {
  Kind kind;
  const char* expert_name;
};
const MlpKind kMlp[] = {
    {{Role::Gate,     "gate_proj.weight", "gate",      T::Column,     false, When::Gated,       {S::Ffn, S::Hidden}}, "w1.weight"},
    {{Role::GateBias, "gate_proj.bias",   "gate_bias", T::Column,     false, When::GatedBiases, {S::Ffn}},            "w1.bias"},
    {{Role::Up,       "up_proj.weight",   "up",        T::Column,     false, When::Always,      {S::Ffn, S::Hidden}}, "w3.weight"},
    {{Role::UpBias,   "up_proj.bias",     "up_bias",   T::Column,     false, When::Biases,      {S::Ffn}},            "w3.bias"},
    {{Role::Down,     "down_proj.weight", "down",      T::Row,        true,  When::Always,      {S::Hidden, S::Ffn}}, "w2.weight"},
    {{Role::DownBias, "down_proj.bias",   "down_bias", T::Replicated, false, When::Biases,      {S::Hidden}},         "w2.bias"},
};

const Kind kFinal[] = {
    {Role::FinalNorm,     "model.norm.weight", "final_norm",      T::Replicated, false, When::Always,    {S::Hidden}},
    {Role::FinalNormBias, "model.norm.bias",   "final_norm_bias", T::Replicated, false, When::LayerNorm, {S::Hidden}},
};

const Kind kLmHead{Role::LmHead, "lm_head.weight", "lm_head", T::Vocab, false, When::Always, {S::Vocab, S::Hidden}};
// clang-format on

bool is_norm(Role role) {
  switch (role) {
    case Role::Norm1:
    case Role::Norm1Bias:
    case Role::Norm2:
    case Role::Norm2Bias:
    case Role::FinalNorm:
    case Role::FinalNormBias:
      return true;
    default:
      return false;
  }
}

}  // namespace

std::int64_t ParameterSpec::numel() const {
  std::int64_t n = 1;
  for (auto d : shape)
    n *= d;
  return n;
}

std::vector<ParameterSpec> parameter_table(const Architecture& a) {
  std::vector<ParameterSpec> out;
  // leading: the dataset's leading axes ({} for whole-model tensors, {L} or {L, E}) and this
  // parameter's coordinates along them.
  auto add = [&](const Kind& k, const std::string& name, const std::string& dataset,
                 std::vector<std::int64_t> leading, std::vector<std::int64_t> index,
                 std::int64_t layer, std::int64_t expert) {
    if (!exists(a, k.when)) return;
    ParameterSpec p;
    p.name = name;
    p.role = k.role;
    for (Size s : k.shape)
      p.shape.push_back(size_of(a, s));
    p.split = k.split;
    p.layer = layer;
    p.expert = expert;
    p.dataset = dataset;
    p.dataset_shape = std::move(leading);
    if (k.transposed) {
      p.dataset_shape.insert(p.dataset_shape.end(), p.shape.rbegin(), p.shape.rend());
    } else {
      p.dataset_shape.insert(p.dataset_shape.end(), p.shape.begin(), p.shape.end());
    }
    p.dataset_index = std::move(index);
    p.transposed = k.transposed;
    out.push_back(std::move(p));
  };
  auto whole_model = [&](const Kind& k) {
    add(k, k.name, std::string("/model/") + k.dataset, {}, {}, -1, -1);
  };

  const std::int64_t layers = a.num_layers, experts = a.num_experts;
  whole_model(kEmbedding);
  for (std::int64_t l = 0; l < layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    auto in_layer = [&](const Kind& k, const std::string& name) {
      add(k, prefix + name, std::string("/model/layers/") + k.dataset, {layers}, {l}, l, -1);
    };
    for (const Kind& k : kAttention)
      in_layer(k, k.name);
    if (a.is_moe()) {
      in_layer(kRouter, kRouter.name);
      for (std::int64_t e = 0; e < experts; ++e) {
        const std::string expert = prefix + "block_sparse_moe.experts." + std::to_string(e) + ".";
        for (const MlpKind& m : kMlp)
          add(m.kind, expert + m.expert_name, std::string("/model/layers/") + m.kind.dataset,
              {layers, experts}, {l, e}, l, e);
      }
    } else {
      for (const MlpKind& m : kMlp)
        in_layer(m.kind, std::string("mlp.") + m.kind.name);
    }
  }
  for (const Kind& k : kFinal)
    whole_model(k);
  if (!a.tie_word_embeddings) whole_model(kLmHead);
  return out;
}

ParameterCount count_parameters(const Architecture& a) {
  ParameterCount c;
  for (const ParameterSpec& p : parameter_table(a)) {
    const std::int64_t n = p.numel();
    c.total += n;
    if (p.role == Role::Embedding) c.embedding += n;
    if (p.role == Role::LmHead) c.lm_head += n;
    if (p.role == Role::FinalNorm || p.role == Role::FinalNormBias) c.final_norm += n;
    if (p.layer == 0) c.per_layer += n;
  }
  return c;
}

std::vector<Parameter> partition_parameters(const Architecture& arch,
                                            const ModelPartition& partition) {
  const Layout& layout = partition.layout;
  const int tp = layout.tensor_parallel, tp_rank = partition.at.tp;
  const VocabSlice vocab = layout.vocab_slice(arch.vocab_size, tp_rank);
  const LayerRange stage = layout.stage_layers(arch.num_layers, partition.at.pp);
  const bool first = partition.first_stage(), last = partition.last_stage();
  const int kv_replicas = layout.kv_replicas(arch);
  const std::int64_t kv_rows = layout.kv_heads_per_rank(arch) * arch.kv_channels;
  const std::int64_t kv_begin = layout.first_kv_head(arch, tp_rank) * arch.kv_channels;

  std::vector<Parameter> out;
  auto add = [&](const ParameterSpec& whole, std::size_t index) {
    Parameter p;
    p.name = whole.name;
    p.role = whole.role;
    p.layer = whole.layer;
    p.expert = whole.expert;
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
      switch (whole.split) {
        case TensorSplit::Replicated:
          p.primary = tp_rank == 0;
          if (layout.sequence_parallel && is_norm(whole.role))
            p.sync = GradientSync::SequenceParallel;
          break;
        case TensorSplit::Column:
          cut(0, tp_rank * (whole.shape[0] / tp), whole.shape[0] / tp);
          break;
        case TensorSplit::Row:
          cut(1, tp_rank * (whole.shape[1] / tp), whole.shape[1] / tp);
          break;
        case TensorSplit::KeyValue:
          cut(0, kv_begin, kv_rows);
          if (kv_replicas > 1) {
            p.primary = tp_rank % kv_replicas == 0;
            p.sync = GradientSync::KvReplicas;
          }
          break;
        case TensorSplit::Vocab:
          cut(0, vocab.begin, vocab.rows);
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
  const std::vector<ParameterSpec> table = parameter_table(arch);
  for (std::size_t i = 0; i < table.size(); ++i) {
    const ParameterSpec& spec = table[i];
    const bool held = spec.role == Role::Embedding ? first
                      : spec.layer >= 0 ? spec.layer >= stage.begin && spec.layer < stage.end
                                        : last;
    if (!held) continue;
    add(spec, i);
    if (tied_across_stages && spec.role == Role::Embedding)
      out.back().sync = GradientSync::TiedEmbedding;
  }
  if (tied_across_stages && last) {
    add(table[0], 0);  // the LM head: a copy of the first stage's embedding
    out.back().primary = false;
    out.back().sync = GradientSync::TiedEmbedding;
  }
  return out;
}

std::int64_t rank_parameters(const Architecture& arch, const Layout& layout, int stage) {
  ModelPartition partition;
  partition.layout = layout;
  partition.at.pp = stage;
  std::int64_t total = 0;
  for (const Parameter& p : partition_parameters(arch, partition))
    total += p.numel;
  return total;
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

}  // namespace fastllm
