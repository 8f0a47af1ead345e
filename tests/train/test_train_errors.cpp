// Each bad input to `fastllm train` is one clear error before training starts, exit code 2.
#include <gtest/gtest.h>

#include "io/indexed_dataset.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;

class TrainErrors : public ::testing::Test {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset("dev-mistral", data()); }
  std::string data() const { return (dir_ / "data").string(); }
  std::string flags(const std::string& data_prefix) const {
    return fixture_train_flags("dev-mistral", data_prefix, seq_, 1) + " --train_iters=2";
  }
  void expect_error(const std::string& args, const std::string& message) {
    const std::string save = (dir_ / "run").string();
    CommandResult r = run_fastllm("train " + args + " --save=" + save);
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("iteration "), std::string::npos) << "training started: " << r.out;
  }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

TEST_F(TrainErrors, MissingIndex) {
  fs::remove(data() + ".idx");
  expect_error(flags(data()), data() + ".idx");
}

TEST_F(TrainErrors, MissingBin) {
  fs::remove(data() + ".bin");
  expect_error(flags(data()), data() + ".bin");
}

TEST_F(TrainErrors, TruncatedIndex) {
  fs::resize_file(data() + ".idx", fs::file_size(data() + ".idx") - 9);
  expect_error(flags(data()), data() + ".idx");
}

TEST_F(TrainErrors, IndexDisagreesWithBin) {
  fs::resize_file(data() + ".bin", fs::file_size(data() + ".bin") - 2);
  expect_error(flags(data()), data() + ".bin");
}

TEST_F(TrainErrors, TokenBeyondVocabulary) {
  const std::string prefix = (dir_ / "big").string();
  IndexedDatasetWriter writer(prefix, TokenDtype::kUint16);
  std::vector<std::int32_t> doc(48, 7);
  doc[5] = 1000;  // dev-mistral's vocabulary is [0, 1000)
  writer.add_document(doc);
  writer.finalize();
  expect_error(flags(prefix), "1000");
}

TEST_F(TrainErrors, BatchNotDivisible) {
  expect_error(flags(data()) + " --batch_size=3 --micro_batch_size=2",
               "--batch_size=3 is not a multiple of data-parallel ranks x --micro_batch_size");
}

TEST_F(TrainErrors, LoadOfAnotherArchitecture) {
  const std::string other = (dir_ / "other").string();
  CommandResult saved =
      run_fastllm("train " + fixture_train_flags("dev-tied-nowindow", data(), seq_, 1) +
                  " --train_iters=1 --save=" + other);
  ASSERT_EQ(saved.exit_code, 0) << saved.err;
  expect_error(flags(data()) + " --load=" + other,
               "holds another architecture (tie_word_embeddings");
}

TEST_F(TrainErrors, MissingRequiredFlag) {
  expect_error("--pretrained_checkpoint_path=" + kFixtures + "/dev-mistral --data_path=" + data() +
                   " --batch_size=2 --sequence_length=8",
               "--train_iters is required");
}

TEST_F(TrainErrors, SequenceLongerThanTheModel) {
  expect_error(flags(data()) + " --sequence_length=513",
               "exceeds the model's --max_sequence_length=512");
}

}  // namespace
}  // namespace fastllm::test
