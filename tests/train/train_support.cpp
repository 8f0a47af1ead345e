#include "train/train_support.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <limits>

#include "io/indexed_dataset.h"
#include "io/safetensors.h"

namespace fastllm::test {

std::int64_t write_trajectory_dataset(const std::string& fixture, const std::string& prefix) {
  const SafetensorsFile file =
      SafetensorsFile::open(kFixtures + "/" + fixture + "/trajectory.safetensors");
  const std::vector<std::int64_t> tokens = file.read_i64("batches");
  const std::int64_t seq = file.info("batches").shape.back();
  IndexedDatasetWriter writer(prefix, TokenDtype::kUint16);
  for (std::size_t first = 0; first < tokens.size(); first += static_cast<std::size_t>(seq)) {
    const std::vector<std::int32_t> doc(tokens.begin() + first, tokens.begin() + first + seq);
    writer.add_document(doc);
  }
  writer.finalize();
  return seq;
}

std::string fixture_train_flags(const std::string& fixture, const std::string& data,
                                std::int64_t seq, std::int64_t micro_batch_size) {
  return "--pretrained_checkpoint_type=huggingface --pretrained_checkpoint_path=" + kFixtures +
         "/" + fixture + " --data_path=" + data +
         " --data_sampling=document --data_shuffle=0 --split=1,0,0 --sequence_length=" +
         std::to_string(seq) +
         " --batch_size=2 --micro_batch_size=" + std::to_string(micro_batch_size) +
         " --lr=0.003 --lr_decay_style=constant --adam_beta1=0.9 --adam_beta2=0.95 "
         "--adam_eps=1e-8 --weight_decay=0 --clip_grad=0 --log_interval=1";
}

std::vector<nlohmann::json> metrics(const std::string& dir, const std::string& key) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains(key)) out.push_back(j);
  }
  return out;
}

std::map<std::string, std::vector<float>> read_all(const std::string& path) {
  const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(path);
  std::map<std::string, std::vector<float>> out;
  for (const std::string& name : checkpoint.names())
    out[name] = checkpoint.read_f32(name);
  return out;
}

void write_model_with_nan(const std::string& folder, std::int64_t element) {
  namespace fs = std::filesystem;
  fs::create_directories(folder);
  fs::copy_file(kFixtures + "/dev-mistral/config.json", fs::path(folder) / "config.json");
  const SafetensorsCheckpoint fixture = SafetensorsCheckpoint::open(kFixtures + "/dev-mistral");
  std::vector<std::vector<float>> values;
  std::vector<SafetensorsTensor> tensors;
  for (const std::string& name : fixture.names()) {
    values.push_back(fixture.read_f32(name));
    if (name == "lm_head.weight") values.back()[element] = std::numeric_limits<float>::quiet_NaN();
    tensors.push_back({name, SafetensorsDtype::F32, fixture.info(name).shape, {}});
  }
  for (std::size_t i = 0; i < tensors.size(); ++i)
    tensors[i].data = std::as_bytes(std::span<const float>(values[i]));
  write_safetensors((fs::path(folder) / "model.safetensors").string(), tensors);
}

}  // namespace fastllm::test
