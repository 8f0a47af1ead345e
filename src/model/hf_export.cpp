#include "model/hf_export.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "io/error.h"
#include "io/half.h"
#include "io/safetensors.h"
#include "model/hf_tokenizer_json.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

// Missing ids (-1) are JSON null.
ordered_json id_or_null(std::int32_t id) {
  return id < 0 ? ordered_json(nullptr) : ordered_json(id);
}

ordered_json piece_or_null(std::int32_t id, const std::string& piece) {
  return id < 0 ? ordered_json(nullptr) : ordered_json(piece);
}

// Mistral-7B-v0.1's tokenizer configuration: BOS added, EOS not, the legacy SentencePiece
// behaviour that spm_encode (and so `fastllm prepare`) has.
ordered_json tokenizer_config(const SpecialTokens& s, std::int64_t max_length) {
  ordered_json j;
  j["add_bos_token"] = s.bos_id >= 0;
  j["add_eos_token"] = false;
  ordered_json decoder = ordered_json::object();
  std::map<std::int32_t, std::string> specials{{s.eos_id, s.eos}};
  if (s.unk_id >= 0) specials[s.unk_id] = s.unk;
  if (s.bos_id >= 0) specials[s.bos_id] = s.bos;
  for (const auto& [id, piece] : specials)
    decoder[std::to_string(id)] = added_token(piece, true);
  j["added_tokens_decoder"] = decoder;
  j["bos_token"] = piece_or_null(s.bos_id, s.bos);
  j["clean_up_tokenization_spaces"] = false;
  j["eos_token"] = s.eos;
  j["legacy"] = true;
  if (max_length > 0) j["model_max_length"] = max_length;
  j["pad_token"] = nullptr;
  j["sp_model_kwargs"] = ordered_json::object();
  j["spaces_between_special_tokens"] = false;
  j["tokenizer_class"] = "LlamaTokenizer";
  j["unk_token"] = piece_or_null(s.unk_id, s.unk);
  return j;
}

ordered_json special_tokens_map(const SpecialTokens& s) {
  ordered_json j;
  if (s.bos_id >= 0) j["bos_token"] = added_token(s.bos);
  j["eos_token"] = added_token(s.eos);
  if (s.unk_id >= 0) j["unk_token"] = added_token(s.unk);
  return j;
}

ordered_json generation_config(const SpecialTokens& s) {
  ordered_json j;
  j["bos_token_id"] = id_or_null(s.bos_id);
  j["eos_token_id"] = s.eos_id;
  return j;
}

void write_json(const fs::path& path, const ordered_json& j) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) throw UserError("export: cannot write " + path.string());
}

// `output` without a trailing separator, so that its siblings have a name to derive from.
fs::path normalised(const std::string& output) {
  fs::path p = fs::path(output).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p;
}

fs::path sibling(const fs::path& target, const std::string& what) {
  std::string name = ".";
  name += target.filename().string();
  name += '.';
  name += what;
  name += '-';
  name += std::to_string(::getpid());
  return target.parent_path() / name;
}

// A temporary folder next to the target, removed unless committed.
class StagedFolder {
 public:
  StagedFolder(fs::path target, bool overwrite)
      : target_(std::move(target)), staging_(sibling(target_, "export")), overwrite_(overwrite) {
    std::error_code err;
    if (!target_.parent_path().empty()) fs::create_directories(target_.parent_path(), err);
    if (err || !fs::create_directory(staging_, err) || err)
      throw UserError("--output=" + target_.string() + ": cannot create " + staging_.string() +
                      (err ? ": " + err.message() : ": it exists"));
  }
  StagedFolder(const StagedFolder&) = delete;
  StagedFolder& operator=(const StagedFolder&) = delete;
  ~StagedFolder() {
    std::error_code ignored;
    if (!committed_) fs::remove_all(staging_, ignored);
  }

  const fs::path& path() const { return staging_; }

  void commit() {
    std::error_code err;
    fs::path old;
    if (fs::exists(target_)) {
      if (fs::is_empty(target_)) {
        fs::remove(target_, err);
      } else if (overwrite_) {
        old = sibling(target_, "old");
        fs::rename(target_, old, err);
      } else {
        throw UserError("--output=" + target_.string() +
                        " was filled by something else during the export; nothing was changed");
      }
      if (err) throw UserError("--output=" + target_.string() + ": " + err.message());
    }
    fs::rename(staging_, target_, err);
    if (err) {
      std::error_code ignored;
      if (!old.empty()) fs::rename(old, target_, ignored);
      throw UserError("--output=" + target_.string() + ": cannot rename " + staging_.string() +
                      " into place: " + err.message());
    }
    committed_ = true;
    if (!old.empty()) fs::remove_all(old, err);
  }

 private:
  fs::path target_;
  fs::path staging_;
  bool overwrite_;
  bool committed_ = false;
};

