// `--recompute=none|selective|full` replays exactly the kernels of the forward pass, so `fastllm
// probe` writes the same bits (logits, loss, aux loss, every gradient) in all three modes, on every
// fixture and under tensor- and pipeline-parallel layouts.
#include <gtest/gtest.h>

#include <algorithm>

#include "parallel_support.h"

namespace fastllm::test {
namespace {

struct Case {
  std::string fixture;
  Shape shape;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.fixture << "_" << c.shape.name();
}

class Recompute : public ::testing::TestWithParam<Case> {};

TEST_P(Recompute, EveryModeWritesTheSameBits) {
  const Case& c = GetParam();
  TempDir dir;
  const std::string input = kFixtureDir + "/" + c.fixture + "/reference.safetensors";
  std::map<std::string, std::string> outputs;
  for (const char* mode : {"none", "selective", "full"}) {
    const std::string out = (dir / (std::string(mode) + ".safetensors")).string();
    const CommandResult r = run_mpi(c.shape.ranks(), "probe " + fixture_model(c.fixture) +
                                                         c.shape.flags() + " --recompute=" + mode +
                                                         " --input=" + input + " --output=" + out);
    ASSERT_EQ(r.exit_code, 0) << mode << ": " << r.err << r.out;
    outputs[mode] = read_text(out);
    ASSERT_GT(outputs[mode].size(), 1000u) << mode;
  }
  EXPECT_TRUE(outputs["selective"] == outputs["none"]) << "selective differs from none";
  EXPECT_TRUE(outputs["full"] == outputs["none"]) << "full differs from none";
}

std::vector<Case> cases() {
  // Every fixture on one rank and under tensor x pipeline and data x tensor x pipeline layouts; the
  // other layouts of test_probe_layouts run in the slow suite.
  std::vector<Shape> shapes = {{1, 1, 1}, {1, 2, 2}, {2, 2, 2}};
#if FASTLLM_SLOW_CASES
  shapes = {{2, 1, 1}, {1, 2, 1}, {1, 1, 2}, {2, 2, 1}, {1, 4, 1}};
#endif
  std::vector<Case> out;
  for (const char* f : {"dev-mistral", "dev-mixtral", "dev-tied-nowindow"}) {
    for (const Shape& s : shapes)
      out.push_back({f, s});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, Recompute, ::testing::ValuesIn(cases()), [](const auto& info) {
  std::string name = info.param.fixture.substr(4) + "_" + info.param.shape.name();
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
});

}  // namespace
}  // namespace fastllm::test
