// `fastllm convert` (Hugging Face folder -> HDF5 checkpoint, the one-time resharding) and
// `fastllm export` (HDF5 checkpoint -> Hugging Face folder that transformers loads).
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "config/architecture.h"
#include "io/error.h"
#include "io/half.h"
#include "io/safetensors.h"
#include "kernels/host/host_backend.h"
#include "model/hf_weights.h"
#include "parallel/mpi_session.h"
#include "train/checkpoint.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;

std::string resolved_json(const ModelConfig& config) {
  nlohmann::ordered_json j;
  for (const auto& [name, rv] : config.resolved)
    j[name] = rv.value;
  return j.dump();
}

// "5GB", "200KB", "1.5GiB" or a byte count, as transformers' max_shard_size.
std::int64_t parse_size(const std::string& text) {
  std::size_t end = 0;
  double value = 0;
  try {
    value = std::stod(text, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  const std::string unit = text.substr(end);
  const std::pair<const char*, double> units[] = {
      {"", 1},     {"B", 1},        {"KB", 1e3},        {"MB", 1e6},
      {"GB", 1e9}, {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}};
  for (const auto& [name, factor] : units) {
    if (end > 0 && unit == name && value > 0) return static_cast<std::int64_t>(value * factor);
  }
  throw UserError("--max_shard_size=" + text + ": expected a size such as 5GB, 500MB or 200KB");
}

// The run settings a checkpoint was saved with (its resolved configuration).
RunSettings run_settings_of(const std::string& config_json) {
  RunSettings run;
  const auto j = nlohmann::json::parse(config_json, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return run;
  auto get = [&](const char* key) { return j.contains(key) ? j[key].get<std::string>() : ""; };
  if (!get("window_size").empty()) run.window_size = std::stoll(get("window_size"));
  if (!get("moe_aux_loss_coeff").empty())
    run.moe_aux_loss_coeff = std::stod(get("moe_aux_loss_coeff"));
  if (!get("max_sequence_length").empty())
    run.max_sequence_length = std::stoll(get("max_sequence_length"));
  return run;
}

nlohmann::ordered_json hf_config(const Architecture& a, const RunSettings& run, bool bf16) {
  auto unsupported = [](const std::string& what) {
    throw UserError(
        "export: " + what +
        " has no Hugging Face Mistral/Mixtral equivalent; this model cannot be exported");
  };
  if (a.normalization != NormType::RMSNorm) unsupported("--normalization_type=layer_norm");
  if (a.add_linear_biases) unsupported("--add_linear_biases=1");
  if (!a.gated) unsupported("--gated=0");
  nlohmann::ordered_json j;
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
  j["rope_theta"] = a.rope_theta();
  j["sliding_window"] = run.window_size > 0 ? nlohmann::ordered_json(run.window_size) : nullptr;
  j["max_position_embeddings"] = run.max_sequence_length > 0 ? run.max_sequence_length : 32768;
  j["tie_word_embeddings"] = a.tie_word_embeddings;
  if (a.is_moe()) {
    j["num_local_experts"] = a.num_experts;
    j["num_experts_per_tok"] = a.num_experts_per_token;
    j["router_aux_loss_coef"] = run.moe_aux_loss_coeff;
    j["output_router_logits"] = false;
  }
  j["torch_dtype"] = bf16 ? "bfloat16" : "float32";
  return j;
}

}  // namespace

int run_convert(const Args& args) {
  Options options("convert", {FlagGroup::Model, FlagGroup::Convert});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const ModelConfig config = resolve_model(options);
  if (config.checkpoint_path.empty() || !config.load_weights)
    throw UserError(
        "convert needs --pretrained_checkpoint_path=<Hugging Face folder> and "
        "--load_pretrained_weights=1");
  const std::string save = options.get_string("save");
  if (save.empty()) throw UserError("--save is required: the folder to write the checkpoint to");

  MpiSession mpi;
  if (mpi.size() > 1)
    throw UserError("convert runs on one rank (it was started on " + std::to_string(mpi.size()) +
                    "); the checkpoint it writes is read by any layout");
  HostBackend backend;
  Model model(backend, config.arch, config.run);
  load_hf_weights(model, config.checkpoint_path);
  if (mpi.rank() == 0) fs::create_directories(save);
  MPI_Barrier(mpi.world());
  TrainState state;
  state.config_json = resolved_json(config);
  const std::string path = (fs::path(save) / checkpoint_name(0)).string();
  save_checkpoint(path, model, nullptr, state, mpi.world());
  if (mpi.rank() == 0)
    std::cout << "converted " << config.checkpoint_path << " (" << model.parameter_count()
              << " parameters) -> " << path << "\n";
  return 0;
}

int run_export(const Args& args) {
  Options options("export", {FlagGroup::Export});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const std::string load = options.get_string("load"), output = options.get_string("output");
  if (load.empty()) throw UserError("--load is required: a checkpoint folder or file");
  if (output.empty()) throw UserError("--output is required: the Hugging Face folder to write");
  const bool bf16 = options.get_string("dtype") == "bf16";
  const std::int64_t max_shard = parse_size(options.get_string("max_shard_size"));

  MpiSession mpi;
  std::string path = load;
  if (fs::is_directory(load)) {
    const auto found = list_checkpoints(load);
    if (found.empty()) throw UserError("--load=" + load + ": no checkpoint-*.h5 in the folder");
    path = found.back();
  }
  const Architecture arch = checkpoint_architecture(path, mpi.world());
  HostBackend backend;
  Model model(backend, arch, RunSettings{});
  const TrainState state = load_checkpoint(path, model, nullptr, mpi.world());
  const nlohmann::ordered_json config = hf_config(arch, run_settings_of(state.config_json), bf16);
  if (mpi.rank() != 0) return 0;

  // Every tensor converted, then grouped into shards of at most max_shard bytes in model order.
  std::vector<std::vector<std::byte>> data;
  std::vector<SafetensorsTensor> tensors;
  for (const Parameter& p : model.parameters()) {
    const std::vector<float> values = model.read_weight(p);
    std::vector<std::byte> bytes(values.size() * (bf16 ? 2 : 4));
    if (bf16) {
      for (std::size_t i = 0; i < values.size(); ++i) {
        const std::uint16_t b = f32_to_bf16(values[i]);
        std::memcpy(bytes.data() + 2 * i, &b, 2);
      }
    } else {
      std::memcpy(bytes.data(), values.data(), bytes.size());
    }
    data.push_back(std::move(bytes));
    tensors.push_back({p.name, bf16 ? SafetensorsDtype::BF16 : SafetensorsDtype::F32, p.shape, {}});
  }
  std::vector<std::vector<SafetensorsTensor>> shards(1);
  std::int64_t shard_bytes = 0, total = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    tensors[i].data = data[i];
    const auto size = static_cast<std::int64_t>(data[i].size());
    if (!shards.back().empty() && shard_bytes + size > max_shard) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(tensors[i]);
    shard_bytes += size;
    total += size;
  }
  fs::create_directories(output);
  const std::map<std::string, std::string> metadata{{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors(fs::path(output) / "model.safetensors", shards[0], metadata);
  } else {
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", total}};
    for (std::size_t s = 0; s < shards.size(); ++s) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      write_safetensors(fs::path(output) / name, shards[s], metadata);
      for (const auto& t : shards[s])
        index["weight_map"][t.name] = name;
    }
    std::ofstream(fs::path(output) / "model.safetensors.index.json") << index.dump(2) << "\n";
  }
  std::ofstream(fs::path(output) / "config.json") << config.dump(2) << "\n";
  std::cout << "exported " << path << " -> " << output << " (" << shards.size() << " file"
            << (shards.size() > 1 ? "s" : "") << ", " << (bf16 ? "bf16" : "fp32") << ")\n";
  return 0;
}

}  // namespace fastllm
