// A run never loses its checkpoints: corrupt data is found by checksums and the previous checkpoint
// used, rotation keeps the newest checkpoint that loads, a file's name always equals its content, a
// diverging run skips its non-finite steps and stops, a signal is honoured during evaluation, and
// one --save folder takes one run at a time.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <fstream>
#include <limits>
#include <span>
#include <thread>

#include "hdf5/h5_corrupt.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/train_support.h"

extern char** environ;

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;

class RunSafety : public ::testing::Test {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset("dev-mistral", data()); }
  std::string data() const { return (dir_ / "data").string(); }
  std::string flags() const { return fixture_train_flags("dev-mistral", data(), seq_, 1); }
  std::string run() const { return (dir_ / "run").string(); }
  CommandResult train(const std::string& args) const {
    return run_fastllm("train " + flags() + " " + args);
  }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

// The iteration attribute of a checkpoint, read through the raw HDF5 API.
std::int64_t stored_iteration(const std::string& path) {
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t attribute = H5Aopen_by_name(file, "/", "iteration", H5P_DEFAULT, H5P_DEFAULT);
  std::int64_t value = -1;
  if (attribute >= 0) H5Aread(attribute, H5T_NATIVE_INT64, &value);
  if (attribute >= 0) H5Aclose(attribute);
  if (file >= 0) H5Fclose(file);
  return value;
}

std::vector<std::string> names(const std::string& folder) {
  std::vector<std::string> out;
  for (const std::string& path : list_checkpoints(folder))
    out.push_back(fs::path(path).filename().string());
  return out;
}

TEST_F(RunSafety, ChangedDataIsFoundAndThePreviousCheckpointUsed) {
  const CommandResult first = train("--train_iters=4 --save_interval=2 --save=" + run());
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const std::string newest = run() + "/checkpoint-00000004.h5";
  // One bit of one weight: the file still opens, only its checksums tell.
  flip_stored_byte(newest, "/model/layers/q", 4 * 100 + 2);

  const CommandResult exported =
      run_fastllm("export --load=" + newest + " --output=" + (dir_ / "hf").string());
  EXPECT_EQ(exported.exit_code, 2) << exported.err;
  EXPECT_NE(exported.err.find("checksum mismatch in dataset '/model/layers/q'"), std::string::npos)
      << exported.err;
  EXPECT_NE(exported.err.find(newest), std::string::npos) << exported.err;
  EXPECT_FALSE(fs::exists(dir_ / "hf" / "model.safetensors"));

  const CommandResult resumed =
      train("--train_iters=6 --save_interval=2 --save=" + run() + " --load=" + run());
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("skipping " + newest), std::string::npos) << resumed.err;
  EXPECT_NE(resumed.err.find("checksum mismatch"), std::string::npos) << resumed.err;
  EXPECT_NE(resumed.out.find("checkpoint-00000002.h5 at iteration 2"), std::string::npos)
      << resumed.out;
  // The corrupt file was moved aside, not overwritten in place nor deleted.
  EXPECT_TRUE(fs::exists(newest + ".corrupt"));
  const CommandResult again =
      run_fastllm("export --load=" + newest + " --output=" + (dir_ / "hf2").string());
  EXPECT_EQ(again.exit_code, 0) << again.err;
}

