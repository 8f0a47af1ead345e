#include "model/stored_layout.h"

#include <regex>
#include <stdexcept>

namespace fastllm {

StoredAs stored_as(const Architecture& a, const std::string& name) {
  const std::int64_t L = a.num_layers, E = a.num_experts, H = a.hidden_size, F = a.ffn_hidden_size;
  const std::int64_t Q = a.q_size(), K = a.kv_size(), V = a.vocab_size;
  if (name == "model.embed_tokens.weight") return {"/model/embed", {V, H}, {}, false};
  if (name == "lm_head.weight") return {"/model/lm_head", {V, H}, {}, false};
  if (name == "model.norm.weight") return {"/model/final_norm", {H}, {}, false};
  if (name == "model.norm.bias") return {"/model/final_norm_bias", {H}, {}, false};

  static const std::regex layer_re(R"(model\.layers\.(\d+)\.(.+))");
  static const std::regex expert_re(R"(block_sparse_moe\.experts\.(\d+)\.(w[123])\.(weight|bias))");
  std::smatch m;
  if (!std::regex_match(name, m, layer_re)) throw std::invalid_argument("not a parameter: " + name);
  const std::int64_t layer = std::stoll(m[1]);
  const std::string rest = m[2];
  struct Kind {
    const char* hf;
    const char* dataset;
    std::vector<std::int64_t> shape;
    bool transposed;
  };
  const Kind kinds[] = {
      {"input_layernorm.weight", "norm1", {H}, false},
      {"input_layernorm.bias", "norm1_bias", {H}, false},
      {"post_attention_layernorm.weight", "norm2", {H}, false},
      {"post_attention_layernorm.bias", "norm2_bias", {H}, false},
      {"self_attn.q_proj.weight", "q", {Q, H}, false},
      {"self_attn.k_proj.weight", "k", {K, H}, false},
      {"self_attn.v_proj.weight", "v", {K, H}, false},
      {"self_attn.o_proj.weight", "o", {Q, H}, true},
      {"self_attn.q_proj.bias", "q_bias", {Q}, false},
      {"self_attn.k_proj.bias", "k_bias", {K}, false},
      {"self_attn.v_proj.bias", "v_bias", {K}, false},
      {"self_attn.o_proj.bias", "o_bias", {H}, false},
      {"mlp.gate_proj.weight", "gate", {F, H}, false},
      {"mlp.up_proj.weight", "up", {F, H}, false},
      {"mlp.down_proj.weight", "down", {F, H}, true},
      {"mlp.gate_proj.bias", "gate_bias", {F}, false},
      {"mlp.up_proj.bias", "up_bias", {F}, false},
      {"mlp.down_proj.bias", "down_bias", {H}, false},
      {"block_sparse_moe.gate.weight", "router", {E, H}, false},
  };
  for (const Kind& k : kinds) {
    if (rest != k.hf) continue;
    std::vector<std::int64_t> shape{L};
    shape.insert(shape.end(), k.shape.begin(), k.shape.end());
    return {std::string("/model/layers/") + k.dataset, shape, {layer}, k.transposed};
  }
  if (std::regex_match(rest, m, expert_re)) {
    const std::int64_t expert = std::stoll(m[1]);
    const std::string w = m[2];
    const bool bias = m[3] == "bias";
    const std::string kind = w == "w1" ? "gate" : w == "w3" ? "up" : "down";
    std::vector<std::int64_t> shape{L, E};
    if (bias) {
      shape.push_back(w == "w2" ? H : F);
    } else {
      shape.push_back(F);
      shape.push_back(H);
    }
    return {"/model/layers/" + kind + (bias ? "_bias" : ""),
            shape,
            {layer, expert},
            !bias && w == "w2"};
  }
  throw std::invalid_argument("not a parameter: " + name);
}

}  // namespace fastllm
