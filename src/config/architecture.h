#pragma once
// The model description every part of fastllm builds from, resolved from flags, a config file,
// a Hugging Face checkpoint and defaults, with the source of every value kept for `inspect`.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "config/flags.h"
#include "kernels/backend.h"

namespace fastllm {

enum class NormType { RMSNorm, LayerNorm };

struct Architecture {
  std::int64_t num_layers = 0;
  std::int64_t hidden_size = 0;
  std::int64_t vocab_size = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t head_groups = 0;
  std::int64_t kv_channels = 0;
  std::int64_t ffn_hidden_size = 0;
  bool add_linear_biases = false;
  bool gated = true;
  Activation activation = Activation::SiLU;
  NormType normalization = NormType::RMSNorm;
  double norm_epsilon = 1e-5;
  double rotary_embedding_scale = 0;  // -ln(theta)
  bool tie_word_embeddings = false;
  std::int64_t num_experts = 1;
  std::int64_t num_experts_per_token = 1;

  double rope_theta() const;
  bool is_moe() const { return num_experts > 1; }
  std::int64_t q_size() const { return num_attention_heads * kv_channels; }
  std::int64_t kv_size() const { return head_groups * kv_channels; }
  bool operator==(const Architecture&) const = default;
};

// A JSON object of flag name -> value, as saved in checkpoints; from_json throws UserError naming
// `where` for a missing or malformed field.
std::string architecture_to_json(const Architecture& arch);
Architecture architecture_from_json(const std::string& json, const std::string& where);
// "num_layers 2 vs 3, ..." for the fields that differ.
std::string architecture_difference(const Architecture& a, const Architecture& b);

// Settings that change how the model is run but not its weights.
struct RunSettings {
  std::int64_t window_size = 0;  // 0 = full causal attention
  // false: attention and rotary positions restart at each document start of a packed row.
  bool cross_document_attention = true;
  double moe_aux_loss_coeff = 0;
  // The load-balancing statistics summed over the data-parallel ranks before the loss is formed.
  bool moe_aux_loss_global = false;
  std::int64_t max_sequence_length = 0;  // 0 = unlimited
};

struct ResolvedValue {
  std::string value;
  Source source;
};

struct ModelConfig {
  Architecture arch;
  RunSettings run;
  std::string checkpoint_path;  // empty when the model is described by flags only
  bool load_weights = false;
  // flag name -> resolved value and its source, in flag order, for `inspect` and saved configs.
  std::vector<std::pair<std::string, ResolvedValue>> resolved;
};

// Resolves the model flags of `options` (FlagGroup::Model) against the Hugging Face checkpoint
// they name, if any. Throws UserError for contradictions and invalid combinations.
ModelConfig resolve_model(const Options& options);

// Matmul FLOPs of one token through the model (forward + backward = 6 x weights used + attention),
// docs/DESIGN.md section 7.
double model_flops_per_token(const Architecture& arch, std::int64_t sequence_length,
                             std::int64_t window_size);

}  // namespace fastllm
