// A Megatron indexed dataset: the input is a little-endian uint32 n, then n bytes of .idx, then
// the .bin. Opening validates the index against the .bin; every read after that must stay inside.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fuzz/fuzz_support.h"
#include "io/error.h"
#include "io/indexed_dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 4) return 0;
  std::uint32_t idx_size;
  std::memcpy(&idx_size, data, 4);
  const std::size_t n = std::min<std::size_t>(idx_size, size - 4);
  const auto prefix = fastllm::fuzz::scratch() / "dataset";
  fastllm::fuzz::write_file(prefix.string() + ".idx", data + 4, n);
  fastllm::fuzz::write_file(prefix.string() + ".bin", data + 4 + n, size - 4 - n);
  try {
    const fastllm::IndexedDataset dataset(prefix.string());
    // Bounded so that a valid index of many empty sequences cannot make one run slow.
    const std::int64_t documents = std::min<std::int64_t>(dataset.num_documents(), 64);
    for (std::int64_t d = 0; d < documents; ++d)
      (void)dataset.document(d);
    (void)dataset.max_token();
    dataset.check_vocabulary(1000);
  } catch (const fastllm::UserError&) {
  }
  return 0;
}
