// The generator's API: choosing a token (greedy, temperature, top-p nucleus) against values worked
// out by hand, and stopping at EOS, on a fixture model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "config/architecture.h"
#include "config/flags.h"
#include "kernels/host/host_backend.h"
#include "model/generator.h"
#include "model/hf_weights.h"

namespace fastllm::test {
namespace {

TEST(ChooseToken, GreedyTakesTheFirstMaximum) {
  EXPECT_EQ(choose_token({0.5f, 3.0f, -1.0f, 3.0f}, 0.0, 1.0, 0.99), 1);
  EXPECT_EQ(choose_token({-7.0f}, 0.0, 0.5, 0.0), 0);
}

// logits log(0.5), log(0.3), log(0.2) at temperature 1: probabilities 0.5, 0.3, 0.2.
TEST(ChooseToken, SamplesTheCumulativeDistribution) {
  const std::vector<float> logits = {std::log(0.2f), std::log(0.5f), std::log(0.3f)};
  // Sorted: id 1 (0.5), id 2 (0.3), id 0 (0.2).
  EXPECT_EQ(choose_token(logits, 1.0, 1.0, 0.0), 1);
  EXPECT_EQ(choose_token(logits, 1.0, 1.0, 0.49), 1);
  EXPECT_EQ(choose_token(logits, 1.0, 1.0, 0.51), 2);
  EXPECT_EQ(choose_token(logits, 1.0, 1.0, 0.79), 2);
  EXPECT_EQ(choose_token(logits, 1.0, 1.0, 0.81), 0);
  EXPECT_EQ(choose_token(logits, 1.0, 1.0, 0.999), 0);
}

TEST(ChooseToken, TopPKeepsTheNucleusAndRenormalises) {
  const std::vector<float> logits = {std::log(0.2f), std::log(0.5f), std::log(0.3f)};
  // top_p 0.7: ids 1 and 2 (0.8 >= 0.7), renormalised to 0.625 and 0.375.
  EXPECT_EQ(choose_token(logits, 1.0, 0.7, 0.6), 1);
  EXPECT_EQ(choose_token(logits, 1.0, 0.7, 0.65), 2);
  EXPECT_EQ(choose_token(logits, 1.0, 0.7, 0.999), 2);
  // top_p 0.5: id 1 alone.
  EXPECT_EQ(choose_token(logits, 1.0, 0.5, 0.999), 1);
}

TEST(ChooseToken, TemperatureSharpens) {
  // At temperature 0.5 the probabilities go as p^2: 0.04, 0.25, 0.09 (sum 0.38); id 1 holds
  // 0.658 of the mass.
  const std::vector<float> logits = {std::log(0.2f), std::log(0.5f), std::log(0.3f)};
  EXPECT_EQ(choose_token(logits, 0.5, 1.0, 0.65), 1);
  EXPECT_EQ(choose_token(logits, 0.5, 1.0, 0.67), 2);
}

ModelConfig fixture_config(const std::string& name) {
  Options options("generate", {FlagGroup::Model});
  options.parse({"--pretrained_checkpoint_path=" + std::string(FASTLLM_FIXTURES) + "/" + name});
  return resolve_model(options);
}

// With an EOS token the token generated at some step, generation ends right after it.
TEST(Generator, StopsAfterEos) {
  const ModelConfig config = fixture_config("dev-mixtral");
  HostBackend backend;
  Model model(backend, config.arch, config.run);
  load_hf_weights(model, config.checkpoint_path);
  Generator generator(model, config.run, nullptr);
  GenerationSettings settings;
  settings.max_new_tokens = 20;
  const std::vector<std::int32_t> prompt = {1, 40, 700, 3};
  const auto all = generator.generate(prompt, settings);
  ASSERT_EQ(all.size(), 20u);
  // A list of EOS tokens, the first of which never comes.
  std::int32_t absent = 0;
  while (std::find(all.begin(), all.end(), absent) != all.end())
    ++absent;
  settings.eos_ids = {absent, all[7]};
  const auto first =
      static_cast<std::size_t>(std::find(all.begin(), all.end(), all[7]) - all.begin());
  const auto stopped = generator.generate(prompt, settings);
  EXPECT_EQ(stopped, std::vector<std::int32_t>(all.begin(), all.begin() + first + 1));
  // The cache is rebuilt for each call: the first call again gives the same tokens.
  settings.eos_ids = {};
  EXPECT_EQ(generator.generate(prompt, settings), all);
}

}  // namespace
}  // namespace fastllm::test
