// model.safetensors.index.json of a sharded checkpoint, over two small valid shards made once:
// model-00001-of-00002.safetensors (model.embed_tokens.weight [4, 2] F32, model.norm.weight [2]
// F32) and model-00002-of-00002.safetensors (lm_head.weight [4, 2] BF16).
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz/fuzz_support.h"
#include "io/error.h"
#include "io/safetensors.h"

namespace {

const std::filesystem::path& folder() {
  static const std::filesystem::path dir = [] {
    const auto d = fastllm::fuzz::scratch() / "index";
    std::filesystem::create_directories(d);
    const std::array<float, 8> values{1, 2, 3, 4, 5, 6, 7, 8};
    const std::array<std::uint16_t, 8> bf16{0x3f80, 0x4000, 0x4040, 0x4080,
                                            0x40a0, 0x40c0, 0x40e0, 0x4100};
    const auto bytes = [](const auto& a) { return std::as_bytes(std::span(a)); };
    const std::vector<fastllm::SafetensorsTensor> first{
        {"model.embed_tokens.weight", fastllm::SafetensorsDtype::F32, {4, 2}, bytes(values)},
        {"model.norm.weight", fastllm::SafetensorsDtype::F32, {2}, bytes(values).first(8)}};
    const std::vector<fastllm::SafetensorsTensor> second{
        {"lm_head.weight", fastllm::SafetensorsDtype::BF16, {4, 2}, bytes(bf16)}};
    fastllm::write_safetensors(d / "model-00001-of-00002.safetensors", first);
    fastllm::write_safetensors(d / "model-00002-of-00002.safetensors", second);
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto& dir = folder();
  fastllm::fuzz::write_file(dir / "model.safetensors.index.json", data, size);
  try {
    const auto checkpoint = fastllm::SafetensorsCheckpoint::open(dir);
    for (const std::string& name : checkpoint.names())
      (void)checkpoint.read_f32(name);
  } catch (const fastllm::UserError&) {
  }
  return 0;
}
