#include "config/flags.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <sstream>

#include "io/error.h"

namespace fastllm {

const char* source_name(Source source) {
  switch (source) {
    case Source::Default:
      return "default";
    case Source::Checkpoint:
      return "checkpoint";
    case Source::ConfigFile:
      return "config file";
    case Source::Flag:
      return "flag";
  }
  return "?";
}

namespace {

using T = FlagType;

const std::vector<FlagSpec> kCommon = {
    {"config", T::String, "", "YAML file whose keys are flag names; flags on the command line win"},
    {"help", T::Bool, "0", "print this command's flags and exit"},
};

const std::vector<FlagSpec> kModel = {
    {"pretrained_checkpoint_type",
     T::Choice,
     "huggingface",
     "format of --pretrained_checkpoint_path",
     {"huggingface"}},
    {"pretrained_checkpoint_path", T::String, "",
     "Hugging Face folder (config.json + *.safetensors) the architecture and weights come from"},
    {"load_pretrained_weights", T::Bool, "1",
     "1: load the checkpoint's weights (architecture flags must agree with it); 0: take only its "
     "config as defaults, flags override, weights start random"},
    {"num_layers", T::Int, "12", "decoder layers (HF num_hidden_layers)"},
    {"hidden_size", T::Int, "1024", "model width (HF hidden_size)"},
    {"vocab_size", T::Int, "32000", "vocabulary size (HF vocab_size)"},
    {"num_attention_heads", T::Int, "16", "query heads (HF num_attention_heads)"},
    {"head_groups", T::Int, "0",
     "key/value heads for grouped-query attention (HF num_key_value_heads); 0 = one per head"},
    {"kv_channels", T::Int, "0", "per-head width (HF head_dim); 0 = hidden_size / heads"},
    {"ffn_hidden_size", T::Int, "0",
     "MLP width, per expert for MoE (HF intermediate_size); 0 = 4 x hidden_size"},
    {"add_linear_biases", T::Bool, "0", "biases on every linear layer (Mistral: 0)"},
    {"use_rotary_embeddings", T::Bool, "1", "rotary position embeddings (the only kind supported)"},
    {"rotary_embedding_scale", T::Float, "-9.210340371976184",
     "-ln(rope theta); -9.2103... is theta 10000 (HF rope_theta)"},
    {"gated", T::Bool, "1", "gated MLP: act(gate) * up (Mistral: 1)"},
    {"activation_type", T::Choice, "silu", "MLP activation (HF hidden_act)", {"silu", "gelu"}},
    {"normalization_type",
     T::Choice,
     "rms_norm",
     "normalisation layer",
     {"rms_norm", "layer_norm"}},
    {"norm_epsilon", T::Float, "1e-5", "normalisation epsilon (HF rms_norm_eps)"},
    {"tie_word_embeddings", T::Bool, "0", "LM head shares the embedding matrix"},
    {"num_experts", T::Int, "1", "experts per MoE layer (HF num_local_experts); 1 = dense MLP"},
    {"num_experts_per_token", T::Int, "2",
     "experts each token is routed to (HF num_experts_per_tok)"},
    {"window_size", T::Int, "0",
     "sliding attention window in tokens (HF sliding_window); 0 = full causal attention"},
    {"cross_document_attention", T::Bool, "1",
     "0: in rows packed with several documents, attention never crosses a document start and "
     "rotary positions restart at 0 in each document (Megatron's --reset-attention-mask "
     "--reset-position-ids); probe takes the documents from position_ids in --input"},
    {"moe_aux_loss_coeff", T::Float, "0.01",
     "weight of the MoE load-balancing loss (HF router_aux_loss_coef)"},
    {"moe_aux_loss_scope",
     T::Choice,
     "micro_batch",
     "tokens the load-balancing statistics are taken over: micro_batch (transformers' definition) "
     "or global_batch (summed over the data-parallel ranks' micro-batches of each pipeline step)",
     {"micro_batch", "global_batch"}},
    {"max_sequence_length", T::Int, "0",
     "longest sequence the model accepts (HF max_position_embeddings); 0 = unlimited"},
};

const std::vector<FlagSpec> kLayout = {
    {"tensor_parallel", T::Int, "1", "ranks each layer is split over (Megatron tensor parallel)"},
    {"pipeline_parallel", T::Int, "1", "pipeline stages of contiguous layers"},
    {"sequence_parallel", T::Bool, "0",
     "1: between the tensor-parallel regions (norms, residuals) each tensor-parallel rank holds "
     "1/T of the tokens (Megatron's sequence parallelism); the sequence length must be a "
     "multiple of --tensor_parallel"},
    {"zero_stage",
     T::Choice,
     "0",
     "1 shards the fp32 master weights and AdamW moments over the data-parallel group; 2 also the "
     "gradients, reduced into each rank's shard layer by layer as backward produces them",
     {"0", "1", "2"}},
};

const std::vector<FlagSpec> kInspect = {
    {"data_parallel", T::Int, "1", "data-parallel replicas (world = data x tensor x pipeline)"},
    {"format", T::Choice, "text", "output format", {"text", "json"}},
    {"device_memory", T::Float, "80",
     "memory of one device in GB (1e9 bytes) the plan is checked against (H100 80, H200 141)"},
};

const std::vector<FlagSpec> kProbe = {
    {"input", T::String, "",
     "safetensors file with input_ids (int64 [batch, seq]) and optionally position_ids and labels "
     "of the same shape (Hugging Face's conventions: a 0 starts a document, -100 is not "
     "predicted)"},
    {"output", T::String, "", "safetensors file to write logits, loss and gradients to"},
    {"seed", T::Int, "1234", "seed of the initial weights when none are loaded"},
};

const FlagSpec kSave{"save", T::String, "",
                     "experiment folder checkpoints are written to (checkpoint-<iteration>.h5)"};
const FlagSpec kLoad{
    "load", T::String, "",
    "checkpoint folder to start from (its newest complete checkpoint), or one file"};

const std::vector<FlagSpec> kConvert = {kSave};

const std::vector<FlagSpec> kExport = {
    kLoad,
    {"output", T::String, "",
     "Hugging Face folder to write (weights, config.json, generation_config.json, tokenizer); "
     "new or empty unless --overwrite=1"},
    {"dtype", T::Choice, "bf16", "dtype of the exported weights", {"bf16", "fp32"}},
    {"max_shard_size", T::String, "5GB",
     "largest safetensors file; bigger models are sharded with model.safetensors.index.json"},
    {"tokenizer", T::String, "",
     "SentencePiece tokenizer.model (or a folder holding one) to ship with the model; default: "
     "the one in the Hugging Face folder the run started from"},
    {"overwrite", T::Bool, "0",
     "replace a non-empty --output folder (nothing of its old content is kept)"},
};

const std::vector<FlagSpec> kTrain = {
    {"train_iters", T::Int, "", "iterations (optimizer steps) to train for"},
    {"batch_size", T::Int, "", "global batch in samples, over all data-parallel ranks"},
    {"micro_batch_size", T::Int, "1", "samples per forward/backward; the rest is accumulation"},
    {"sequence_length", T::Int, "", "tokens per sample"},
    {"lr", T::Float, "3e-4", "peak learning rate"},
    {"min_lr", T::Float, "0", "learning rate at the end of decay"},
    {"lr_warmup_iters", T::Int, "0", "linear warmup iterations"},
    {"lr_decay_style",
     T::Choice,
     "constant",
     "decay after warmup",
     {"constant", "linear", "cosine"}},
    {"lr_decay_iters", T::Int, "0", "iteration at which min_lr is reached; 0 = --train_iters"},
    {"weight_decay", T::Float, "0.01", "AdamW decoupled weight decay (2-D and larger parameters)"},
    {"adam_beta1", T::Float, "0.9", "AdamW beta1"},
    {"adam_beta2", T::Float, "0.999", "AdamW beta2"},
    {"adam_eps", T::Float, "1e-8", "AdamW epsilon"},
    {"clip_grad", T::Float, "1.0", "clip the global gradient L2 norm to this; 0 = no clipping"},
    {"seed", T::Int, "1234", "seed of the initial weights and of the data shuffle"},
    {"init_std", T::Float, "0.02", "standard deviation of initial weights (from scratch)"},
    {"log_interval", T::Int, "10", "iterations between progress lines and metrics records"},
    {"eval_interval", T::Int, "0", "iterations between validation losses; 0 = none"},
    {"eval_iters", T::Int, "10", "batches of the validation split per evaluation"},
    {"peak_tflops", T::Float, "0",
     "peak TFLOP/s of one device for MFU; 0 = the backend's (989, the H100/H200 dense bf16 peak, "
     "on CUDA; none on the host)"},
    {"sample_interval", T::Int, "0",
     "iterations between greedy samples of --sample_prompt printed as 'sample: ...' and recorded "
     "in metrics.jsonl; 0 = none"},
    {"sample_prompt", T::String, "", "the text the samples continue (after BOS); empty: BOS alone"},
    {"sample_tokens", T::Int, "32", "tokens generated per sample (fewer when EOS comes first)"},
    {"tokenizer", T::String, "",
     "SentencePiece tokenizer.model (or a folder holding one) of the samples; default: the one "
     "in --pretrained_checkpoint_path"},
};

const std::vector<FlagSpec> kData = {
    {"data_path", T::List, "",
     "indexed datasets (PREFIX of PREFIX.bin/.idx), optionally weighted: 0.7 A 0.3 B"},
    {"split", T::String, "969,30,1", "train,validation,test proportions of each dataset"},
    {"data_sampling",
     T::Choice,
     "packed",
     "packed: documents concatenated and cut into samples; document: one document per sample, "
     "padded",
     {"packed", "document"}},
    {"data_shuffle", T::Bool, "1", "seeded shuffle of documents and samples; 0 keeps file order"},
};

const std::vector<FlagSpec> kCheckpoint = {
    kSave,
    kLoad,
    {"save_interval", T::Int, "0", "iterations between checkpoints (0: only at the end)"},
    {"keep_checkpoints", T::Int, "3", "newest checkpoints kept in --save; 0 keeps all"},
    {"max_skipped_steps", T::Int, "10",
     "consecutive steps with a non-finite loss or gradient norm (each skipped) before the run "
     "stops; 0 never stops"},
};

const std::vector<FlagSpec> kPrepare = {
    {"input", T::List, "", "text or JSONL files (or folders of them) to tokenize"},
    {"tokenizer", T::String, "", "SentencePiece tokenizer.model, or a folder holding one"},
    {"output", T::String, "", "dataset prefix: writes PREFIX.bin and PREFIX.idx"},
    {"format",
     T::Choice,
     "auto",
     "input format; auto: JSONL for *.jsonl/*.json, else text",
     {"auto", "text", "jsonl"}},
    {"split_lines", T::Bool, "0", "text files: one document per line instead of per file"},
    {"json_key", T::String, "text", "JSONL files: the field holding each document"},
    {"prepend_bos", T::Bool, "1",
     "start every document with the tokenizer's beginning-of-sequence id (<s>), as Mistral saw"},
    {"append_eos", T::Bool, "1",
     "end every document with the tokenizer's end-of-sequence id (</s>), so a model learns to "
     "stop"},
};

const std::vector<FlagSpec> kBackend = {
    {"backend",
     T::Choice,
     "host",
     "where to compute: host (CPU, fp32) or cuda (one GPU per rank)",
     {"host", "cuda"}},
    {"dtype",
     T::Choice,
     "auto",
     "compute dtype; auto: fp32 on the host, bf16 on CUDA (fp32 master weights either way)",
     {"auto", "fp32", "bf16"}},
    {"attention_kernel",
     T::Choice,
     "cudnn",
     "CUDA attention: cudnn (cuDNN's fused SDPA, bf16 only: with --dtype=fp32 the own kernel "
     "runs) or own (fastllm's FlashAttention-style kernel); no effect on the host backend",
     {"cudnn", "own"}},
    {"recompute",
     T::Choice,
     "selective",
     "activations recomputed in backward: none; selective (norm outputs and the MLP activation, "
     "about a third of the activation memory for ~1% more time); full (only each layer's input "
     "is kept, the layer is replayed: about a third more compute); results are bit-identical",
     {"none", "selective", "full"}},
};

const std::vector<FlagSpec> kGenerate = {
    {"prompt", T::String, "",
     "the text to continue (BOS is prepended, as Mistral's tokenizer does)"},
    {"prompt_file", T::String, "", "a text file of prompts, one per line (empty lines skipped)"},
    {"prompt_ids", T::String, "",
     "one prompt as comma-separated token ids, taken as they are (no BOS added); the "
     "continuation is printed as ids: for a model without a tokenizer"},
    kLoad,
    {"tokenizer", T::String, "",
     "SentencePiece tokenizer.model (or a folder holding one); default: the one in "
     "--pretrained_checkpoint_path, or in the Hugging Face folder a --load checkpoint started "
     "from"},
    {"max_new_tokens", T::Int, "64", "most tokens generated per prompt; stops earlier at EOS"},
    {"temperature", T::Float, "0",
     "0: greedy (the most probable token); > 0: sample softmax(logits / temperature)"},
    {"top_p", T::Float, "1",
     "sampling keeps the most probable tokens up to this probability mass (nucleus)"},
    {"seed", T::Int, "1234", "seed of the sampling (prompt i of a file uses seed + i)"},
};

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

// Levenshtein distance: the number of one-character edits from a to b.
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j)
    row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// The declared flag closest to `name` when it is close enough to be what was meant, else "".
std::string nearest_flag(const std::string& name, const std::vector<std::string>& flags) {
  // Megatron and Fast-LLM users type dashes (--seq-length); ours are written with underscores.
  std::string normalised = name;
  std::replace(normalised.begin(), normalised.end(), '-', '_');
  std::string best;
  std::size_t best_distance = std::max<std::size_t>(2, normalised.size() / 2) + 1;
  for (const std::string& candidate : flags) {
    // A flag the name begins (--lr_warmup for --lr_warmup_iters) is as near as one typo.
    const std::size_t d = normalised.size() >= 3 && candidate.starts_with(normalised)
                              ? std::size_t{1}
                              : edit_distance(normalised, candidate);
    if (d < best_distance) {
      best = candidate;
      best_distance = d;
    }
  }
  return best;
}

std::string type_name(const FlagSpec& spec) {
  switch (spec.type) {
    case T::Int:
      return "integer";
    case T::Float:
      return "number";
    case T::Bool:
      return "0|1";
    case T::String:
      return "text";
    case T::List:
      return "list";
    case T::Choice: {
      std::string s;
      for (const auto& c : spec.choices)
        s += (s.empty() ? "" : "|") + c;
      return s;
    }
  }
  return "?";
}

}  // namespace

