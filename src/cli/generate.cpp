// `fastllm generate`: continues prompts with a model from a Hugging Face folder or an HDF5
// checkpoint, greedy or sampled, with a key/value cache, under any tensor/pipeline layout.
// Data-parallel replicas (ranks beyond tensor x pipeline) each generate the same continuations;
// world rank 0 prints them.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "config/architecture.h"
#include "config/layout.h"
#include "io/error.h"
#include "io/tokenizer.h"
#include "model/generator.h"
#include "model/hf_weights.h"
#include "model/model.h"
#include "parallel/backend_setup.h"
#include "parallel/mpi_session.h"
#include "parallel/topology.h"
#include "train/checkpoint.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;

// A prompt as given, and its token ids once tokenized.
struct Prompt {
  std::string where;  // "--prompt", "prompts.txt:3"
  std::string text;
  std::vector<std::int32_t> ids;
};

std::vector<std::int32_t> parse_ids(const std::string& text, std::int64_t vocab) {
  std::vector<std::int32_t> ids;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    const std::size_t end = std::min(text.find(',', begin), text.size());
    std::string item = text.substr(begin, end - begin);
    const auto first = item.find_first_not_of(' '), last = item.find_last_not_of(' ');
    item = first == std::string::npos ? "" : item.substr(first, last - first + 1);
    const std::int64_t id = Options::parse_int("prompt_ids", item);
    if (id < 0 || id >= vocab)
      throw UserError("--prompt_ids: token id " + std::to_string(id) +
                      " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    ids.push_back(static_cast<std::int32_t>(id));
    begin = end + 1;
  }
  return ids;
}

std::vector<Prompt> read_prompts(const Options& options) {
  const std::string text = options.get_string("prompt"), file = options.get_string("prompt_file"),
                    ids = options.get_string("prompt_ids");
  const int given = !text.empty() + !file.empty() + !ids.empty();
  if (given == 0)
    throw UserError(
        "no prompt: give --prompt=TEXT, --prompt_file=FILE (one prompt per line) or "
        "--prompt_ids=ID,ID,...");
  if (given > 1)
    throw UserError("give one of --prompt, --prompt_file and --prompt_ids, not " +
                    std::to_string(given));
  if (!text.empty()) return {{"--prompt", text, {}}};
  if (!ids.empty()) return {{"--prompt_ids", ids, {}}};
  std::ifstream in(file);
  if (!in) throw UserError("--prompt_file=" + file + ": cannot be read");
  std::vector<Prompt> prompts;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    prompts.push_back({file + ":" + std::to_string(number), line, {}});
  }
  if (prompts.empty()) throw UserError("--prompt_file=" + file + ": no prompts (every line empty)");
  return prompts;
}

// The newest checkpoint of a --load folder, or the file itself.
std::string checkpoint_file(const std::string& load) {
  if (fs::is_directory(load)) {
    const auto found = list_checkpoints(load);
    if (found.empty()) throw UserError("--load=" + load + ": no checkpoint-*.h5 in the folder");
    return found.back();
  }
  if (!fs::is_regular_file(load)) throw UserError("--load=" + load + ": no such file or folder");
  return load;
}

// A value of a checkpoint's saved configuration (flag name -> value as written).
std::string saved_value(const nlohmann::json& saved, const char* key) {
  if (!saved.is_object() || !saved.contains(key) || saved[key].is_null()) return "";
  const auto& v = saved[key];
  return v.is_string() ? v.get<std::string>() : v.dump();
}

RunSettings saved_run_settings(const std::string& config_json) {
  const auto saved = nlohmann::json::parse(config_json, nullptr, false);
  RunSettings run;
  if (const std::string v = saved_value(saved, "window_size"); !v.empty())
    run.window_size = Options::parse_int("window_size", v);
  if (const std::string v = saved_value(saved, "max_sequence_length"); !v.empty())
    run.max_sequence_length = Options::parse_int("max_sequence_length", v);
  return run;
}

