// Hugging Face -> HDF5 checkpoint -> Hugging Face gives back every tensor bit for bit.
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "io/safetensors.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

void round_trip(const std::string& fixture, const std::string& dtype, const std::string& shard) {
  TempDir dir;
  const std::string ckpt = (dir / "ckpt").string(), out = (dir / "hf").string();
  CommandResult c = run_fastllm("convert --pretrained_checkpoint_path=" + kFixtures + "/" +
                                fixture + " --save=" + ckpt);
  ASSERT_EQ(c.exit_code, 0) << c.err;
  CommandResult e = run_fastllm("export --load=" + ckpt + " --output=" + out + " --dtype=" + dtype +
                                " --max_shard_size=" + shard);
  ASSERT_EQ(e.exit_code, 0) << e.err;
  const SafetensorsCheckpoint original = SafetensorsCheckpoint::open(kFixtures + "/" + fixture);
  const SafetensorsCheckpoint exported = SafetensorsCheckpoint::open(out);
  ASSERT_EQ(exported.names(), original.names());
  for (const std::string& name : original.names()) {
    EXPECT_EQ(exported.info(name).dtype, original.info(name).dtype) << name;
    EXPECT_EQ(exported.info(name).shape, original.info(name).shape) << name;
    const auto a = exported.raw(name), b = original.raw(name);
    ASSERT_EQ(a.size(), b.size()) << name;
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size()), 0) << name;
  }
  // The exported config describes the same model.
  auto config = nlohmann::json::parse(read_text(out + "/config.json"));
  auto source = nlohmann::json::parse(read_text(kFixtures + "/" + fixture + "/config.json"));
  for (const char* key : {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                          "sliding_window", "tie_word_embeddings"})
    EXPECT_EQ(config[key], source[key]) << key;
}

TEST(ConvertExport, Float32Sharded) {
  round_trip("dev-mistral", "fp32", "200KB");
}
TEST(ConvertExport, Bfloat16) {
  round_trip("dev-mistral-bf16", "bf16", "5GB");
}
TEST(ConvertExport, MixtralFloat32) {
  round_trip("dev-mixtral", "fp32", "5GB");
}
TEST(ConvertExport, Tied) {
  round_trip("dev-tied-nowindow", "fp32", "5GB");
}

TEST(ConvertExport, ShardsWithIndex) {
  TempDir dir;
  ASSERT_EQ(run_fastllm("convert --pretrained_checkpoint_path=" + kFixtures +
                        "/dev-mistral --save=" + (dir / "c").string())
                .exit_code,
            0);
  ASSERT_EQ(run_fastllm("export --load=" + (dir / "c").string() + " --output=" +
                        (dir / "hf").string() + " --dtype=fp32 --max_shard_size=100KB")
                .exit_code,
            0);
  auto index = nlohmann::json::parse(read_text((dir / "hf/model.safetensors.index.json").string()));
  std::set<std::string> files;
  for (auto& [name, file] : index["weight_map"].items())
    files.insert(file.get<std::string>());
  EXPECT_GT(files.size(), 2u);
  EXPECT_EQ(index["metadata"]["total_size"], 214336 * 4);  // dev-mistral's parameters in fp32
}

}  // namespace
}  // namespace fastllm::test