const std::vector<FlagSpec>& flags_of(FlagGroup group) {
  switch (group) {
    case FlagGroup::Common:
      return kCommon;
    case FlagGroup::Model:
      return kModel;
    case FlagGroup::Layout:
      return kLayout;
    case FlagGroup::Inspect:
      return kInspect;
    case FlagGroup::Probe:
      return kProbe;
    case FlagGroup::Convert:
      return kConvert;
    case FlagGroup::Export:
      return kExport;
    case FlagGroup::Train:
      return kTrain;
    case FlagGroup::Data:
      return kData;
    case FlagGroup::Checkpoint:
      return kCheckpoint;
    case FlagGroup::Prepare:
      return kPrepare;
    case FlagGroup::Backend:
      return kBackend;
    case FlagGroup::Generate:
      return kGenerate;
  }
  throw std::logic_error("unknown flag group");
}

Options::Options(std::string command, std::vector<FlagGroup> groups)
    : command_(std::move(command)), groups_(std::move(groups)) {
  groups_.insert(groups_.begin(), FlagGroup::Common);
  for (FlagGroup g : groups_) {
    for (const FlagSpec& spec : flags_of(g)) {
      if (specs_.emplace(spec.name, spec).second) order_.push_back(spec.name);
    }
  }
}

std::int64_t Options::parse_int(const std::string& flag, const std::string& text) {
  std::int64_t v = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || ptr != text.data() + text.size() || text.empty())
    throw UserError("--" + flag + "=" + text + ": expected an integer");
  return v;
}

