#pragma once
// The learning rate (docs/DESIGN.md section 7): linear warmup, then constant, linear or cosine
// decay to min_lr at lr_decay_iters.
#include <cstdint>
#include <string>

namespace fastllm {

enum class DecayStyle { Constant, Linear, Cosine };
DecayStyle parse_decay_style(const std::string& name);

struct LrSchedule {
  double lr = 3e-4;
  double min_lr = 0;
  std::int64_t warmup_iters = 0;
  std::int64_t decay_iters = 0;  // iteration at which min_lr is reached
  DecayStyle style = DecayStyle::Constant;

  // The learning rate of iteration `it` (from 0).
  double at(std::int64_t it) const;
};

}  // namespace fastllm
