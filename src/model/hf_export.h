#pragma once
// Writing a model as a Hugging Face folder that transformers' from_pretrained + generate and vLLM
// load: config.json, generation_config.json, the weights as safetensors (sharded with
// model.safetensors.index.json), and, when the model has a tokenizer, its tokenizer.model with a
// LlamaTokenizer configuration and a tokenizer.json (the tokenizer folder's own, or one generated
// from tokenizer.model by model/hf_tokenizer_json.h). The reading side is model/hf_weights.h and
// io/hf_config.h.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "config/architecture.h"
#include "io/tokenizer.h"
#include "model/model.h"

namespace fastllm {

struct HfExportSettings {
  Architecture arch;
  RunSettings run;
  bool bf16 = true;
  std::int64_t max_shard_bytes = 5'000'000'000;
  // The context length written as max_position_embeddings (and the tokenizer's model_max_length);
  // 0 = unknown, left out so that transformers takes its default.
  std::int64_t max_position_embeddings = 0;
  // Copied into the folder with its configuration files; null = no tokenizer files, and Mistral's
  // ids (<s> 1, </s> 2) in config.json.
  const Tokenizer* tokenizer = nullptr;
};

// The special tokens config.json, generation_config.json and tokenizer_config.json name.
struct SpecialTokens {
  std::int32_t bos_id = 1;  // -1 when the tokenizer has none
  std::int32_t eos_id = 2;
  std::int32_t unk_id = 0;  // -1 when the tokenizer has none
  std::string bos = "<s>";
  std::string eos = "</s>";
  std::string unk = "<unk>";
};
SpecialTokens special_tokens(const Tokenizer* tokenizer);

// The rope theta whose -ln is exactly `rotary_embedding_scale`, with the fewest significant digits:
// 10000 for -9.210340371976184, where exp() alone gives 10000.00000000001. A scale that no shorter
// number reproduces gives exp(-scale).
double exact_rope_theta(double rotary_embedding_scale);

// config.json of a MistralForCausalLM / MixtralForCausalLM. Throws UserError for an architecture
// transformers' Mistral and Mixtral cannot express (layer norm, biases, an ungated MLP).
nlohmann::ordered_json hf_config_json(const HfExportSettings& settings,
                                      const SpecialTokens& tokens);

// Throws UserError unless `output` can receive an export: it does not exist, or is an empty
// folder, or (with `overwrite`) a folder that does not hold `checkpoint`, the file being exported.
// Reads only, so every rank can check before a collective load.
void check_export_target(const std::string& output, bool overwrite, const std::string& checkpoint);

// Writes the model into a new temporary folder next to `output` and renames it into place (after
// moving an old `output` aside and removing it, when `overwrite`), so that a failed export leaves
// no partial folder and an overwritten one keeps nothing of the old model. A weight that is not
// finite is a UserError naming it. Returns the number of safetensors files written.
int export_hf_model(Model& model, const HfExportSettings& settings, const std::string& output,
                    bool overwrite);

}  // namespace fastllm
