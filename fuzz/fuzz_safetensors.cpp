// One safetensors file: the header checks, then every read of every tensor the header admits.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_support.h"
#include "io/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = fastllm::fuzz::scratch() / "input.safetensors";
  fastllm::fuzz::write_file(path, data, size);
  try {
    const auto file = fastllm::SafetensorsFile::open(path);
    for (const fastllm::TensorInfo& t : file.tensors()) {
      // Reads are bounded by the file's size, so a header naming a huge tensor is refused above.
      if (t.bytes() > (std::size_t{1} << 20)) continue;
      try {
        (void)file.read_f32(t.name);
      } catch (const fastllm::UserError&) {
      }
      try {
        (void)file.read_i64(t.name);
      } catch (const fastllm::UserError&) {
      }
    }
  } catch (const fastllm::UserError&) {
  }
  return 0;
}
