// Each layout the model or the batch cannot be split into fails on every rank, before any work,
// with one clear message naming the flags and values, printed once (exit code 2 on every rank,
// nothing written).
#include <gtest/gtest.h>

#include "parallel_support.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

struct BadLayout {
  std::string name;
  int ranks;
  std::string command;  // "probe" or "train"
  std::string flags;
  std::string message;
  bool tiny_vocabulary_input = false;  // token ids below 5
};

void PrintTo(const BadLayout& c, std::ostream* os) {
  *os << c.name;
}

class LayoutErrors : public ::testing::TestWithParam<BadLayout> {};

std::size_t occurrences(const std::string& text, const std::string& piece) {
  std::size_t n = 0;
  for (std::size_t at = text.find(piece); at != std::string::npos; at = text.find(piece, at + 1))
    ++n;
  return n;
}

TEST_P(LayoutErrors, EveryRankFailsWithTheMessage) {
  const BadLayout& c = GetParam();
  TempDir dir;
  const std::string model =
      "--pretrained_checkpoint_type=huggingface --pretrained_checkpoint_path=" + kFixtureDir +
      "/dev-mistral ";
  const std::string out = (dir / "out").string();
  std::string args;
  if (c.command == "probe") {
    std::string input = kFixtureDir + "/dev-mistral/reference.safetensors";
    if (c.tiny_vocabulary_input) {
      input = (dir / "in.safetensors").string();
      const std::vector<std::int64_t> ids(16, 1);
      const SafetensorsTensor t{
          "input_ids", SafetensorsDtype::I64, {2, 8}, std::as_bytes(std::span(ids))};
      write_safetensors(input, std::span<const SafetensorsTensor>(&t, 1));
    }
    args = "probe " + model + "--input=" + input + " --output=" + out + " " + c.flags;
  } else {
    const std::string data = (dir / "data").string();
    const std::int64_t seq = write_trajectory_dataset("dev-mistral", data);
    args = "train " + fixture_train_flags("dev-mistral", data, seq, 1) +
           " --train_iters=2 --save=" + out + " " + c.flags;
  }
  // Each rank reports its own exit code (mpiexec would stop the others at the first failure).
  const CommandResult r =
      run_shell("OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " +
                std::string(FASTLLM_MPIEXEC) + " --oversubscribe --allow-run-as-root -np " +
                std::to_string(c.ranks) + " /bin/sh -c '" + FASTLLM_BINARY + " " + args +
                "; echo exit code $? >&2'");
  EXPECT_EQ(occurrences(r.err, "exit code 2"), static_cast<std::size_t>(c.ranks)) << r.err;
  EXPECT_EQ(occurrences(r.err, c.message), 1u) << r.err;
  EXPECT_EQ(r.out.find("iteration "), std::string::npos) << "training started: " << r.out;
  EXPECT_FALSE(std::filesystem::exists(out + "/checkpoint-00000002.h5"));
  if (c.command == "probe") {
    EXPECT_FALSE(std::filesystem::exists(out));
  }
}

// dev-mistral: 2 layers, 4 heads, 2 key/value heads, FFN 160, vocabulary 1000, batch 2.
INSTANTIATE_TEST_SUITE_P(
    Cases, LayoutErrors,
    ::testing::Values(
        BadLayout{"WorldNotAMultipleOfTensorTimesPipeline", 3, "probe", "--tensor_parallel=2",
                  "--tensor_parallel=2 x --pipeline_parallel=1 = 2 does not divide the 3 MPI "
                  "ranks"},
        BadLayout{
            "WorldNotAMultipleInTraining", 6, "train", "--tensor_parallel=2 --pipeline_parallel=2",
            "--tensor_parallel=2 x --pipeline_parallel=2 = 4 does not divide the 6 MPI ranks"},
        BadLayout{"HeadsNotDivisible", 3, "probe", "--tensor_parallel=3",
                  "--tensor_parallel=3 does not divide --num_attention_heads=4"},
        BadLayout{"HeadGroupsNeitherMultipleNorDivisor", 3, "probe",
                  "--load_pretrained_weights=0 --num_attention_heads=12 --head_groups=4 "
                  "--kv_channels=16 --hidden_size=192 --ffn_hidden_size=96 --tensor_parallel=3",
                  "--tensor_parallel=3 and --head_groups=4: head groups must be a multiple of the "
                  "tensor-parallel size or divide it"},
        BadLayout{"FewerLayersThanStages", 3, "train", "--pipeline_parallel=3",
                  "--pipeline_parallel=3 exceeds --num_layers=2: every stage needs at least one "
                  "layer"},
        BadLayout{"BatchNotDivisibleByDataTimesMicroBatch", 4, "train",
                  "--tensor_parallel=2 --micro_batch_size=2",
                  "--batch_size=2 is not a multiple of data-parallel ranks x --micro_batch_size = "
                  "2 x 2"},
        BadLayout{"ProbeBatchNotDivisibleByDataParallel", 4, "probe", "",
                  "input_ids has a batch of 2 sequences, not a multiple of the 4 data-parallel "
                  "ranks"},
        BadLayout{"VocabularyTooSmallForTensorParallel", 4, "probe",
                  "--load_pretrained_weights=0 --num_attention_heads=8 --hidden_size=128 "
                  "--kv_channels=16 --head_groups=4 --vocab_size=5 --tensor_parallel=4",
                  "--tensor_parallel=4 splits --vocab_size=5 into slices of 2 rows, leaving the "
                  "last rank none",
                  true},
        BadLayout{"SequenceNotDivisibleForSequenceParallel", 3, "probe",
                  "--load_pretrained_weights=0 --num_attention_heads=6 --head_groups=3 "
                  "--ffn_hidden_size=192 --tensor_parallel=3 --sequence_parallel=1",
                  "the sequence length of input_ids=8 is not a multiple of --tensor_parallel=3, "
                  "which --sequence_parallel=1 splits each sequence over",
                  true}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
