// Checkpoints are layout-independent: a run saved under one layout (ZeRO-1 on) resumes under others
// and continues with the losses of an uninterrupted single-rank run, and each rank reads only its
// share of the file.
#include <gtest/gtest.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <regex>
#include <tuple>

#include "parallel_support.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;

struct Case {
  std::string fixture;
};

class CheckpointLayouts : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset(GetParam().fixture, data()); }
  std::string data() const { return (dir_ / "data").string(); }
  std::string train(int iterations, const std::string& save) const {
    return "train " + fixture_train_flags(GetParam().fixture, data(), seq_, 1) +
           " --train_iters=" + std::to_string(iterations) + " --save=" + save;
  }
  // Runs `layout` from the checkpoint in `from` (copied, so that each resume starts alike) for the
  // remaining iterations; returns its output.
  CommandResult resume(const std::string& from, const std::string& name, const Shape& layout,
                       int zero_stage) {
    const std::string run = (dir_ / name).string();
    fs::copy(from, run, fs::copy_options::recursive);
    return run_mpi(layout.ranks(), train(12, run) + " --load=" + run + layout.flags() +
                                       " --zero_stage=" + std::to_string(zero_stage));
  }
  void expect_straight_losses(const std::string& name) {
    const auto expected = metrics((dir_ / "straight").string(), "loss");
    const auto got = metrics((dir_ / name).string(), "loss");
    ASSERT_EQ(expected.size(), 12u);
    ASSERT_EQ(got.size(), 12u) << name;
    for (std::size_t s = 0; s < got.size(); ++s) {
      EXPECT_EQ(got[s]["iteration"], expected[s]["iteration"]);
      for (const char* key : {"loss", "grad_norm"}) {
        const double a = got[s][key], b = expected[s][key];
        EXPECT_LE(std::fabs(a - b) / b, 1e-5) << name << ": " << key << " of step " << s + 1;
      }
    }
  }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

// The bytes of the parameters one rank of a DP x TP x PP layout holds, and of its ZeRO-1 shard of
// the two AdamW moments, counted from the fixture's config.json (2 layers, TP and PP of 1 or 2).
std::uint64_t expected_share(const std::string& fixture, int dp, int tp, int pp, int dp_rank,
                             int pp_rank, bool moments = true) {
  std::ifstream in(kFixtureDir + "/" + fixture + "/config.json");
  const nlohmann::json c = nlohmann::json::parse(in);
  const std::int64_t h = c["hidden_size"], v = c["vocab_size"], f = c["intermediate_size"];
  const std::int64_t heads = c["num_attention_heads"], kv = c["num_key_value_heads"];
  const std::int64_t d = c["head_dim"], layers = c["num_hidden_layers"];
  const std::int64_t experts = c.value("num_local_experts", 1);
  const std::int64_t mlp = (experts > 1 ? experts * h : 0) + experts * 3 * (f / tp) * h;
  const std::int64_t layer = 2 * h + (heads * d / tp) * h * 2 + 2 * (kv * d / tp) * h + mlp;
  std::int64_t n = layer * layers / pp;
  if (pp_rank == 0) n += v / tp * h;
  if (pp_rank == pp - 1) n += h + v / tp * h;
  const std::int64_t shard = (n + dp - 1) / dp;
  const std::int64_t begin = std::min(n, dp_rank * shard), end = std::min(n, begin + shard);
  return static_cast<std::uint64_t>(4 * (n + (moments ? 2 * (end - begin) : 0)));
}

TEST_P(CheckpointLayouts, SavedUnder2x2x2ResumesUnderOtherLayouts) {
  const std::string fixture = GetParam().fixture;
  ASSERT_EQ(run_fastllm(train(12, (dir_ / "straight").string())).exit_code, 0);
  const std::string saved = (dir_ / "saved").string();
  const CommandResult first =
      run_mpi(8, train(6, saved) + Shape{2, 2, 2}.flags() + " --zero_stage=1");
  ASSERT_EQ(first.exit_code, 0) << first.err << first.out;
  ASSERT_TRUE(fs::exists(saved + "/checkpoint-00000006.h5"));

  for (const auto& [name, layout] : {std::pair{"one", Shape{1, 1, 1}}, {"tp2", Shape{1, 2, 1}}}) {
    const CommandResult r = resume(saved, name, layout, 0);
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    EXPECT_NE(r.out.find("checkpoint-00000006.h5 at iteration 6"), std::string::npos) << r.out;
    expect_straight_losses(name);
  }
}