std::string recorded_source(const std::string& config_json) {
  return saved_value(nlohmann::json::parse(config_json, nullptr, false),
                     "pretrained_checkpoint_path");
}

// The tokens transformers' generate stops at for a Hugging Face folder: the eos_token_id (one id
// or a list) of generation_config.json, or of config.json where the folder has no
// generation_config.json; empty when it names none.
std::vector<std::int32_t> folder_eos_ids(const fs::path& folder) {
  for (const char* name : {"generation_config.json", "config.json"}) {
    const fs::path file = folder / name;
    if (!fs::is_regular_file(file)) continue;
    std::ifstream in(file);
    const auto json = nlohmann::json::parse(in, nullptr, false);
    if (!json.is_object())
      throw UserError(file.string() + ": not a JSON object; expected a Hugging Face " + name);
    if (!json.contains("eos_token_id") || json["eos_token_id"].is_null()) return {};
    const nlohmann::json& eos = json["eos_token_id"];
    std::vector<std::int32_t> ids;
    for (const auto& id : eos.is_array() ? eos : nlohmann::json::array({eos})) {
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0)
        throw UserError(file.string() + ": eos_token_id " + eos.dump() +
                        ": expected a token id or a list of token ids");
      ids.push_back(id.get<std::int32_t>());
    }
    return ids;
  }
  return {};
}

void check_settings(const Options& options) {
  if (options.get_int("max_new_tokens") < 1)
    throw UserError("--max_new_tokens=" + std::to_string(options.get_int("max_new_tokens")) +
                    ": expected at least 1");
  const double temperature = options.get_float("temperature"), top_p = options.get_float("top_p");
  if (!(temperature >= 0) || !std::isfinite(temperature))
    throw UserError("--temperature=" + options.get_string("temperature") +
                    ": expected 0 (greedy) or a positive number");
  if (!(top_p > 0 && top_p <= 1))
    throw UserError("--top_p=" + options.get_string("top_p") + ": expected a number in (0, 1]");
}

}  // namespace

// Each prompt's token ids, checked against the vocabulary and the model's length.
void encode_prompts(std::vector<Prompt>& prompts, const std::optional<Tokenizer>& tokenizer,
                    bool ids_given, const ModelConfig& config, std::int64_t max_new) {
  const std::int64_t vocab = config.arch.vocab_size, limit = config.run.max_sequence_length;
  if (tokenizer && tokenizer->vocab_size() > vocab)
    throw UserError("tokenizer " + tokenizer->path() + " has " +
                    std::to_string(tokenizer->vocab_size()) + " pieces, more than the model's " +
                    std::to_string(vocab) + " (vocab_size)");
  for (Prompt& p : prompts) {
    if (ids_given) {
      p.ids = parse_ids(p.text, vocab);
    } else {
      // BOS first, as Mistral's tokenizer (and transformers with it) encodes a prompt.
      if (tokenizer->bos_id() >= 0) p.ids.push_back(tokenizer->bos_id());
      const std::vector<std::int32_t> text_ids = tokenizer->encode(p.text);
      p.ids.insert(p.ids.end(), text_ids.begin(), text_ids.end());
    }
    const auto length = static_cast<std::int64_t>(p.ids.size());
    if (limit > 0 && length + max_new > limit)
      throw UserError(p.where + ": the prompt has " + std::to_string(length) +
                      " tokens; with --max_new_tokens=" + std::to_string(max_new) + " that is " +
                      std::to_string(length + max_new) + " positions, more than the model's " +
                      std::to_string(limit) + " (max_sequence_length)");
  }
}