double Options::parse_float(const std::string& flag, const std::string& text) {
  std::istringstream in(text);
  double v = 0;
  in >> v;
  if (text.empty() || in.fail() || !in.eof() || !std::isfinite(v))
    throw UserError("--" + flag + "=" + text + ": expected a number");
  return v;
}

bool Options::parse_bool(const std::string& flag, const std::string& text) {
  if (text == "1" || text == "true" || text == "True") return true;
  if (text == "0" || text == "false" || text == "False") return false;
  throw UserError("--" + flag + "=" + text + ": expected 0 or 1");
}

void Options::set(const std::string& name, std::vector<std::string> items, Source source) {
  auto it = specs_.find(name);
  if (it == specs_.end()) {
    std::string where =
        source == Source::ConfigFile ? "config file key '" + name + "'" : "--" + name;
    const std::string nearest = nearest_flag(name, order_);
    throw UserError("unknown flag " + where + " for 'fastllm " + command_ + "'" +
                    (nearest.empty() ? "" : "; did you mean --" + nearest + "?") +
                    "; see 'fastllm " + command_ + " --help'");
  }
  const FlagSpec& spec = it->second;
  if (spec.type != T::List && items.size() != 1)
    throw UserError("--" + name + " takes one value, got " + std::to_string(items.size()));
  if (spec.type == T::List && items.empty())
    throw UserError("--" + name + " needs at least one value");
  for (const std::string& item : items) {
    switch (spec.type) {
      case T::Int:
        parse_int(name, item);
        break;
      case T::Float:
        parse_float(name, item);
        break;
      case T::Bool:
        parse_bool(name, item);
        break;
      case T::Choice:
        if (std::find(spec.choices.begin(), spec.choices.end(), item) == spec.choices.end())
          throw UserError("--" + name + "=" + item + ": expected one of " + type_name(spec));
        break;
      case T::String:
      case T::List:
        break;
    }
  }
  if (name == "help") {
    help_ = parse_bool(name, items[0]);
    return;
  }
  values_[name] = Value{std::move(items), source};
}

