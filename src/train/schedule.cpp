#include "train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "io/error.h"

namespace fastllm {

DecayStyle parse_decay_style(const std::string& name) {
  if (name == "constant") return DecayStyle::Constant;
  if (name == "linear") return DecayStyle::Linear;
  if (name == "cosine") return DecayStyle::Cosine;
  throw UserError("--lr_decay_style=" + name + ": expected constant, linear or cosine");
}

double LrSchedule::at(std::int64_t it) const {
  if (it < warmup_iters)
    return lr * static_cast<double>(it + 1) / static_cast<double>(warmup_iters);
  if (style == DecayStyle::Constant) return lr;
  if (it >= decay_iters) return min_lr;
  const double progress =
      static_cast<double>(it - warmup_iters) / static_cast<double>(decay_iters - warmup_iters);
  const double factor = style == DecayStyle::Linear
                            ? 1.0 - progress
                            : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return min_lr + (lr - min_lr) * factor;
}

}  // namespace fastllm