// Checks the "rank r read N bytes (share M)" lines of a 2x2x2 run: every rank's share as counted
// from the config, and what it read within 10% of it.
void expect_shares(const std::string& out, const std::string& fixture, bool moments) {
  static const std::regex line(R"(rank (\d+) read (\d+) bytes \(share (\d+)\))");
  int ranks = 0;
  for (std::sregex_iterator it(out.begin(), out.end(), line), end; it != end; ++it, ++ranks) {
    const int rank = std::stoi((*it)[1]);
    const double read = std::stod((*it)[2]), share = std::stod((*it)[3]);
    // World rank -> (tp, dp, pp) with tensor fastest.
    const int dp_rank = (rank / 2) % 2, pp_rank = rank / 4;
    EXPECT_EQ(share,
              static_cast<double>(expected_share(fixture, 2, 2, 2, dp_rank, pp_rank, moments)))
        << "rank " << rank;
    EXPECT_LE(std::fabs(read - share), 0.1 * share) << "rank " << rank;
  }
  EXPECT_EQ(ranks, 8) << out;
}

TEST_P(CheckpointLayouts, ConvertedCheckpointStartsA2x2x2Run) {
  const std::string fixture = GetParam().fixture;
  ASSERT_EQ(run_fastllm(train(12, (dir_ / "straight").string())).exit_code, 0);
  const std::string converted = (dir_ / "converted").string();
  const CommandResult c =
      run_fastllm("convert --pretrained_checkpoint_type=huggingface --pretrained_checkpoint_path=" +
                  kFixtureDir + "/" + fixture + " --save=" + converted);
  ASSERT_EQ(c.exit_code, 0) << c.err;
  const CommandResult r = resume(converted, "wide", Shape{2, 2, 2}, 1);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("checkpoint-00000000.h5 at iteration 0"), std::string::npos) << r.out;
  expect_straight_losses("wide");
  expect_shares(r.out, fixture, false);
}

TEST_P(CheckpointLayouts, SavedOnOneRankResumesUnder2x2x2ReadingItsShare) {
  const std::string fixture = GetParam().fixture;
  ASSERT_EQ(run_fastllm(train(12, (dir_ / "straight").string())).exit_code, 0);
  const std::string saved = (dir_ / "saved").string();
  ASSERT_EQ(run_fastllm(train(6, saved)).exit_code, 0);
  const CommandResult r = resume(saved, "wide", Shape{2, 2, 2}, 1);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  expect_straight_losses("wide");

  expect_shares(r.out, fixture, true);
}

TEST_P(CheckpointLayouts, TruncatedNewestFallsBackToThePreviousOnEveryRank) {
  const std::string run = (dir_ / "run").string();
  ASSERT_EQ(run_fastllm(train(4, run) + " --save_interval=2").exit_code, 0);
  const fs::path newest = fs::path(run) / "checkpoint-00000004.h5";
  fs::resize_file(newest, fs::file_size(newest) * 2 / 3);
  const CommandResult r =
      run_mpi(4, train(6, run) + " --load=" + run + Shape{1, 2, 2}.flags() + " --zero_stage=1");
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.err.find("skipping " + newest.string()), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("checkpoint-00000002.h5 at iteration 2"), std::string::npos) << r.out;
}