void Options::parse(const std::vector<std::string>& args) {
  std::vector<std::pair<std::string, std::vector<std::string>>> given;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (!starts_with(arg, "--") || arg.size() == 2)
      throw UserError("unexpected argument '" + arg + "' for 'fastllm " + command_ +
                      "': flags are written --name=value or --name value");
    std::string name = arg.substr(2);
    std::vector<std::string> items;
    auto eq = name.find('=');
    if (eq != std::string::npos) {
      items.push_back(name.substr(eq + 1));
      name = name.substr(0, eq);
    }
    auto it = specs_.find(name);
    bool is_list = it != specs_.end() && it->second.type == T::List;
    bool is_bool = it != specs_.end() && it->second.type == T::Bool;
    if (eq == std::string::npos) {
      // Lists take every following word up to the next flag; a bare boolean means 1.
      while (i + 1 < args.size() && !starts_with(args[i + 1], "--")) {
        items.push_back(args[++i]);
        if (!is_list) break;
      }
      if (items.empty() && is_bool) items.push_back("1");
      if (items.empty() && it != specs_.end())
        throw UserError("--" + name + " needs a value (" + type_name(it->second) + ")");
    }
    given.emplace_back(name, std::move(items));
  }
  // The config file is read first so that flags win whatever their position.
  for (const auto& [name, items] : given) {
    if (name == "config") set(name, items, Source::Flag);
  }
  if (auto* config = find("config")) load_config_file(config->items[0]);
  for (auto& [name, items] : given) {
    if (name != "config") set(name, items, Source::Flag);
  }
}

