// Logs a user can trust: where the weights came from, warnings when a resume changes the run,
// restarts marked in metrics.jsonl without repeated iterations, wall-clock time and peak memory,
// the MoE load-balancing loss and expert load, and greedy samples every --sample_interval
// iterations.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <regex>

#include "train/train_support.h"

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;

const std::string kTokenizer = FASTLLM_TEST_TOKENIZER;  // spm_train, 400 pieces: <s> 1, </s> 2

std::string mpiexec(int ranks) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 " +
         std::string(FASTLLM_MPIEXEC) + " --oversubscribe -np " + std::to_string(ranks) + " ";
}

class TrainLogs : public ::testing::Test {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset("dev-mistral", data()); }
  std::string data() const { return (dir_ / "data").string(); }
  std::string flags() const { return fixture_train_flags("dev-mistral", data(), seq_, 1); }
  std::string run(const std::string& name) const { return (dir_ / name).string(); }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

TEST_F(TrainLogs, SaysWhereTheWeightsCameFrom) {
  const CommandResult r = run_fastllm("train " + flags() + " --train_iters=1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The fixture folder's own tensor count, read independently of the trainer.
  const std::size_t tensors = read_all(kFixtures + "/dev-mistral").size();
  EXPECT_NE(r.out.find("loaded the pretrained weights of " + kFixtures + "/dev-mistral (" +
                       std::to_string(tensors) + " tensors)"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(r.err.find("starting fresh"), std::string::npos) << r.err;
}

TEST_F(TrainLogs, SaveHoldingCheckpointsWithoutLoadIsRefused) {
  const std::string dir = run("run");
  ASSERT_EQ(run_fastllm("train " + flags() + " --train_iters=2 --save=" + dir).exit_code, 0);
  const CommandResult r = run_fastllm("train " + flags() + " --train_iters=4 --save=" + dir);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("no --load was given"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("pass --load=" + dir), std::string::npos) << r.err;
}

TEST_F(TrainLogs, ResumeMarksTheRestartAndDropsRepeatedIterations) {
  const std::string dir = run("run");
  const CommandResult first =
      run_fastllm("train " + flags() + " --train_iters=4 --save_interval=2 --save=" + dir);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  // As if the run had been killed after logging iterations 3 and 4 but before their checkpoint.
  fs::remove(fs::path(dir) / "checkpoint-00000004.h5");
  const CommandResult resumed =
      run_fastllm("train " + flags() + " --train_iters=6 --save=" + dir + " --load=" + dir);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_EQ(resumed.err.find("warning"), std::string::npos) << "nothing changed: " << resumed.err;

  const auto losses = metrics(dir, "loss");
  ASSERT_EQ(losses.size(), 6u);
  for (std::size_t i = 0; i < losses.size(); ++i)
    EXPECT_EQ(losses[i]["iteration"], i + 1);
  const auto events = metrics(dir, "event");
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0]["event"], "start");
  EXPECT_EQ(events[0]["iteration"], 0);
  EXPECT_EQ(events[0]["from"], kFixtures + "/dev-mistral");
  EXPECT_EQ(events[1]["event"], "resume");
  EXPECT_EQ(events[1]["iteration"], 2);
  EXPECT_EQ(events[1]["from"], (fs::path(dir) / "checkpoint-00000002.h5").string());
  EXPECT_FALSE(fs::exists(fs::path(dir) / "metrics.jsonl.tmp"));
}

TEST_F(TrainLogs, WarnsWhenAResumeChangesTheScheduleOrASetting) {
  const std::string dir = run("run");
  const std::string cosine = " --lr_decay_style=cosine --min_lr=0";
  ASSERT_EQ(run_fastllm("train " + flags() + cosine + " --train_iters=4 --save=" + dir).exit_code,
            0);
  const CommandResult r =
      run_fastllm("train " + flags() + cosine + " --train_iters=8 --adam_beta2=0.99 --save=" + dir +
                  " --load=" + dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("--adam_beta2=0.99 (the checkpoint's run: 0.95)"), std::string::npos)
      << r.err;
  // Cosine from 0.003 to 0 over 8 iterations is 0.0015 at iteration 4; over 4 it was 0.
  EXPECT_NE(r.err.find("--train_iters=8 (the checkpoint's run: 4) with --lr_decay_iters=0"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("at iteration 4 is 0.0015 instead of 0"), std::string::npos) << r.err;
}

TEST_F(TrainLogs, ProgressAndMetricsCarryTimeAndPeakMemory) {
  const std::string dir = run("run");
  const CommandResult r = run_fastllm("train " + flags() + " --train_iters=3 --save=" + dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("| elapsed 00:00:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| peak memory host "), std::string::npos) << r.out;
  const auto lines = metrics(dir, "loss");
  ASSERT_EQ(lines.size(), 3u);
  const std::regex iso(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)");
  double previous = 0;
  for (const auto& line : lines) {
    EXPECT_TRUE(std::regex_match(line["time"].get<std::string>(), iso)) << line;
    EXPECT_GT(line["elapsed_seconds"].get<double>(), previous);
    previous = line["elapsed_seconds"].get<double>();
    // Loading the fixture's weights and the MPI runtime alone take more than 1 MiB.
    EXPECT_GT(line["host_peak_bytes"].get<double>(), 1024.0 * 1024);
    EXPECT_TRUE(line["device_peak_bytes"].is_null());
    EXPECT_FALSE(line.contains("aux_loss"));
  }
}

TEST(TrainLogsMoe, ReportsTheLoadBalancingLoss) {
  TempDir dir;
  const std::string data = (dir / "data").string();
  const std::int64_t seq = write_trajectory_dataset("dev-mixtral", data);
  const CommandResult r = run_fastllm("train " + fixture_train_flags("dev-mixtral", data, seq, 1) +
                                      " --train_iters=2 --save=" + (dir / "run").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("| aux loss "), std::string::npos) << r.out;
  const auto lines = metrics((dir / "run").string(), "aux_loss");
  ASSERT_EQ(lines.size(), 2u);
  // The Switch loss num_experts * sum(f_i * P_i) is at least 1 (perfect balance) per layer.
  for (const auto& line : lines)
    EXPECT_GE(line["aux_loss"].get<double>(), 1.0 - 1e-6) << line;
  // Iteration 1 routes the trajectory's first batch with the fixture's weights: each expert's
  // share of the top-2 slots over both layers, as transformers' router logits give it
  // (tests/support/hf_reference.py).
  std::ifstream in(FASTLLM_HF_REFERENCE);
  const auto want = nlohmann::json::parse(in)["expert_load"]["dev-mixtral"]["load"];
  const auto load = lines[0]["expert_load"];
  ASSERT_EQ(load.size(), want.size()) << lines[0];
  for (std::size_t e = 0; e < load.size(); ++e)
    EXPECT_NEAR(load[e].get<double>(), want[e].get<double>(), 1e-12) << e;
  // The progress line shows the least and most loaded relative to an even share.
  double least = 1, most = 0;
  for (const auto& w : want) {
    least = std::min(least, w.get<double>() * 4);
    most = std::max(most, w.get<double>() * 4);
  }
  char text[64];
  std::snprintf(text, sizeof text, "| expert load min/max %.2f/%.2f", least, most);
  EXPECT_NE(r.out.find(text), std::string::npos) << r.out;
}

TEST_F(TrainLogs, SamplesEveryIntervalAsGenerateDoes) {
  const std::string dir = run("run");
  const std::string sample =
      " --sample_interval=2 --sample_tokens=6 --sample_prompt=the --tokenizer=" + kTokenizer;
  const CommandResult r =
      run_fastllm("train " + flags() + sample + " --train_iters=4 --save_interval=2 --save=" + dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto samples = metrics(dir, "sample");
  ASSERT_EQ(samples.size(), 2u);
  EXPECT_EQ(samples[0]["iteration"], 2);
  EXPECT_EQ(samples[1]["iteration"], 4);
  for (const auto& s : samples) {
    const std::string text = s["sample"].get<std::string>();
    EXPECT_EQ(text.rfind("the", 0), 0u) << text;
    EXPECT_NE(r.out.find("sample: " + text + "\n"), std::string::npos) << r.out;
  }
  // The text decodes the prompt and 6 ids of the model's 1000 (the tokenizer knows 400; others
  // show as "<id>"), so it is longer than the prompt.
  EXPECT_GT(samples[1]["sample"].get<std::string>().size(), 3u);

  // Tensor parallel over 2 ranks: both take part, rank 0 prints the same text once.
  const std::string tp = run("tp");
  const CommandResult t = run_shell(mpiexec(2) + FASTLLM_BINARY + " train " + flags() + sample +
                                    " --tensor_parallel=2 --train_iters=4 --save=" + tp);
  ASSERT_EQ(t.exit_code, 0) << t.err;
  const auto tp_samples = metrics(tp, "sample");
  ASSERT_EQ(tp_samples.size(), 2u);
  EXPECT_EQ(tp_samples[1]["sample"], samples[1]["sample"]);
}

TEST_F(TrainLogs, SamplesWithoutATokenizerFailBeforeTraining) {
  const std::string dir = run("run");
  const CommandResult r =
      run_fastllm("train " + flags() + " --sample_interval=1 --train_iters=2 --save=" + dir);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--sample_interval=1 needs a tokenizer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(kFixtures + "/dev-mistral has no tokenizer.model"), std::string::npos)
      << r.err;
  EXPECT_TRUE(metrics(dir, "loss").empty());

  const CommandResult missing = run_fastllm(
      "train " + flags() + " --sample_interval=1 --tokenizer=" + run("none") + " --train_iters=2");
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find(run("none")), std::string::npos) << missing.err;
}

}  // namespace
}  // namespace fastllm::test