TEST_F(RunSafety, RotationKeepsTheNewestCheckpointThatLoads) {
  const CommandResult first = train("--train_iters=2 --save_interval=1 --save=" + run());
  ASSERT_EQ(first.exit_code, 0) << first.err;
  // Named past the good ones: garbage, and a copy whose name lies about its iteration.
  std::ofstream(run() + "/checkpoint-00000009.h5") << "not an HDF5 file";
  fs::copy_file(run() + "/checkpoint-00000001.h5", run() + "/checkpoint-00000008.h5");
  const CommandResult resumed =
      train("--train_iters=3 --keep_checkpoints=1 --save=" + run() + " --load=" + run());
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("name says iteration 8 but the checkpoint holds iteration 1"),
            std::string::npos)
      << resumed.err;
  EXPECT_NE(resumed.out.find("checkpoint-00000002.h5 at iteration 2"), std::string::npos)
      << resumed.out;
  // The new checkpoint stays, the older good ones go, the files that do not load are left alone.
  EXPECT_EQ(names(run()),
            (std::vector<std::string>{"checkpoint-00000003.h5", "checkpoint-00000008.h5",
                                      "checkpoint-00000009.h5"}));
  EXPECT_EQ(stored_iteration(run() + "/checkpoint-00000003.h5"), 3);
}

TEST_F(RunSafety, ACheckpointAtOrPastTrainItersMeansNothingToTrain) {
  const CommandResult first = train("--train_iters=3 --save=" + run());
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const std::string saved = read_text(run() + "/checkpoint-00000003.h5");
  for (const char* iters : {"2", "3"}) {
    const CommandResult r =
        train(std::string("--train_iters=") + iters + " --save=" + run() + " --load=" + run());
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("nothing to train"), std::string::npos) << r.out;
    EXPECT_EQ(names(run()), (std::vector<std::string>{"checkpoint-00000003.h5"}));
    EXPECT_EQ(read_text(run() + "/checkpoint-00000003.h5"), saved);
  }
}

TEST_F(RunSafety, AnExplicitLoadThatCannotBeReadIsAnError) {
  const std::string garbage = (dir_ / "garbage.h5").string();
  std::ofstream(garbage) << "not an HDF5 file";
  const CommandResult r = train("--train_iters=1 --load=" + garbage);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--load=" + garbage), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("starting fresh"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("iteration"), std::string::npos) << r.out;
}

TEST_F(RunSafety, ASaveFolderThatCannotBeWrittenIsFoundFirst) {
  const std::string file = (dir_ / "a-file").string();
  std::ofstream(file) << "x";
  for (const std::string& save : {file, file + "/below"}) {
    const CommandResult r = train("--train_iters=2 --save=" + save);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find("--save=" + save), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("iteration"), std::string::npos) << r.out;
  }
}

std::string host() {
  char name[HOST_NAME_MAX + 1] = {};
  gethostname(name, sizeof name - 1);
  return name;
}

TEST_F(RunSafety, ALiveLockRefusesASecondRunAndAStaleOneIsTakenOver) {
  fs::create_directories(run());
  const std::string lock = run() + "/.fastllm.lock";
  // This test's own process: alive.
  std::ofstream(lock) << host() << " " << getpid() << "\n";
  const CommandResult refused = train("--train_iters=1 --save=" + run());
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_NE(refused.err.find("in use by process " + std::to_string(getpid())), std::string::npos)
      << refused.err;
  EXPECT_TRUE(list_checkpoints(run()).empty());
  // Another host's lock cannot be judged from here: refused too.
  std::ofstream(lock) << "another-host-" << host() << " 1\n";
  EXPECT_EQ(train("--train_iters=1 --save=" + run()).exit_code, 2);

  // A process that has exited: its lock is stale.
  const pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);
  std::ofstream(lock) << host() << " " << child << "\n";
  const CommandResult taken = train("--train_iters=1 --save=" + run());
  EXPECT_EQ(taken.exit_code, 0) << taken.err;
  EXPECT_EQ(names(run()), (std::vector<std::string>{"checkpoint-00000001.h5"}));
  EXPECT_FALSE(fs::exists(lock)) << "the lock is released on exit";
}

// A model from scratch that a huge learning rate sends to NaN within a few steps.
std::string diverging_flags(const std::string& data, std::int64_t seq) {
  return "--num_layers=2 --hidden_size=64 --num_attention_heads=4 --head_groups=2 "
         "--ffn_hidden_size=128 --vocab_size=1000 --data_path=" +
         data + " --data_sampling=document --split=1,0,0 --sequence_length=" + std::to_string(seq) +
         " --batch_size=2 --micro_batch_size=1 --log_interval=1 --lr=1e4";
}