// The first non-finite element of a weight, as an error naming it.
void check_finite(const Parameter& p, const std::vector<float>& values) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (std::isfinite(values[i])) continue;
    std::string shape;
    for (const std::int64_t d : p.shape)
      shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    throw UserError("export: weight '" + p.name + "' [" + shape + "] holds " +
                    (std::isnan(values[i]) ? "NaN" : "an infinity") + " at element " +
                    std::to_string(i) +
                    "; a Hugging Face model with it would be useless, so nothing was written "
                    "(export an earlier checkpoint of the run)");
  }
}

std::vector<std::byte> encode(const std::vector<float>& values, bool bf16) {
  std::vector<std::byte> bytes(values.size() * (bf16 ? 2 : 4));
  if (!bf16) {
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return bytes;
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint16_t b = f32_to_bf16(values[i]);
    std::memcpy(bytes.data() + 2 * i, &b, 2);
  }
  return bytes;
}

// Parameters grouped in model order into shards of at most max_bytes (a larger tensor alone).
std::vector<std::vector<const Parameter*>> plan_shards(const Model& model, std::int64_t bytes_per,
                                                       std::int64_t max_bytes,
                                                       std::int64_t& total) {
  std::vector<std::vector<const Parameter*>> shards(1);
  std::int64_t shard_bytes = 0;
  total = 0;
  for (const Parameter& p : model.parameters()) {
    std::int64_t size = bytes_per;
    for (const std::int64_t d : p.shape)
      size *= d;
    if (!shards.back().empty() && shard_bytes + size > max_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&p);
    shard_bytes += size;
    total += size;
  }
  return shards;
}

// One shard at a time, so that at most one shard's bytes are held besides the model.
int write_weights(Model& model, const HfExportSettings& s, const fs::path& folder) {
  std::int64_t total = 0;
  const auto shards = plan_shards(model, s.bf16 ? 2 : 4, s.max_shard_bytes, total);
  const std::map<std::string, std::string> metadata{{"format", "pt"}};
  ordered_json index;
  index["metadata"] = {{"total_size", total}};
  for (std::size_t n = 0; n < shards.size(); ++n) {
    std::vector<std::vector<std::byte>> data;
    std::vector<SafetensorsTensor> tensors;
    for (const Parameter* p : shards[n]) {
      const std::vector<float> values = model.read_weight(*p);
      check_finite(*p, values);
      data.push_back(encode(values, s.bf16));
      tensors.push_back(
          {p->name, s.bf16 ? SafetensorsDtype::BF16 : SafetensorsDtype::F32, p->shape, {}});
    }
    for (std::size_t i = 0; i < tensors.size(); ++i)
      tensors[i].data = data[i];
    char name[64];
    if (shards.size() == 1) {
      std::snprintf(name, sizeof name, "model.safetensors");
    } else {
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", n + 1, shards.size());
    }
    write_safetensors(folder / name, tensors, metadata);
    for (const auto& t : tensors)
      index["weight_map"][t.name] = name;
  }
  if (shards.size() > 1) write_json(folder / "model.safetensors.index.json", index);
  return static_cast<int>(shards.size());
}

}  // namespace

SpecialTokens special_tokens(const Tokenizer* tokenizer) {
  SpecialTokens s;
  if (tokenizer == nullptr) return s;
  s.bos_id = tokenizer->bos_id();
  s.eos_id = tokenizer->eos_id();
  s.unk_id = tokenizer->unk_id();
  s.bos = s.bos_id >= 0 ? tokenizer->piece(s.bos_id) : "";
  s.eos = tokenizer->piece(s.eos_id);
  s.unk = s.unk_id >= 0 ? tokenizer->piece(s.unk_id) : "";
  return s;
}

double exact_rope_theta(double scale) {
  const double theta = std::exp(-scale);
  for (int digits = 1; digits <= 17; ++digits) {
    char text[64];
    std::snprintf(text, sizeof text, "%.*g", digits, theta);
    const double candidate = std::strtod(text, nullptr);
    if (-std::log(candidate) == scale) return candidate;
  }
  return theta;
}

