// One message per error under mpiexec -n 4: an error every rank hits is printed once (by rank 0);
// a rank whose error differs adds its own line, prefixed with its rank; a rank failing alone is not
// held up by the ranks that did not fail. Exit code 2 throughout.
#include <gtest/gtest.h>

#include <chrono>
#include <regex>

#include "support/process.h"

namespace fastllm::test {
namespace {

const std::string kMpiexec =
    std::string(FASTLLM_MPIEXEC) + " --oversubscribe --allow-run-as-root -n 4 ";

// The lines of `text` that contain `needle`.
std::vector<std::string> lines_with(const std::string& text, const std::string& needle) {
  std::vector<std::string> found;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.find(needle) != std::string::npos) found.push_back(line);
  return found;
}

TEST(ErrorReportMpi, ALayoutErrorOfEveryRankIsPrintedOnce) {
  // 4 ranks cannot hold 3-way tensor parallelism: every rank finds it once MPI is up.
  const CommandResult r =
      run_shell(kMpiexec + FASTLLM_BINARY +
                " train --tensor_parallel=3 --train_iters=1 --batch_size=4 "
                "--sequence_length=8 --num_layers=1 --hidden_size=24 "
                "--num_attention_heads=3 --vocab_size=64 --data_path=/nonexistent/corpus");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  const auto errors = lines_with(r.err, "fastllm train: error:");
  ASSERT_EQ(errors.size(), 1u) << r.err;
  EXPECT_NE(errors[0].find("--tensor_parallel=3"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("does not divide the 4 MPI ranks"), std::string::npos) << errors[0];
  EXPECT_EQ(errors[0].rfind("fastllm train: error:", 0), 0u) << errors[0];
}

TEST(ErrorReportMpi, AFlagErrorBeforeMpiIsPrintedOnce) {
  const CommandResult r = run_shell(kMpiexec + FASTLLM_BINARY + " train --seq-length=8");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  const auto errors = lines_with(r.err, "unknown flag --seq-length");
  ASSERT_EQ(errors.size(), 1u) << r.err;
  EXPECT_NE(errors[0].find("did you mean --sequence_length?"), std::string::npos) << errors[0];
}

TEST(ErrorReportMpi, SameLineOnEveryRankOnce) {
  for (const std::string mode : {"same", "early"}) {
    const CommandResult r = run_shell(kMpiexec + FASTLLM_ERROR_PROBE + " " + mode);
    EXPECT_EQ(r.exit_code, 2) << mode << ": " << r.err;
    EXPECT_EQ(lines_with(r.err, "error_report_probe: error:").size(), 1u) << mode << ": " << r.err;
    EXPECT_EQ(lines_with(r.err, "[rank ").size(), 0u) << mode << ": " << r.err;
  }
}

TEST(ErrorReportMpi, ADifferentLineComesWithItsRank) {
  const CommandResult r = run_shell(kMpiexec + FASTLLM_ERROR_PROBE + " differ");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  const auto errors = lines_with(r.err, "error_report_probe: error:");
  ASSERT_EQ(errors.size(), 2u) << r.err;
  EXPECT_EQ(lines_with(r.err, "error_report_probe: error: the same for all").size(), 1u) << r.err;
  EXPECT_EQ(lines_with(r.err, "[rank 2] error_report_probe: error: only rank 2 sees this").size(),
            1u)
      << r.err;
}

TEST(ErrorReportMpi, ARankFailingAloneIsNotHeldUp) {
  const auto start = std::chrono::steady_clock::now();
  const CommandResult r = run_shell(kMpiexec + FASTLLM_ERROR_PROBE + " partial");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(lines_with(r.err, "[rank 1] error_report_probe: error: the same for all").size(), 1u)
      << r.err;
  EXPECT_EQ(lines_with(r.err, "barrier completed").size(), 0u) << r.err;
  // 2.5 s of waiting for rank 0, then mpiexec's own shutdown of the other ranks.
  EXPECT_LT(seconds, 30.0) << r.err;
}

}  // namespace
}  // namespace fastllm::test
