#include "io/hf_config.h"

#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/error.h"

namespace fastllm {
namespace {

using nlohmann::json;

// A real config.json nests at most 3 levels; the bound keeps a hostile file from overflowing the
// stack where a value is printed (dump is recursive).
constexpr int kMaxJsonDepth = 64;

// Text quoted from the file stays on one short line of ASCII.
std::string one_line(std::string text, std::size_t max) {
  if (text.size() > max) text = text.substr(0, max - 3) + "...";
  for (char& c : text)
    if (const auto u = static_cast<unsigned char>(c); u < 0x20 || u >= 0x7F) c = '?';
  return text;
}

std::string excerpt(const json& value) {
  return one_line(value.dump(-1, ' ', true, json::error_handler_t::replace), 80);
}

// Shortest text that reads back as the same double.
std::string format_double(double v) {
  char buf[64];
  auto result = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, result.ptr);
}

class ConfigReader {
 public:
  ConfigReader(std::string path, json root) : path_(std::move(path)), root_(std::move(root)) {}

  bool has(const std::string& key) const { return root_.contains(key) && !root_[key].is_null(); }

  const json& require(const std::string& key) const {
    if (!has(key)) throw UserError(path_ + ": missing required key '" + key + "'");
    return root_[key];
  }

  std::int64_t positive_int(const std::string& key) const {
    return positive_int(key, require(key));
  }

  std::int64_t positive_int(const std::string& key, const json& v) const {
    if (!v.is_number_integer() || v.get<std::int64_t>() <= 0)
      throw UserError(path_ + ": '" + key + "' = " + excerpt(v) + ", expected a positive integer");
    return v.get<std::int64_t>();
  }

  double number(const std::string& key, const json& v) const {
    if (!v.is_number())
      throw UserError(path_ + ": '" + key + "' = " + excerpt(v) + ", expected a number");
    return v.get<double>();
  }

  bool boolean(const std::string& key) const {
    const json& v = root_[key];
    if (!v.is_boolean())
      throw UserError(path_ + ": '" + key + "' = " + excerpt(v) + ", expected true or false");
    return v.get<bool>();
  }

  std::string text(const std::string& key) const {
    const json& v = require(key);
    if (!v.is_string())
      throw UserError(path_ + ": '" + key + "' = " + excerpt(v) + ", expected a string");
    return v.get<std::string>();
  }

  [[noreturn]] void unsupported(const std::string& key, const std::string& why) const {
    throw UserError(path_ + ": '" + key + "' = " + excerpt(root_[key]) +
                    " is not supported: " + why);
  }

  const json& root() const { return root_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  json root_;
};

double rope_theta(const ConfigReader& c) {
  // transformers 5 nests the rope settings in rope_parameters; older configs use rope_theta and
  // rope_scaling at the top level.
  if (c.has("rope_scaling")) {
    const json& s = c.root()["rope_scaling"];
    const json type =
        s.is_object() ? s.value("rope_type", s.value("type", json("default"))) : json();
    if (type != "default") c.unsupported("rope_scaling", "rope scaling is not implemented");
  }
  if (c.has("rope_parameters")) {
    const json& p = c.root()["rope_parameters"];
    if (!p.is_object()) c.unsupported("rope_parameters", "expected an object");
    if (p.contains("rope_type") && p["rope_type"] != "default")
      c.unsupported("rope_parameters", "only rope_type 'default' is implemented (no rope scaling)");
    if (p.contains("rope_theta")) return c.number("rope_parameters.rope_theta", p["rope_theta"]);
  }
  if (c.has("rope_theta")) return c.number("rope_theta", c.root()["rope_theta"]);
  return 10000.0;  // transformers' default for these model types
}

}  // namespace

HfConfig read_hf_config(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path dir(folder);
  const std::string path = (dir / "config.json").string();
  if (!fs::is_directory(dir))
    throw UserError("--pretrained_checkpoint_path=" + folder + ": not a folder");
  std::ifstream in(path);
  if (!in) throw UserError(path + ": not found (a Hugging Face folder has a config.json)");
  json root;
  try {
    root = json::parse(in, [&](int depth, json::parse_event_t, json&) {
      if (depth > kMaxJsonDepth)
        throw UserError(path + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth) +
                        " levels, expected a flat object of settings");
      return true;
    });
  } catch (const json::exception& e) {
    throw UserError(path + ": not valid JSON: " + one_line(e.what(), 200));
  }
  if (!root.is_object()) throw UserError(path + ": expected a JSON object");
  ConfigReader c(path, root);