ordered_json hf_config_json(const HfExportSettings& s, const SpecialTokens& tokens) {
  const Architecture& a = s.arch;
  auto unsupported = [](const std::string& what) {
    throw UserError(
        "export: " + what +
        " has no Hugging Face Mistral/Mixtral equivalent; this model cannot be exported");
  };
  if (a.normalization != NormType::RMSNorm) unsupported("--normalization_type=layer_norm");
  if (a.add_linear_biases) unsupported("--add_linear_biases=1");
  if (!a.gated) unsupported("--gated=0");
  ordered_json j;
  j["architectures"] = {a.is_moe() ? "MixtralForCausalLM" : "MistralForCausalLM"};
  j["model_type"] = a.is_moe() ? "mixtral" : "mistral";
  j["vocab_size"] = a.vocab_size;
  j["hidden_size"] = a.hidden_size;
  j["intermediate_size"] = a.ffn_hidden_size;
  j["num_hidden_layers"] = a.num_layers;
  j["num_attention_heads"] = a.num_attention_heads;
  j["num_key_value_heads"] = a.head_groups;
  j["head_dim"] = a.kv_channels;
  j["hidden_act"] = a.activation == Activation::GeLU ? "gelu" : "silu";
  j["rms_norm_eps"] = a.norm_epsilon;
  j["rope_theta"] = exact_rope_theta(a.rotary_embedding_scale);
  j["sliding_window"] = s.run.window_size > 0 ? ordered_json(s.run.window_size) : nullptr;
  if (s.max_position_embeddings > 0) j["max_position_embeddings"] = s.max_position_embeddings;
  j["tie_word_embeddings"] = a.tie_word_embeddings;
  j["bos_token_id"] = id_or_null(tokens.bos_id);
  j["eos_token_id"] = tokens.eos_id;
  if (a.is_moe()) {
    j["num_local_experts"] = a.num_experts;
    j["num_experts_per_tok"] = a.num_experts_per_token;
    j["router_aux_loss_coef"] = s.run.moe_aux_loss_coeff;
    j["output_router_logits"] = false;
  }
  j["torch_dtype"] = s.bf16 ? "bfloat16" : "float32";
  return j;
}

void check_export_target(const std::string& output, bool overwrite, const std::string& checkpoint) {
  const fs::path target = normalised(output);
  std::error_code err;
  const fs::file_status status = fs::status(target, err);
  if (!fs::exists(status)) return;
  if (!fs::is_directory(status))
    throw UserError("--output=" + output + " exists and is not a folder; choose a folder path");
  if (fs::is_empty(target, err)) return;
  if (!overwrite) {
    std::string names;
    int shown = 0;
    for (const auto& entry : fs::directory_iterator(target, err)) {
      if (shown++ == 3) {
        names += ", ...";
        break;
      }
      names += (names.empty() ? "" : ", ") + entry.path().filename().string();
    }
    throw UserError("--output=" + output + " is not empty (it holds " + names +
                    "); pass --overwrite=1 to replace everything in it with the export, or "
                    "choose a new folder");
  }
  const fs::path source = fs::weakly_canonical(checkpoint, err);
  const fs::path folder = fs::weakly_canonical(target, err);
  if (std::mismatch(folder.begin(), folder.end(), source.begin(), source.end()).first ==
      folder.end())
    throw UserError("--output=" + output + " holds the checkpoint being exported (" + checkpoint +
                    "); --overwrite=1 would delete it: choose another folder");
}

int export_hf_model(Model& model, const HfExportSettings& s, const std::string& output,
                    bool overwrite) {
  const SpecialTokens tokens = special_tokens(s.tokenizer);
  if (s.tokenizer != nullptr && s.tokenizer->vocab_size() > s.arch.vocab_size)
    throw UserError("export: tokenizer '" + s.tokenizer->path() + "' has " +
                    std::to_string(s.tokenizer->vocab_size()) +
                    " pieces, more than the model's vocab_size " +
                    std::to_string(s.arch.vocab_size) +
                    "; pass the tokenizer the model was "
                    "trained with (--tokenizer)");
  const ordered_json config = hf_config_json(s, tokens);
  // A Hugging Face folder's own tokenizer.json is the upstream's serialization: shipped as it is;
  // otherwise one is generated, before any weight is written (it can be refused).
  fs::path upstream_tokenizer_json;
  ordered_json tokenizer_json;
  if (s.tokenizer != nullptr) {
    const fs::path model_file(s.tokenizer->path());
    std::error_code err;
    if (model_file.filename() == "tokenizer.model" &&
        fs::is_regular_file(model_file.parent_path() / "tokenizer.json", err)) {
      upstream_tokenizer_json = model_file.parent_path() / "tokenizer.json";
    } else {
      tokenizer_json = hf_tokenizer_json(*s.tokenizer);
    }
  }

  StagedFolder folder(normalised(output), overwrite);
  const int files = write_weights(model, s, folder.path());
  write_json(folder.path() / "config.json", config);
  write_json(folder.path() / "generation_config.json", generation_config(tokens));
  if (s.tokenizer != nullptr) {
    std::error_code err;
    fs::copy_file(s.tokenizer->path(), folder.path() / "tokenizer.model", err);
    if (err) throw UserError("export: cannot copy " + s.tokenizer->path() + ": " + err.message());
    if (upstream_tokenizer_json.empty()) {
      write_json(folder.path() / "tokenizer.json", tokenizer_json);
    } else {
      fs::copy_file(upstream_tokenizer_json, folder.path() / "tokenizer.json", err);
      if (err)
        throw UserError("export: cannot copy " + upstream_tokenizer_json.string() + ": " +
                        err.message());
    }
    write_json(folder.path() / "tokenizer_config.json",
               tokenizer_config(tokens, s.max_position_embeddings));
    write_json(folder.path() / "special_tokens_map.json", special_tokens_map(tokens));
  }
  folder.commit();
  return files;
}

}  // namespace fastllm