namespace {

// A YAML node as a message shows it: flow style, at most about 80 characters, however deep or
// long the node is.
void describe_yaml(const YAML::Node& node, int depth, std::string& out) {
  if (out.size() > 80) return;
  if (node.IsScalar()) {
    out += node.Scalar().substr(0, 80);
  } else if (node.IsSequence() || node.IsMap()) {
    out += node.IsMap() ? "{" : "[";
    if (depth >= 4) {
      out += "...";
    } else {
      bool first = true;
      for (const auto& item : node) {
        if (out.size() > 80) break;
        if (!first) out += ", ";
        first = false;
        if (node.IsMap()) {
          describe_yaml(item.first, depth + 1, out);
          out += ": ";
          describe_yaml(item.second, depth + 1, out);
        } else {
          describe_yaml(item, depth + 1, out);
        }
      }
    }
    out += node.IsMap() ? "}" : "]";
  } else {
    out += "null";
  }
}

std::string yaml_text(const YAML::Node& node) {
  std::string out;
  describe_yaml(node, 0, out);
  if (out.size() > 80) out = out.substr(0, 77) + "...";
  for (char& c : out)
    if (const auto u = static_cast<unsigned char>(c); u < 0x20 || u >= 0x7F) c = '?';
  return out;
}

const char* yaml_kind(const YAML::Node& node) {
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  if (node.IsScalar()) return "a value";
  return "empty (null)";
}

}  // namespace