  HfConfig out;
  out.path = path;
  out.model_type = c.text("model_type");
  if (out.model_type != "mistral" && out.model_type != "mixtral" && out.model_type != "llama")
    throw UserError(path + ": model_type '" + out.model_type +
                    "' is not supported; expected mistral, mixtral or llama");
  auto& v = out.values;

  const std::int64_t hidden = c.positive_int("hidden_size");
  const std::int64_t heads = c.positive_int("num_attention_heads");
  v["hidden_size"] = std::to_string(hidden);
  v["num_layers"] = std::to_string(c.positive_int("num_hidden_layers"));
  v["num_attention_heads"] = std::to_string(heads);
  v["vocab_size"] = std::to_string(c.positive_int("vocab_size"));
  v["ffn_hidden_size"] = std::to_string(c.positive_int("intermediate_size"));
  v["head_groups"] =
      std::to_string(c.has("num_key_value_heads") ? c.positive_int("num_key_value_heads") : heads);
  if (c.has("head_dim")) {
    v["kv_channels"] = std::to_string(c.positive_int("head_dim"));
  } else {
    if (hidden % heads != 0)
      throw UserError(path + ": hidden_size " + std::to_string(hidden) +
                      " is not a multiple of num_attention_heads " + std::to_string(heads) +
                      " and there is no head_dim");
    v["kv_channels"] = std::to_string(hidden / heads);
  }

  const double theta = rope_theta(c);
  if (!(theta > 1.0))
    throw UserError(path + ": rope theta " + format_double(theta) + ", expected > 1");
  v["use_rotary_embeddings"] = "1";
  v["rotary_embedding_scale"] = format_double(-std::log(theta));

  const std::string act = c.has("hidden_act") ? c.text("hidden_act") : "silu";
  if (act != "silu" && act != "gelu")
    c.unsupported("hidden_act", "expected silu or gelu (the exact erf form)");
  v["activation_type"] = act;
  v["gated"] = "1";
  v["normalization_type"] = "rms_norm";
  v["norm_epsilon"] =
      format_double(c.has("rms_norm_eps") ? c.number("rms_norm_eps", root["rms_norm_eps"]) : 1e-6);
  v["tie_word_embeddings"] =
      c.has("tie_word_embeddings") && c.boolean("tie_word_embeddings") ? "1" : "0";
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (c.has(key) && c.boolean(key))
      c.unsupported(key, "fastllm's --add_linear_biases puts biases on every linear layer");
  }
  v["add_linear_biases"] = "0";

  if (c.has("sliding_window")) {
    v["window_size"] = std::to_string(c.positive_int("sliding_window"));
  } else {
    v["window_size"] = "0";
  }
  if (c.has("max_position_embeddings"))
    v["max_sequence_length"] = std::to_string(c.positive_int("max_position_embeddings"));

  if (out.model_type == "mixtral") {
    v["num_experts"] = std::to_string(c.positive_int("num_local_experts"));
    v["num_experts_per_token"] = std::to_string(c.positive_int("num_experts_per_tok"));
    if (c.has("router_aux_loss_coef"))
      v["moe_aux_loss_coeff"] =
          format_double(c.number("router_aux_loss_coef", root["router_aux_loss_coef"]));
    if (c.has("router_jitter_noise") &&
        c.number("router_jitter_noise", root["router_jitter_noise"]) != 0.0)
      c.unsupported("router_jitter_noise", "router jitter is not implemented; set it to 0");
  } else {
    v["num_experts"] = "1";
  }
  return out;
}

}  // namespace fastllm
