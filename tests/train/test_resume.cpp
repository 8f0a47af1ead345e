// Checkpoints that survive: resuming is bit-exact, a save killed half-way is skipped in favour of
// the one before it, and SIGTERM saves a checkpoint and exits cleanly.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <thread>

#include "train/checkpoint.h"
#include "train/train_support.h"

extern char** environ;

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;

std::string bytes_of(const fs::path& path) {
  return read_text(path);
}

class Resume : public ::testing::Test {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset("dev-mistral", data()); }
  std::string data() const { return (dir_ / "data").string(); }
  std::string flags() const { return fixture_train_flags("dev-mistral", data(), seq_, 1); }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

TEST_F(Resume, BitIdenticalToAnUninterruptedRun) {
  const std::string straight = (dir_ / "straight").string(), split = (dir_ / "split").string();
  ASSERT_EQ(run_fastllm("train " + flags() + " --train_iters=10 --save=" + straight).exit_code, 0);
  ASSERT_EQ(run_fastllm("train " + flags() + " --train_iters=5 --save=" + split).exit_code, 0);
  CommandResult resumed =
      run_fastllm("train " + flags() + " --train_iters=10 --save=" + split + " --load=" + split);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.out.find("resumed from"), std::string::npos) << resumed.out;
  EXPECT_NE(resumed.out.find("checkpoint-00000005.h5 at iteration 5"), std::string::npos);

  const auto a = metrics(straight, "loss"), b = metrics(split, "loss");
  ASSERT_EQ(a.size(), 10u);
  ASSERT_EQ(b.size(), 10u);
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["iteration"], b[i]["iteration"]);
    EXPECT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << "iteration " << i + 1;
    EXPECT_EQ(a[i]["grad_norm"].get<double>(), b[i]["grad_norm"].get<double>());
  }
  for (const std::string& run : {straight, split})
    ASSERT_EQ(
        run_fastllm("export --dtype=fp32 --load=" + run + " --output=" + run + "/hf").exit_code, 0);
  EXPECT_EQ(bytes_of(straight + "/hf/model.safetensors"),
            bytes_of(split + "/hf/model.safetensors"));
}

TEST_F(Resume, CorruptNewestCheckpointFallsBackToThePrevious) {
  const std::string run = (dir_ / "run").string();
  const CommandResult first =
      run_fastllm("train " + flags() + " --train_iters=4 --save_interval=2 --save=" + run);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  // The newest file truncated, as a copy cut short would leave it.
  const fs::path newest = fs::path(run) / "checkpoint-00000004.h5";
  fs::resize_file(newest, fs::file_size(newest) / 2);
  CommandResult r =
      run_fastllm("train " + flags() + " --train_iters=6 --save=" + run + " --load=" + run);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("skipping " + newest.string()), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("checkpoint-00000002.h5 at iteration 2"), std::string::npos) << r.out;
}

// Starts `fastllm train` in the background.
pid_t spawn_train(const std::string& args, const std::string& log) {
  // exec, so that signals reach fastllm itself rather than the shell.
  const std::string command =
      "exec " + std::string(FASTLLM_BINARY) + " train " + args + " >" + log + " 2>&1";
  const char* argv[] = {"/bin/sh", "-c", command.c_str(), nullptr};
  pid_t pid = 0;
  EXPECT_EQ(posix_spawn(&pid, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// A model big enough that a checkpoint takes a while to write.
std::string big_model_flags(const std::string& data) {
  return "--num_layers=4 --hidden_size=512 --num_attention_heads=8 --head_groups=4 "
         "--ffn_hidden_size=1024 --vocab_size=1000 --data_path=" +
         data +
         " --data_sampling=document --split=1,0,0 --sequence_length=16 --batch_size=2 "
         "--micro_batch_size=2 --log_interval=1";
}

TEST_F(Resume, KilledWhileSavingResumesFromThePreviousCheckpoint) {
  const std::string run = (dir_ / "run").string();
  const pid_t pid =
      spawn_train(big_model_flags(data()) + " --train_iters=1000 --save_interval=1 --save=" + run,
                  (dir_ / "log").string());
  // Kill as soon as a second checkpoint is being written (its .tmp exists).
  bool killed = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!killed && std::chrono::steady_clock::now() < deadline) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(run, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.ends_with(".tmp") && name != "checkpoint-00000001.h5.tmp") {
        kill(pid, SIGKILL);
        killed = true;
        break;
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ASSERT_TRUE(killed) << read_text(dir_ / "log");
  EXPECT_EQ(wait_exit(pid), 128 + SIGKILL);
  CommandResult r = run_fastllm("train " + big_model_flags(data()) +
                                " --train_iters=3 --save=" + run + " --load=" + run);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
}

TEST_F(Resume, SigtermSavesAndExitsZero) {
  const std::string run = (dir_ / "run").string(), log = (dir_ / "log").string();
  const pid_t pid =
      spawn_train(big_model_flags(data()) + " --train_iters=100000 --save=" + run, log);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (read_text(log).find("iteration      2/") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  kill(pid, SIGTERM);
  EXPECT_EQ(wait_exit(pid), 0) << read_text(log);
  EXPECT_NE(read_text(log).find("saving and stopping"), std::string::npos) << read_text(log);
  EXPECT_EQ(list_checkpoints(run).size(), 1u);
}

}  // namespace
}  // namespace fastllm::test