void Options::load_config_file(const std::string& path) {
  if (!std::filesystem::exists(path)) throw UserError("--config " + path + ": file not found");
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    throw UserError("--config " + path + ": not valid YAML: " + e.what());
  }
  if (root.IsNull()) return;
  if (!root.IsMap()) throw UserError("--config " + path + ": expected a mapping of flag: value");
  const std::string where = "--config " + path + ": ";
  for (const auto& entry : root) {
    if (!entry.first.IsScalar())
      throw UserError(where + "a key is " + yaml_kind(entry.first) + " " + yaml_text(entry.first) +
                      ", expected a flag name");
    const std::string key = entry.first.Scalar();
    if (key == "config") throw UserError(where + "a config file cannot name another");
    const YAML::Node& value = entry.second;
    const auto spec = specs_.find(key);
    // Only list flags take a YAML list; anything else must be one plain value of the flag's type.
    const bool is_list = spec != specs_.end() && spec->second.type == T::List;
    const std::string expected = spec == specs_.end() ? ""
                                 : is_list            ? "one value or a list of values"
                                                      : "one " + type_name(spec->second) + " value";
    std::vector<std::string> items;
    if (value.IsScalar()) {
      items.push_back(value.Scalar());
    } else if (is_list && value.IsSequence()) {
      for (const auto& item : value) {
        if (!item.IsScalar())
          throw UserError(where + "key '" + key + "' = " + yaml_text(value) + " holds " +
                          yaml_kind(item) + " " + yaml_text(item) + ", expected " + expected);
        items.push_back(item.Scalar());
      }
    } else if (spec != specs_.end()) {
      throw UserError(where + "key '" + key + "' is " + yaml_kind(value) + " " + yaml_text(value) +
                      ", expected " + expected);
    }
    try {
      set(key, std::move(items), Source::ConfigFile);
    } catch (const UserError& e) {
      if (spec == specs_.end()) throw;  // the unknown-flag message already names the key
      throw UserError(where + "key '" + key + "': " + e.what());
    }
  }
}

const Value* Options::find(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? nullptr : &it->second;
}

const FlagSpec& Options::spec(const std::string& name) const {
  auto it = specs_.find(name);
  if (it == specs_.end())
    throw std::logic_error("flag --" + name + " not declared for " + command_);
  return it->second;
}

bool Options::has_spec(const std::string& name) const {
  return specs_.count(name) > 0;
}

bool Options::is_explicit(const std::string& name) const {
  return find(name) != nullptr;
}

bool Options::is_set(const std::string& name) const {
  return find(name) != nullptr || !spec(name).default_value.empty();
}

Source Options::source(const std::string& name) const {
  const Value* v = find(name);
  return v ? v->source : Source::Default;
}

std::vector<std::string> Options::get_list(const std::string& name) const {
  if (const Value* v = find(name)) return v->items;
  const std::string& d = spec(name).default_value;
  if (d.empty()) return {};
  std::vector<std::string> items;
  std::istringstream in(d);
  for (std::string word; in >> word;)
    items.push_back(word);
  return items;
}

std::string Options::get_string(const std::string& name) const {
  if (const Value* v = find(name)) return v->items[0];
  return spec(name).default_value;
}

std::int64_t Options::get_int(const std::string& name) const {
  return parse_int(name, get_string(name));
}

double Options::get_float(const std::string& name) const {
  return parse_float(name, get_string(name));
}

bool Options::get_bool(const std::string& name) const {
  return parse_bool(name, get_string(name));
}

std::map<std::string, Value> Options::all() const {
  std::map<std::string, Value> out;
  for (const auto& name : order_) {
    if (name == "help") continue;
    if (const Value* v = find(name)) {
      out[name] = *v;
    } else if (!spec(name).default_value.empty()) {
      out[name] = Value{get_list(name), Source::Default};
    }
  }
  return out;
}

std::string Options::help_text() const {
  std::ostringstream out;
  out << "usage: fastllm " << command_
      << " [--flag=value | --flag value ...] [--config run.yaml]\n\n";
  for (const auto& name : order_) {
    const FlagSpec& spec = specs_.at(name);
    std::string head = "  --" + name + " (" + type_name(spec) + ")";
    out << head;
    out << std::string(head.size() < 44 ? 44 - head.size() : 1, ' ') << spec.help;
    if (!spec.default_value.empty()) out << " [default: " << spec.default_value << "]";
    out << "\n";
  }
  return out.str();
}

}  // namespace fastllm
