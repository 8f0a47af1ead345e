// The command line of `fastllm train`: the input is split into arguments at newlines. --config is
// dropped (the YAML target covers it), so that a run never reads a file the input names.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_flags_common.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> args(1);
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] == '\n')
      args.emplace_back();
    else
      args.back().push_back(static_cast<char>(data[i]));
  }
  std::erase_if(args, [](const std::string& a) { return a.find("config") != std::string::npos; });
  fastllm::fuzz::parse_train_flags(args);
  return 0;
}
