// A Hugging Face checkpoint that does not fit the architecture, or is damaged, stops `convert` and
// `probe` with one clear message and exit code 2, and nothing is written.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "io/safetensors.h"
#include "support/process.h"

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;
const std::string kFixtures = FASTLLM_FIXTURES;

// dev-tied-nowindow (one file) copied into a folder, with `edit` applied to its tensors.
class DamagedCheckpoint {
 public:
  template <class Edit>
  explicit DamagedCheckpoint(Edit edit) {
    const std::string source = kFixtures + "/dev-tied-nowindow";
    fs::copy_file(source + "/config.json", dir_ / "config.json");
    const SafetensorsFile file = SafetensorsFile::open(source + "/model.safetensors");
    std::vector<SafetensorsTensor> tensors;
    for (const TensorInfo& t : file.tensors())
      tensors.push_back({t.name, t.dtype, t.shape, file.raw(t.name)});
    edit(tensors);
    write_safetensors(dir_ / "model.safetensors", tensors);
  }
  std::string path() const { return dir_.path().string(); }

 private:
  TempDir dir_;
};

void expect_rejected(const std::string& checkpoint, const std::string& message) {
  TempDir out;
  CommandResult c = run_fastllm("convert --pretrained_checkpoint_path=" + checkpoint +
                                " --save=" + (out / "ckpt").string());
  EXPECT_EQ(c.exit_code, 2) << c.err;
  EXPECT_NE(c.err.find(message), std::string::npos) << c.err;
  EXPECT_TRUE(!fs::exists(out / "ckpt") || fs::is_empty(out / "ckpt"));
  CommandResult p = run_fastllm(
      "probe --pretrained_checkpoint_path=" + checkpoint + " --input=" + kFixtures +
      "/dev-tied-nowindow/reference.safetensors --output=" + (out / "probe.safetensors").string());
  EXPECT_EQ(p.exit_code, 2) << p.err;
  EXPECT_NE(p.err.find(message), std::string::npos) << p.err;
  EXPECT_FALSE(fs::exists(out / "probe.safetensors"));
}

TEST(CheckpointErrors, MissingTensor) {
  DamagedCheckpoint ckpt([](auto& tensors) {
    std::erase_if(tensors,
                  [](const auto& t) { return t.name == "model.layers.1.mlp.up_proj.weight"; });
  });
  expect_rejected(ckpt.path(),
                  "tensor model.layers.1.mlp.up_proj.weight [160, 64] that the architecture needs "
                  "is not in the checkpoint");
}

TEST(CheckpointErrors, WrongShape) {
  DamagedCheckpoint ckpt([](auto& tensors) {
    for (auto& t : tensors) {
      if (t.name == "model.layers.0.self_attn.k_proj.weight") t.shape = {16, 128};
    }
  });
  expect_rejected(ckpt.path(),
                  "tensor model.layers.0.self_attn.k_proj.weight has shape [16, 128], the "
                  "architecture expects [32, 64]");
}

TEST(CheckpointErrors, TruncatedFile) {
  DamagedCheckpoint ckpt([](auto&) {});
  const fs::path file = fs::path(ckpt.path()) / "model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 100);
  expect_rejected(ckpt.path(), "model.safetensors");
}

TEST(CheckpointErrors, IndexNamesMissingShard) {
  TempDir dir;
  const std::string source = kFixtures + "/dev-mistral";
  for (const auto& entry : fs::directory_iterator(source)) {
    if (entry.path().filename() != "model-00003-of-00004.safetensors")
      fs::copy_file(entry.path(), dir / entry.path().filename().string());
  }
  expect_rejected(dir.path().string(), "model-00003-of-00004.safetensors");
}

}  // namespace
}  // namespace fastllm::test
