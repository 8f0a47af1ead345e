// Every step of each learning-rate schedule, against values worked out by hand from docs/DESIGN.md
// section 7: warmup lr * (it + 1) / warmup, then constant, linear or cosine decay to min_lr.
#include <gtest/gtest.h>

#include "train/schedule.h"

namespace fastllm {
namespace {

LrSchedule schedule(DecayStyle style) {
  LrSchedule s;
  s.lr = 1.0;
  s.min_lr = 0.1;
  s.warmup_iters = 2;
  s.decay_iters = 6;
  s.style = style;
  return s;
}

void expect_steps(const LrSchedule& s, const std::vector<double>& expected) {
  for (std::size_t it = 0; it < expected.size(); ++it)
    EXPECT_NEAR(s.at(static_cast<std::int64_t>(it)), expected[it], 1e-12) << "iteration " << it;
}

TEST(Schedule, Constant) {
  expect_steps(schedule(DecayStyle::Constant), {0.5, 1, 1, 1, 1, 1, 1, 1});
}

TEST(Schedule, Linear) {
  // After warmup: 1 - 0.9 * (it - 2) / 4.
  expect_steps(schedule(DecayStyle::Linear), {0.5, 1, 1, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1});
}

TEST(Schedule, Cosine) {
  // After warmup: 0.1 + 0.45 * (1 + cos(pi * (it - 2) / 4)); cos(pi/4) = 0.70710678...
  expect_steps(schedule(DecayStyle::Cosine),
               {0.5, 1, 1, 0.868198051533946, 0.55, 0.231801948466054, 0.1, 0.1});
}

TEST(Schedule, NoWarmup) {
  LrSchedule s = schedule(DecayStyle::Linear);
  s.warmup_iters = 0;
  s.decay_iters = 4;
  expect_steps(s, {1, 0.775, 0.55, 0.325, 0.1});
}

}  // namespace
}  // namespace fastllm
