#include "config/architecture.h"

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/hf_config.h"

namespace fastllm {
namespace {

// Flags that define the weights: with --load_pretrained_weights=1 they must agree with the
// checkpoint. The rest of the model group only changes how the model is run.
const char* const kArchitectureFlags[] = {"num_layers",
                                          "hidden_size",
                                          "vocab_size",
                                          "num_attention_heads",
                                          "head_groups",
                                          "kv_channels",
                                          "ffn_hidden_size",
                                          "add_linear_biases",
                                          "use_rotary_embeddings",
                                          "rotary_embedding_scale",
                                          "gated",
                                          "activation_type",
                                          "normalization_type",
                                          "norm_epsilon",
                                          "tie_word_embeddings",
                                          "num_experts",
                                          "num_experts_per_token"};
const char* const kRunFlags[] = {"window_size", "cross_document_attention", "moe_aux_loss_coeff",
                                 "moe_aux_loss_scope", "max_sequence_length"};

bool same_value(const FlagSpec& spec, const std::string& a, const std::string& b) {
  switch (spec.type) {
    case FlagType::Int:
      return Options::parse_int(spec.name, a) == Options::parse_int(spec.name, b);
    case FlagType::Bool:
      return Options::parse_bool(spec.name, a) == Options::parse_bool(spec.name, b);
    case FlagType::Float: {
      double x = Options::parse_float(spec.name, a), y = Options::parse_float(spec.name, b);
      return std::fabs(x - y) <= 1e-9 * std::max(std::fabs(x), std::fabs(y));
    }
    default:
      return a == b;
  }
}

std::int64_t positive(const std::string& flag, std::int64_t v) {
  if (v <= 0)
    throw UserError("--" + flag + "=" + std::to_string(v) + ": expected a positive integer");
  return v;
}

// Every size fits the int32 a kernel indexes with, and the whole model stays below 2^40
// parameters: Llama-3.1-405B (4.1e11) and Mixtral-8x22B (1.4e11) fit with room, while a typo such
// as --num_layers=100000 is refused before memory is planned or allocated.
constexpr std::int64_t kMaxDimension = 2'147'483'647;
constexpr long double kMaxParameters = 1'099'511'627'776.0L;  // 2^40

void check_sizes(const Architecture& a, const std::map<std::string, ResolvedValue>& resolved) {
  const std::pair<const char*, std::int64_t> sizes[] = {
      {"num_layers", a.num_layers},           {"hidden_size", a.hidden_size},
      {"vocab_size", a.vocab_size},           {"num_attention_heads", a.num_attention_heads},
      {"head_groups", a.head_groups},         {"kv_channels", a.kv_channels},
      {"ffn_hidden_size", a.ffn_hidden_size}, {"num_experts", a.num_experts}};
  auto where = [&](const char* name) {
    const ResolvedValue& v = resolved.at(name);
    return v.source == Source::Checkpoint ? std::string(" (from the checkpoint's config.json)")
                                          : std::string();
  };
  for (const auto& [name, value] : sizes) {
    if (value > kMaxDimension)
      throw UserError("--" + std::string(name) + "=" + std::to_string(value) + where(name) +
                      ": expected at most " + std::to_string(kMaxDimension));
  }
  // An upper bound of count_parameters, in long double so that no product can overflow.
  const long double h = a.hidden_size, f = a.ffn_hidden_size, q = a.q_size(), kv = a.kv_size();
  const long double expert = (a.gated ? 3.0L : 2.0L) * h * f + 2.0L * f + h;
  const long double layer = 2.0L * h * q + 2.0L * h * kv + 2.0L * q + 2.0L * kv + 4.0L * h +
                            static_cast<long double>(a.num_experts) * (expert + h);
  const long double total =
      (a.tie_word_embeddings ? 1.0L : 2.0L) * a.vocab_size * h + a.num_layers * layer + 2.0L * h;
  if (total >= kMaxParameters) {
    std::string flags;
    for (const auto& [name, value] : sizes)
      flags += " --" + std::string(name) + "=" + std::to_string(value) + where(name);
    char count[32];
    std::snprintf(count, sizeof count, "%.3Le", total);
    throw UserError("the model would have about " + std::string(count) +
                    " parameters, expected fewer than 2^40 = 1099511627776;" + flags +
                    ": lower --num_layers, --hidden_size, --ffn_hidden_size, --vocab_size or "
                    "--num_experts");
  }
}

}  // namespace

double Architecture::rope_theta() const {
  return std::exp(-rotary_embedding_scale);
}

ModelConfig resolve_model(const Options& options) {
  ModelConfig config;
  config.checkpoint_path = options.get_string("pretrained_checkpoint_path");
  const bool from_checkpoint = !config.checkpoint_path.empty();
  config.load_weights = from_checkpoint && options.get_bool("load_pretrained_weights");

  std::map<std::string, std::string> checkpoint;
  if (from_checkpoint) checkpoint = read_hf_config(config.checkpoint_path).values;

  std::map<std::string, ResolvedValue> resolved;
  auto resolve = [&](const std::string& name, bool architecture) {
    const FlagSpec& spec = options.spec(name);
    auto ckpt = checkpoint.find(name);
    ResolvedValue value{options.get_string(name), options.source(name)};
    if (ckpt != checkpoint.end()) {
      if (!options.is_explicit(name)) {
        value = {ckpt->second, Source::Checkpoint};
      } else if (architecture && config.load_weights &&
                 !same_value(spec, value.value, ckpt->second)) {
        throw UserError("--" + name + "=" + value.value + " contradicts the checkpoint " +
                        config.checkpoint_path + ", which has " + ckpt->second +
                        "; drop the flag, or pass --load_pretrained_weights=0 to train a new "
                        "model from that config with the flag's value");
      }
    }
    resolved[name] = value;
    config.resolved.emplace_back(name, value);
  };
  for (const char* name : kArchitectureFlags)
    resolve(name, true);
  for (const char* name : kRunFlags)
    resolve(name, false);

  auto text = [&](const char* name) { return resolved.at(name).value; };
  auto integer = [&](const char* name) { return Options::parse_int(name, text(name)); };
  auto number = [&](const char* name) { return Options::parse_float(name, text(name)); };
  auto flag = [&](const char* name) { return Options::parse_bool(name, text(name)); };
  auto set_derived = [&](const char* name, std::int64_t v) {
    for (auto& [n, rv] : config.resolved) {
      if (n == name) rv.value = std::to_string(v);
    }
  };

  Architecture& a = config.arch;
  a.num_layers = positive("num_layers", integer("num_layers"));
  a.hidden_size = positive("hidden_size", integer("hidden_size"));
  a.vocab_size = positive("vocab_size", integer("vocab_size"));
  a.num_attention_heads = positive("num_attention_heads", integer("num_attention_heads"));
  a.head_groups = integer("head_groups") == 0 ? a.num_attention_heads
                                              : positive("head_groups", integer("head_groups"));
  set_derived("head_groups", a.head_groups);
  if (a.num_attention_heads % a.head_groups != 0)
    throw UserError("--head_groups=" + std::to_string(a.head_groups) +
                    " must divide --num_attention_heads=" + std::to_string(a.num_attention_heads));
  if (integer("kv_channels") == 0) {
    if (a.hidden_size % a.num_attention_heads != 0)
      throw UserError("--hidden_size=" + std::to_string(a.hidden_size) +
                      " is not a multiple of --num_attention_heads=" +
                      std::to_string(a.num_attention_heads) + "; set --kv_channels");
    a.kv_channels = a.hidden_size / a.num_attention_heads;
  } else {
    a.kv_channels = positive("kv_channels", integer("kv_channels"));
  }
  set_derived("kv_channels", a.kv_channels);
  if (a.kv_channels % 2 != 0)
    throw UserError("--kv_channels=" + std::to_string(a.kv_channels) +
                    ": rotary embeddings need an even head width");
  a.ffn_hidden_size = integer("ffn_hidden_size") == 0
                          ? 4 * a.hidden_size
                          : positive("ffn_hidden_size", integer("ffn_hidden_size"));
  set_derived("ffn_hidden_size", a.ffn_hidden_size);
  a.add_linear_biases = flag("add_linear_biases");
  if (!flag("use_rotary_embeddings"))
    throw UserError(
        "--use_rotary_embeddings=0: absolute position embeddings are not implemented; fastllm "
        "models use rotary embeddings (--use_rotary_embeddings=1)");
  a.rotary_embedding_scale = number("rotary_embedding_scale");
  if (!(a.rotary_embedding_scale < 0))
    throw UserError("--rotary_embedding_scale=" + text("rotary_embedding_scale") +
                    ": expected -ln(theta) < 0 (theta 10000 is -9.210340371976184)");
  a.gated = flag("gated");
  a.activation = text("activation_type") == "gelu" ? Activation::GeLU : Activation::SiLU;
  a.normalization =
      text("normalization_type") == "layer_norm" ? NormType::LayerNorm : NormType::RMSNorm;
  a.norm_epsilon = number("norm_epsilon");
  if (!(a.norm_epsilon > 0))
    throw UserError("--norm_epsilon=" + text("norm_epsilon") + ": expected a positive number");
  a.tie_word_embeddings = flag("tie_word_embeddings");
  a.num_experts = positive("num_experts", integer("num_experts"));
  a.num_experts_per_token =
      a.is_moe() ? positive("num_experts_per_token", integer("num_experts_per_token")) : 1;
  if (a.num_experts_per_token > a.num_experts)
    throw UserError("--num_experts_per_token=" + std::to_string(a.num_experts_per_token) +
                    " exceeds --num_experts=" + std::to_string(a.num_experts));

  check_sizes(a, resolved);

  RunSettings& r = config.run;
  r.window_size = integer("window_size");
  if (r.window_size < 0)
    throw UserError("--window_size=" + text("window_size") + ": expected >= 0 (0 = no window)");
  r.cross_document_attention = flag("cross_document_attention");
  r.moe_aux_loss_coeff = number("moe_aux_loss_coeff");
  r.moe_aux_loss_global = text("moe_aux_loss_scope") == "global_batch";
  r.max_sequence_length = integer("max_sequence_length");
  if (r.max_sequence_length < 0)
    throw UserError("--max_sequence_length=" + text("max_sequence_length") + ": expected >= 0");
  return config;
}

double model_flops_per_token(const Architecture& a, std::int64_t seq, std::int64_t window) {
  const double h = static_cast<double>(a.hidden_size), f = static_cast<double>(a.ffn_hidden_size);
  const double attention_weights = h * a.q_size() * 2.0 + 2.0 * h * a.kv_size();
  const double mlp_weights =
      (a.gated ? 3.0 : 2.0) * h * f * static_cast<double>(a.num_experts_per_token) +
      (a.is_moe() ? h * a.num_experts : 0.0);
  const double matmul_weights =
      a.num_layers * (attention_weights + mlp_weights) + static_cast<double>(a.vocab_size) * h;
  const double s = static_cast<double>(seq);
  const double context = (window > 0 && window < seq)
                             ? window - static_cast<double>(window) * window / (2.0 * s)
                             : s / 2.0;
  return 6.0 * matmul_weights +
         6.0 * a.num_layers * a.num_attention_heads * a.kv_channels * context;
}

namespace {

nlohmann::ordered_json to_json(const Architecture& a) {
  return {
      {"num_layers", a.num_layers},
      {"hidden_size", a.hidden_size},
      {"vocab_size", a.vocab_size},
      {"num_attention_heads", a.num_attention_heads},
      {"head_groups", a.head_groups},
      {"kv_channels", a.kv_channels},
      {"ffn_hidden_size", a.ffn_hidden_size},
      {"add_linear_biases", a.add_linear_biases},
      {"gated", a.gated},
      {"activation_type", a.activation == Activation::GeLU ? "gelu" : "silu"},
      {"normalization_type", a.normalization == NormType::LayerNorm ? "layer_norm" : "rms_norm"},
      {"norm_epsilon", a.norm_epsilon},
      {"rotary_embedding_scale", a.rotary_embedding_scale},
      {"tie_word_embeddings", a.tie_word_embeddings},
      {"num_experts", a.num_experts},
      {"num_experts_per_token", a.num_experts_per_token}};
}

}  // namespace

std::string architecture_to_json(const Architecture& a) {
  return to_json(a).dump();
}

Architecture architecture_from_json(const std::string& text, const std::string& where) {
  try {
    const auto j = nlohmann::json::parse(text);
    Architecture a;
    a.num_layers = j.at("num_layers");
    a.hidden_size = j.at("hidden_size");
    a.vocab_size = j.at("vocab_size");
    a.num_attention_heads = j.at("num_attention_heads");
    a.head_groups = j.at("head_groups");
    a.kv_channels = j.at("kv_channels");
    a.ffn_hidden_size = j.at("ffn_hidden_size");
    a.add_linear_biases = j.at("add_linear_biases");
    a.gated = j.at("gated");
    a.activation = j.at("activation_type") == "gelu" ? Activation::GeLU : Activation::SiLU;
    a.normalization =
        j.at("normalization_type") == "layer_norm" ? NormType::LayerNorm : NormType::RMSNorm;
    a.norm_epsilon = j.at("norm_epsilon");
    a.rotary_embedding_scale = j.at("rotary_embedding_scale");
    a.tie_word_embeddings = j.at("tie_word_embeddings");
    a.num_experts = j.at("num_experts");
    a.num_experts_per_token = j.at("num_experts_per_token");
    return a;
  } catch (const nlohmann::json::exception& e) {
    throw UserError(where + ": malformed architecture record: " + e.what());
  }
}

std::string architecture_difference(const Architecture& a, const Architecture& b) {
  const auto ja = to_json(a), jb = to_json(b);
  std::string out;
  for (auto it = ja.begin(); it != ja.end(); ++it) {
    if (jb.at(it.key()) != it.value())
      out += (out.empty() ? "" : ", ") + it.key() + " " + it.value().dump() + " vs " +
             jb.at(it.key()).dump();
  }
  return out;
}

}  // namespace fastllm
