// `fastllm generate` under mpiexec: tensor parallel (heads, FFN rows and vocabulary slices over 2
// ranks), pipeline parallel (2 stages passing each step's activations), both, and a data-parallel
// replica beside them, each giving the greedy tokens of full forwards on every fixture.
#include <gtest/gtest.h>

#include "cli/generate_support.h"

namespace fastllm::test {
namespace {

constexpr int kNew = 24;  // past the dev fixtures' window of 16 with the prompt of 10
const std::string kNewFlag = "--max_new_tokens=" + std::to_string(kNew);

struct Case {
  const char* model;
  const char* layout;
  int ranks;
};

class GenerateLayouts : public ::testing::TestWithParam<Case> {};

TEST_P(GenerateLayouts, GreedyEqualsFullForwardsAndOneRank) {
  const Case c = GetParam();
  const auto tokens = generate_ids(c.model, kPrompt, kNewFlag + " " + c.layout, c.ranks);
  ASSERT_EQ(tokens.size(), static_cast<std::size_t>(kNew));
  expect_greedy(c.model, kPrompt, tokens);
  EXPECT_EQ(tokens, generate_ids(c.model, kPrompt, kNewFlag));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GenerateLayouts,
                         ::testing::Values(Case{"dev-mistral", "--tensor_parallel=2", 2},
                                           Case{"dev-mistral", "--pipeline_parallel=2", 2},
                                           Case{"dev-mixtral", "--tensor_parallel=2", 2},
                                           Case{"dev-mixtral", "--pipeline_parallel=2", 2},
                                           Case{"dev-tied-nowindow", "--tensor_parallel=2", 2},
                                           Case{"dev-tied-nowindow", "--pipeline_parallel=2", 2},
                                           Case{"dev-mistral",
                                                "--tensor_parallel=2 --pipeline_parallel=2", 4},
                                           Case{"dev-mixtral", "--pipeline_parallel=2", 4}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string name = std::string(info.param.model) + "_" +
                                              info.param.layout + "_" +
                                              std::to_string(info.param.ranks);
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

// Sampling draws on tensor rank 0 of the last stage and every rank decodes that token: the same
// tokens on every rank count, and reproducible.
TEST(GenerateLayoutsSampling, SeededSamplingRepeatsUnderTensorAndPipelineParallelism) {
  const std::string flags = kNewFlag + " --temperature=1 --top_p=0.9 --seed=11 ";
  const auto a = generate_ids("dev-mixtral", kPrompt, flags + "--tensor_parallel=2", 2);
  const auto b = generate_ids("dev-mixtral", kPrompt, flags + "--tensor_parallel=2", 2);
  const auto c = generate_ids("dev-mixtral", kPrompt, flags + "--pipeline_parallel=2", 2);
  ASSERT_EQ(a.size(), static_cast<std::size_t>(kNew));
  EXPECT_EQ(a, b);
  EXPECT_EQ(c.size(), static_cast<std::size_t>(kNew));
}

}  // namespace
}  // namespace fastllm::test