int run_generate(const Args& args) {
  Options options("generate",
                  {FlagGroup::Generate, FlagGroup::Model, FlagGroup::Layout, FlagGroup::Backend});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const std::string load = options.get_string("load");
  const std::string folder = options.get_string("pretrained_checkpoint_path");
  if (load.empty() == folder.empty())
    throw UserError(load.empty()
                        ? "generate needs a model: --pretrained_checkpoint_path=<Hugging Face "
                          "folder> or --load=<checkpoint folder or file>"
                        : "give --pretrained_checkpoint_path or --load, not both");
  check_settings(options);
  std::vector<Prompt> prompts = read_prompts(options);
  const bool ids_given = !options.get_string("prompt_ids").empty();
  const std::int64_t max_new = options.get_int("max_new_tokens");

  // The tokenizer: --tokenizer, else the Hugging Face folder's (for --load, the folder the run
  // started from, known once the checkpoint is read).
  std::optional<Tokenizer> tokenizer;
  // Where the model came from: its tokenizer and end tokens are that folder's.
  std::string source = folder;
  if (!options.get_string("tokenizer").empty()) {
    tokenizer.emplace(options.get_string("tokenizer"));
  } else if (!folder.empty() && fs::is_regular_file(fs::path(folder) / "tokenizer.model")) {
    tokenizer.emplace(folder);
  } else if (!folder.empty() && !ids_given) {
    throw UserError("no tokenizer: " + folder +
                    " has no tokenizer.model; pass --tokenizer=tokenizer.model (or --prompt_ids)");
  }

  MpiSession mpi;
  ModelConfig config;
  std::string path;
  if (!folder.empty()) {
    config = resolve_model(options);
    check_pretrained_weights(config);
    if (!config.load_weights)
      throw UserError("generate needs the model's weights: --load_pretrained_weights=1");
  } else {
    path = checkpoint_file(load);
    config.arch = checkpoint_architecture(path, mpi.world());
  }
  const Layout layout = resolve_layout(options, mpi.size(), config.arch);
  const std::unique_ptr<Backend> backend = backend_from_flags(options);
  const Topology topo =
      make_topology(layout, config.arch, mpi.world(), communicator_factory(*backend));
  Model model(*backend, config.arch, config.run, model_partition(topo));
  if (!folder.empty()) {
    load_hf_weights(model, config.checkpoint_path);
  } else {
    CheckpointRanks ranks;
    ranks.world = mpi.world();
    ranks.dp_rank = topo.at.dp;
    ranks.dp_size = layout.data_parallel;
    const TrainState state = load_checkpoint(path, model, nullptr, ranks);
    config.run = saved_run_settings(state.config_json);
    source = recorded_source(state.config_json);
    if (!tokenizer && !source.empty() && fs::is_regular_file(fs::path(source) / "tokenizer.model"))
      tokenizer.emplace(source);
    if (!tokenizer && !ids_given)
      throw UserError("no tokenizer: " + path +
                      " records no Hugging Face folder holding a tokenizer.model; pass "
                      "--tokenizer=tokenizer.model (or --prompt_ids)");
  }

  encode_prompts(prompts, tokenizer, ids_given, config, max_new);

  Generator generator(model, config.run,
                      layout.pipeline_parallel > 1 ? topo.pipeline.get() : nullptr);
  GenerationSettings settings;
  settings.max_new_tokens = max_new;
  settings.temperature = options.get_float("temperature");
  settings.top_p = options.get_float("top_p");
  // As transformers: the model's own end tokens, else the tokenizer's.
  if (!source.empty()) settings.eos_ids = folder_eos_ids(source);
  if (settings.eos_ids.empty() && tokenizer) settings.eos_ids = {tokenizer->eos_id()};
  const auto seed = static_cast<std::uint64_t>(options.get_int("seed"));
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    settings.seed = seed + i;
    std::vector<std::int32_t> tokens = generator.generate(prompts[i].ids, settings);
    if (mpi.rank() != 0) continue;
    if (ids_given) {
      for (std::size_t t = 0; t < tokens.size(); ++t)
        std::cout << (t ? "," : "") << tokens[t];
      std::cout << "\n";
    } else {
      if (!tokens.empty() &&
          std::ranges::find(settings.eos_ids, tokens.back()) != settings.eos_ids.end())
        tokens.pop_back();
      std::cout << tokenizer->decode(tokens) << "\n";
    }
    std::cout.flush();
  }
  return 0;
}

}  // namespace fastllm
