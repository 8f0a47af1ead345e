// `--cross_document_attention=0` from the command line: the trainer takes the document starts from
// the dataset (a row of one document computes what it computed before; packed rows that cross a
// document start do not), and probe's position_ids and labels are checked like every input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "io/safetensors.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

class DocumentMaskTrain : public ::testing::Test {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset("dev-mistral", data()); }
  std::string data() const { return (dir_ / "data").string(); }
  // The losses of 3 steps with `sampling` at `seq` tokens a sample.
  std::vector<double> losses(const std::string& name, const std::string& sampling, std::int64_t seq,
                             int cross_document) {
    std::string flags = fixture_train_flags("dev-mistral", data(), seq, 1);
    const std::string document = "--data_sampling=document";
    flags.replace(flags.find(document), document.size(), "--data_sampling=" + sampling);
    const std::string save = (dir_ / name).string();
    const CommandResult r =
        run_fastllm("train " + flags + " --train_iters=3 --save=" + save +
                    " --cross_document_attention=" + std::to_string(cross_document));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::vector<double> out;
    for (const auto& m : metrics(save, "loss"))
      out.push_back(m["loss"].get<double>());
    EXPECT_EQ(out.size(), 3u) << name;
    return out;
  }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

TEST_F(DocumentMaskTrain, OneDocumentPerRowComputesTheSameBits) {
  EXPECT_EQ(losses("across", "document", seq_, 1), losses("within", "document", seq_, 0));
}

TEST_F(DocumentMaskTrain, PackedRowsStopAtDocumentStarts) {
  // Samples shorter than the documents start inside one and run into the next.
  const std::vector<double> across = losses("across", "packed", seq_ - 5, 1);
  const std::vector<double> within = losses("within", "packed", seq_ - 5, 0);
  ASSERT_EQ(across.size(), within.size());
  for (std::size_t i = 0; i < across.size(); ++i) {
    EXPECT_TRUE(std::isfinite(within[i]));
    EXPECT_GT(std::fabs(across[i] - within[i]), 1e-6) << "step " << i + 1;
  }
}

// A probe input with input_ids [1, 6] and the given extra tensor.
std::string probe_input(const TempDir& dir, const char* name, const std::vector<std::int64_t>& v) {
  const std::vector<std::int64_t> ids = {5, 6, 7, 8, 9, 10};
  const std::string path = (dir / "in.safetensors").string();
  const std::vector<SafetensorsTensor> tensors = {
      {"input_ids", SafetensorsDtype::I64, {1, 6}, std::as_bytes(std::span(ids))},
      {name, SafetensorsDtype::I64, {1, 6}, std::as_bytes(std::span(v))}};
  write_safetensors(path, tensors);
  return path;
}

struct BadProbeInput {
  std::string name;
  const char* tensor;
  std::vector<std::int64_t> values;
  int cross_document;
  std::string message;
};

void PrintTo(const BadProbeInput& c, std::ostream* os) {
  *os << c.name;
}

class BadProbeInputs : public ::testing::TestWithParam<BadProbeInput> {};

TEST_P(BadProbeInputs, ClearErrorExitTwoNoOutput) {
  const BadProbeInput& c = GetParam();
  TempDir dir;
  const std::string out = (dir / "out.safetensors").string();
  const CommandResult r = run_fastllm(
      "probe --pretrained_checkpoint_type=huggingface --pretrained_checkpoint_path=" + kFixtures +
      "/dev-mistral --input=" + probe_input(dir, c.tensor, c.values) + " --output=" + out +
      " --cross_document_attention=" + std::to_string(c.cross_document));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find(c.message), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(out));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadProbeInputs,
    ::testing::Values(
        BadProbeInput{"DocumentsWithoutTheFlag",
                      "position_ids",
                      {0, 1, 2, 0, 1, 2},
                      1,
                      "position_ids[0, 3] = 0, expected 3: with --cross_document_attention=1"},
        BadProbeInput{"PositionsThatSkip",
                      "position_ids",
                      {0, 1, 3, 4, 5, 6},
                      0,
                      "position_ids[0, 2] = 3, expected 0 (a document starts) or 2"},
        BadProbeInput{"LabelOutsideTheVocabulary",
                      "labels",
                      {5, 6, 7, 1000, 9, 10},
                      1,
                      "labels[0, 3] = 1000 is outside the vocabulary [0, 1000) and not -100"},
        BadProbeInput{"NothingToPredict",
                      "labels",
                      {5, -100, -100, -100, -100, -100},
                      1,
                      "labels leave no token to predict"}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
