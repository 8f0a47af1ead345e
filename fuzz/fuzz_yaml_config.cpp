// A `--config run.yaml` file, read by `fastllm train` and every typed value of it converted.
#include <cstddef>
#include <cstdint>

#include "config/flags.h"
#include "fuzz/fuzz_flags_common.h"
#include "fuzz/fuzz_support.h"
#include "io/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = fastllm::fuzz::scratch() / "run.yaml";
  fastllm::fuzz::write_file(path, data, size);
  fastllm::fuzz::parse_train_flags({"--config", path.string()});
  return 0;
}
