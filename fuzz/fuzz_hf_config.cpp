// A Hugging Face config.json, read as `--pretrained_checkpoint_path` reads it.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_support.h"
#include "io/error.h"
#include "io/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto& dir = fastllm::fuzz::scratch();
  fastllm::fuzz::write_file(dir / "config.json", data, size);
  try {
    (void)fastllm::read_hf_config(dir.string());
  } catch (const fastllm::UserError&) {
  }
  return 0;
}