// ZeRO-2 keeps the optimizer state of ZeRO-1 (only the gradients are bucketed), so its checkpoints
// resume under ZeRO-1, without ZeRO and under another layout, with the straight run's losses.
TEST_P(CheckpointLayouts, SavedUnderZero2ResumesUnderZero1AndOtherLayouts) {
  ASSERT_EQ(run_fastllm(train(12, (dir_ / "straight").string())).exit_code, 0);
  const std::string saved = (dir_ / "saved").string();
  const CommandResult first =
      run_mpi(4, train(6, saved) + Shape{2, 1, 2}.flags() + " --zero_stage=2");
  ASSERT_EQ(first.exit_code, 0) << first.err << first.out;
  for (const auto& [name, layout, zero] :
       {std::tuple{"one", Shape{1, 1, 1}, 0}, {"zero1", Shape{2, 2, 1}, 1}}) {
    const CommandResult r = resume(saved, name, layout, zero);
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    expect_straight_losses(name);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CheckpointLayouts,
                         ::testing::Values(Case{"dev-mistral"}, Case{"dev-mixtral"}),
                         [](const auto& info) {
                           return info.param.fixture == "dev-mistral" ? "Mistral" : "Mixtral";
                         });

// A checkpoint that does not fit (here: past the file size limit, which needs no privileges to set
// up, where a full disk would need a small file system) stops every rank of a tensor-parallel job
// at once with one error naming the folder and the bytes needed, removes its temporary file and
// leaves the previous checkpoint to resume from.
class FullDisk : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset("dev-mistral", data()); }
  std::string data() const { return (dir_ / "data").string(); }
  // A model that tensor parallelism of 2 and 3 both split, from scratch.
  std::string train(int iterations, const std::string& save) const {
    return "train --num_layers=2 --hidden_size=384 --num_attention_heads=12 --head_groups=6 "
           "--ffn_hidden_size=1152 --vocab_size=1002 --data_path=" +
           data() +
           " --data_sampling=document --split=1,0,0 --sequence_length=" + std::to_string(seq_) +
           " --batch_size=2 --micro_batch_size=1 --log_interval=1 --train_iters=" +
           std::to_string(iterations) + " --save=" + save + " --load=" + save;
  }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

TEST_P(FullDisk, EveryRankStopsWithOneErrorAndThePreviousCheckpointStays) {
  const int ranks = GetParam();
  const std::string run = (dir_ / "run").string();
  const std::string tp = " --tensor_parallel=" + std::to_string(ranks);
  const CommandResult first = run_mpi(ranks, train(1, run) + tp);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const std::uintmax_t size = fs::file_size(run + "/checkpoint-00000001.h5");
  // Files may grow to half a checkpoint (ulimit -f counts KiB in bash).
  const auto started = std::chrono::steady_clock::now();
  const CommandResult full = run_shell(
      "bash -c 'ulimit -f " + std::to_string(size / 2048) +
      "; OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 exec " +
      FASTLLM_MPIEXEC + " --oversubscribe --allow-run-as-root -np " + std::to_string(ranks) + " " +
      FASTLLM_BINARY + " " + train(3, run) + tp + "'");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_NE(full.exit_code, 0) << full.out;
  EXPECT_EQ(full.out.find("saved"), std::string::npos) << full.out;
  const std::regex error("fastllm train: error: [^\\n]*");
  const auto errors = std::distance(std::sregex_iterator(full.err.begin(), full.err.end(), error),
                                    std::sregex_iterator());
  EXPECT_EQ(errors, 1) << full.err;
  EXPECT_NE(full.err.find("'" + run + "'"), std::string::npos) << full.err;
  EXPECT_NE(full.err.find("it needs "), std::string::npos) << full.err;
  EXPECT_LT(seconds, 60) << full.err;
  for (const auto& entry : fs::directory_iterator(run))
    EXPECT_FALSE(entry.path().string().ends_with(".tmp")) << entry.path();
  // The previous checkpoint is whole: a run without the limit resumes from it.
  const CommandResult resumed = run_mpi(ranks, train(2, run) + tp);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.out.find("checkpoint-00000001.h5 at iteration 1"), std::string::npos)
      << resumed.out;
}

INSTANTIATE_TEST_SUITE_P(TensorParallel, FullDisk, ::testing::Values(2, 3),
                         [](const auto& info) { return "np" + std::to_string(info.param); });

}  // namespace
}  // namespace fastllm::test