TEST_F(RunSafety, NonFiniteStepsAreSkippedAndTheRunStops) {
  const CommandResult r = run_fastllm("train " + diverging_flags(data(), seq_) +
                                      " --train_iters=60 --save_interval=1 --keep_checkpoints=0 "
                                      "--max_skipped_steps=3 --save=" +
                                      run());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--max_skipped_steps=3"), std::string::npos) << r.err;
  const auto skipped = metrics(run(), "skipped");
  ASSERT_EQ(skipped.size(), 3u);
  EXPECT_EQ(skipped.back()["skipped_in_a_row"], 3);
  const std::int64_t stopped = skipped.back()["iteration"].get<std::int64_t>();
  EXPECT_LT(stopped, 60);
  // Every checkpoint kept has finite weights: each one exports.
  const auto kept = list_checkpoints(run());
  ASSERT_FALSE(kept.empty());
  EXPECT_LE(stored_iteration(kept.back()), stopped - 1);
  for (const std::string& path : kept) {
    const CommandResult e = run_fastllm("export --load=" + path + " --output=" +
                                        (dir_ / ("hf-" + fs::path(path).stem().string())).string());
    EXPECT_EQ(e.exit_code, 0) << path << ": " << e.err;
  }
}

// A run whose weights are already not finite (here: converted from a model with a NaN) trains
// nothing and saves nothing over them.
TEST_F(RunSafety, WeightsThatAreNotFiniteAreNeverSaved) {
  const fs::path source = dir_ / "nan-model";
  write_model_with_nan(source, 3);
  const std::string converted = (dir_ / "converted").string();
  const CommandResult c = run_fastllm("convert --pretrained_checkpoint_path=" + source.string() +
                                      " --save=" + converted);
  ASSERT_EQ(c.exit_code, 0) << c.err;

  const CommandResult r = run_fastllm(
      "train --pretrained_checkpoint_path=" + source.string() +
      " --load_pretrained_weights=0 --data_path=" + data() +
      " --data_sampling=document --split=1,0,0 --sequence_length=" + std::to_string(seq_) +
      " --batch_size=2 --micro_batch_size=1 --log_interval=1 --train_iters=2 "
      "--max_skipped_steps=0 --load=" +
      converted + " --save=" + run());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("the weights are not finite (lm_head.weight holds NaN at element 3)"),
            std::string::npos)
      << r.err;
  EXPECT_TRUE(list_checkpoints(run()).empty());
  EXPECT_EQ(metrics(run(), "skipped").size(), 2u);
}

TEST_F(RunSafety, ASignalIsHonouredDuringEvaluation) {
  const std::string log = (dir_ / "log").string();
  // An evaluation that would take hours.
  const std::string command = "exec " + std::string(FASTLLM_BINARY) + " train " +
                              diverging_flags(data(), seq_) +
                              " --split=1,1,0 --eval_interval=100 --eval_iters=100000000 "
                              "--train_iters=200 --save=" +
                              run() + " >" + log + " 2>&1";
  const char* argv[] = {"/bin/sh", "-c", command.c_str(), nullptr};
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  const auto started = std::chrono::steady_clock::now();
  while (read_text(log).find("model:") == std::string::npos &&
         std::chrono::steady_clock::now() - started < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  kill(pid, SIGTERM);
  const auto signalled = std::chrono::steady_clock::now();
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() - signalled > std::chrono::seconds(30)) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      FAIL() << "still evaluating 30 s after SIGTERM: " << read_text(log);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_text(log);
  EXPECT_NE(read_text(log).find("validation interrupted"), std::string::npos) << read_text(log);
}

}  // namespace
}  // namespace fastllm::test
