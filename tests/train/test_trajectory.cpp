// `fastllm train` reproduces the AdamW trajectories transformers computed for the fixtures: the
// loss and gradient norm of every step, and the weights after the last one.
#include <gtest/gtest.h>

#include <cmath>

#include "io/safetensors.h"
#include "support/numeric.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

void check_trajectory(const std::string& fixture, std::int64_t micro_batch_size) {
  TempDir dir;
  const std::string data = (dir / "data").string(), save = (dir / "run").string();
  const std::int64_t seq = write_trajectory_dataset(fixture, data);
  const SafetensorsFile reference =
      SafetensorsFile::open(kFixtures + "/" + fixture + "/trajectory.safetensors");
  const std::vector<float> losses = reference.read_f32("losses");
  const std::vector<float> norms = reference.read_f32("grad_norms");
  const auto steps = static_cast<std::int64_t>(losses.size());

  CommandResult r =
      run_fastllm("train " + fixture_train_flags(fixture, data, seq, micro_batch_size) +
                  " --train_iters=" + std::to_string(steps) + " --save=" + save);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  const auto records = metrics(save, "loss");
  ASSERT_EQ(static_cast<std::int64_t>(records.size()), steps);
  for (std::int64_t s = 0; s < steps; ++s) {
    EXPECT_EQ(records[s]["iteration"], s + 1);
    const double loss = records[s]["loss"], norm = records[s]["grad_norm"];
    EXPECT_LE(std::fabs(loss - losses[s]) / losses[s], 1e-5) << "step " << s;
    EXPECT_LE(std::fabs(norm - norms[s]) / norms[s], 1e-4) << "step " << s;
  }

  CommandResult exported =
      run_fastllm("export --load=" + save + " --dtype=fp32 --output=" + (dir / "hf").string());
  ASSERT_EQ(exported.exit_code, 0) << exported.err;
  const auto weights = read_all((dir / "hf").string());
  int compared = 0;
  for (const TensorInfo& t : reference.tensors()) {
    if (t.name == "batches" || t.name == "losses" || t.name == "grad_norms") continue;
    ASSERT_TRUE(weights.count(t.name)) << t.name;
    EXPECT_LE(relative_error(weights.at(t.name), reference.read_f32(t.name)), 1e-4) << t.name;
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(weights.size()));
}

// Two micro-batches of one sequence: gradient accumulation over the global batch.
TEST(Trajectory, MistralWithAccumulation) {
  check_trajectory("dev-mistral", 1);
}
// One micro-batch of two sequences: the load-balancing loss is over the whole batch, as in
// transformers.
TEST(Trajectory, Mixtral) {
  check_trajectory("dev-mixtral", 2);
}

}  // namespace
}  // namespace fastllm::test
