// `fastllm --version` and the unknown-flag message: the versions printed are checked against what
// the tools of the installation say themselves (mpirun --version), and the suggested flag against
// the flag a user meant, written out by hand.
#include <gtest/gtest.h>

#include <cctype>
#include <regex>

#include "support/process.h"

namespace fastllm::test {
namespace {

TEST(Version, NamesRevisionBackendsAndLibraries) {
  const CommandResult r = run_fastllm("--version");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(std::regex_search(
      r.out,
      std::regex(
          R"(^fastllm \d+\.\d+\.\d+ \(git ([0-9a-f]{7,}(-dirty)?|unknown|\S+-g[0-9a-f]+(-dirty)?)\)\n)")))
      << r.out;
  EXPECT_TRUE(
      std::regex_search(r.out, std::regex(R"(\nbackends: host(, cuda| \(built without CUDA\))\n)")))
      << r.out;
  EXPECT_TRUE(
      std::regex_search(r.out, std::regex(R"(\nHDF5: \d+\.\d+\.\d+ \((parallel|serial)\)\n)")))
      << r.out;
  // The MPI the build compiled against is the one whose mpirun runs the tests.
  const CommandResult mpirun = run_shell(std::string(FASTLLM_MPIEXEC) + " --version");
  std::smatch m;
  ASSERT_TRUE(
      std::regex_search(mpirun.out, m, std::regex(R"(\((Open MPI|OpenRTE)\) (\d+\.\d+\.\d+))")))
      << mpirun.out;
  EXPECT_NE(r.out.find("\nMPI: Open MPI " + m[2].str() + ", MPI standard 3.1\n"), std::string::npos)
      << r.out;
}

TEST(Version, CommandAndFlagAgree) {
  const CommandResult flag = run_fastllm("--version"), command = run_fastllm("version");
  EXPECT_EQ(command.exit_code, 0);
  EXPECT_EQ(command.out, flag.out);
  EXPECT_NE(run_fastllm("--help").out.find("'fastllm --version'"), std::string::npos);
}

struct Suggestion {
  std::string given;
  std::string expected;  // "" when no flag is close enough to suggest
};

class UnknownFlag : public ::testing::TestWithParam<Suggestion> {};

TEST_P(UnknownFlag, SuggestsTheNearestFlagOfTheCommand) {
  const Suggestion& s = GetParam();
  const CommandResult r = run_fastllm("train " + s.given + "=1");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unknown flag " + s.given + " for 'fastllm train'"), std::string::npos)
      << r.err;
  if (s.expected.empty()) {
    EXPECT_EQ(r.err.find("did you mean"), std::string::npos) << r.err;
  } else {
    EXPECT_NE(r.err.find("; did you mean " + s.expected + "?"), std::string::npos) << r.err;
  }
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

INSTANTIATE_TEST_SUITE_P(Cases, UnknownFlag,
                         ::testing::Values(Suggestion{"--seq-length", "--sequence_length"},
                                           Suggestion{"--tensor-parallel", "--tensor_parallel"},
                                           Suggestion{"--micro-batch-size", "--micro_batch_size"},
                                           Suggestion{"--train_iter", "--train_iters"},
                                           Suggestion{"--lr_warmup", "--lr_warmup_iters"},
                                           Suggestion{"--num_layer", "--num_layers"},
                                           Suggestion{"--qqqqqqqqqqqq", ""},
                                           Suggestion{"--xyz", ""}),
                         [](const ::testing::TestParamInfo<Suggestion>& info) {
                           std::string name;
                           for (char c : info.param.given)
                             if (std::isalnum(static_cast<unsigned char>(c))) name += c;
                           return name;
                         });

TEST(UnknownFlag, OnlyTheCommandsOwnFlagsAreSuggested) {
  // --data_parallel is an inspect flag; train derives it from the world size.
  const CommandResult train = run_fastllm("train --data-parallel=2");
  EXPECT_EQ(train.err.find("did you mean --data_parallel"), std::string::npos) << train.err;
  const CommandResult inspect = run_fastllm("inspect --data-parallel=2");
  EXPECT_EQ(inspect.exit_code, 2);
  EXPECT_NE(inspect.err.find("did you mean --data_parallel?"), std::string::npos) << inspect.err;
}

TEST(UnknownFlag, ConfigFileKeysToo) {
  TempDir dir;
  std::ofstream(dir / "run.yaml") << "seq-length: 128\n";
  const CommandResult r = run_fastllm("train --config " + (dir / "run.yaml").string());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("config file key 'seq-length' for 'fastllm train'; did you mean "
                       "--sequence_length?"),
            std::string::npos)
      << r.err;
}

}  // namespace
}  // namespace fastllm::test
