#pragma once
// Reads a Hugging Face config.json (Mistral, Mixtral, Llama) into fastllm flag values, as the
// table in docs/DESIGN.md section 6 maps them. Anything fastllm would compute differently from
// transformers (rope scaling, partial biases, router noise) is an error, not an approximation.
#include <map>
#include <string>

namespace fastllm {

struct HfConfig {
  std::string path;        // the config.json read
  std::string model_type;  // mistral, mixtral or llama
  // fastllm flag name -> value as it would be written on the command line.
  std::map<std::string, std::string> values;
};

// Throws UserError naming the file and key for anything missing, malformed or unsupported.
HfConfig read_hf_config(const std::string& folder);

}  // namespace fastllm
