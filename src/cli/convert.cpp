// `fastllm convert` (Hugging Face folder -> HDF5 checkpoint, the one-time resharding) and
// `fastllm export` (HDF5 checkpoint -> Hugging Face folder that transformers loads).
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.h"
#include "config/architecture.h"
#include "io/error.h"
#include "io/tokenizer.h"
#include "kernels/host/host_backend.h"
#include "model/hf_export.h"
#include "model/hf_weights.h"
#include "parallel/mpi_session.h"
#include "train/checkpoint.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;

// The converted checkpoint's configuration records its source folder, so that export finds the
// tokenizer there.
std::string resolved_json(const ModelConfig& config) {
  nlohmann::ordered_json j;
  j["pretrained_checkpoint_path"] = config.checkpoint_path;
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

// A value of a checkpoint's saved configuration (flag name -> value as written, a string or
// number); nullopt when absent or empty.
std::optional<std::string> saved_value(const nlohmann::json& saved, const char* key) {
  if (!saved.is_object() || !saved.contains(key) || saved[key].is_null()) return std::nullopt;
  const auto& v = saved[key];
  std::string text = v.is_string() ? v.get<std::string>() : v.dump();
  if (text.empty()) return std::nullopt;
  return text;
}

std::int64_t saved_int(const nlohmann::json& saved, const char* key) {
  const auto v = saved_value(saved, key);
  return v ? Options::parse_int(key, *v) : 0;
}

// The run settings a checkpoint was saved with (its resolved configuration).
RunSettings run_settings_of(const nlohmann::json& saved) {
  RunSettings run;
  run.window_size = saved_int(saved, "window_size");
  if (const auto v = saved_value(saved, "moe_aux_loss_coeff"))
    run.moe_aux_loss_coeff = Options::parse_float("moe_aux_loss_coeff", *v);
  run.max_sequence_length = saved_int(saved, "max_sequence_length");
  return run;
}

// The tokenizer to ship when --tokenizer is not given: the tokenizer.model of the Hugging Face
// folder the run started from, else none (with a note, since transformers then cannot tokenize).
std::optional<Tokenizer> recorded_tokenizer(const nlohmann::json& saved) {
  if (const auto source = saved_value(saved, "pretrained_checkpoint_path")) {
    if (fs::is_regular_file(fs::path(*source) / "tokenizer.model")) return Tokenizer(*source);
  }
  std::cerr << "export: note: no tokenizer exported (no --tokenizer, and the run records no "
               "Hugging Face folder holding a tokenizer.model); config.json names Mistral's <s> 1 "
               "and </s> 2; pass --tokenizer=tokenizer.model to ship it\n";
  return std::nullopt;
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
  check_pretrained_weights(config);
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
  HfExportSettings settings;
  settings.bf16 = options.get_string("dtype") == "bf16";
  settings.max_shard_bytes = parse_size(options.get_string("max_shard_size"));
  const bool overwrite = options.get_bool("overwrite");
  std::optional<Tokenizer> tokenizer;
  if (!options.get_string("tokenizer").empty()) tokenizer.emplace(options.get_string("tokenizer"));

  MpiSession mpi;
  std::string path = load;
  if (fs::is_directory(load)) {
    const auto found = list_checkpoints(load);
    if (found.empty()) throw UserError("--load=" + load + ": no checkpoint-*.h5 in the folder");
    path = found.back();
  }
  check_export_target(output, overwrite, path);
  settings.arch = checkpoint_architecture(path, mpi.world());
  HostBackend backend;
  Model model(backend, settings.arch, RunSettings{});
  const TrainState state = load_checkpoint(path, model, nullptr, mpi.world());
  if (mpi.rank() != 0) return 0;

  const auto saved = nlohmann::json::parse(state.config_json, nullptr, false);
  settings.run = run_settings_of(saved);
  // The imported context length, else the length the model was trained at.
  settings.max_position_embeddings = settings.run.max_sequence_length > 0
                                         ? settings.run.max_sequence_length
                                         : saved_int(saved, "sequence_length");
  if (!tokenizer) tokenizer = recorded_tokenizer(saved);
  settings.tokenizer = tokenizer ? &*tokenizer : nullptr;
  const int files = export_hf_model(model, settings, output, overwrite);
  std::cout << "exported " << path << " -> " << output << " (" << files << " file"
            << (files > 1 ? "s" : "") << ", " << (settings.bf16 ? "bf16" : "fp32")
            << (tokenizer ? ", tokenizer " + tokenizer->path() : std::string(", no tokenizer"))
            << ")\n";
  return 0;
}

}  // namespace fastllm
