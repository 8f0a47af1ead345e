#pragma once
// AdamW on fp32 master weights (DESIGN.md section 7), over every parameter of a model.
#include <cstdint>

#include "model/model.h"

namespace fastllm {

struct AdamWSettings {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // applied only to parameters with 2 or more dimensions
};

class AdamW {
 public:
  AdamW(Backend& backend, Model& model, const AdamWSettings& settings);

  // One update with learning rate lr; gradients are multiplied by grad_scale first (clipping).
  void step(double lr, double grad_scale);
  std::int64_t steps() const { return step_; }
  void set_steps(std::int64_t steps) { step_ = steps; }

  // Flat F32 state over all parameters, in the model's parameter order.
  Tensor master() const { return master_; }
  Tensor exp_avg() const { return exp_avg_.t; }
  Tensor exp_avg_sq() const { return exp_avg_sq_.t; }
  // After the master weights were overwritten (a loaded checkpoint): refresh the model's copy.
  void master_to_model();

 private:
  struct State {
    Buffer buffer;
    Tensor t;
  };
  State zeros(std::int64_t n);

  Backend& backend_;
  Model& model_;
  AdamWSettings settings_;
  // The model's own weights when they are F32; a separate copy when the model computes in bf16.
  State own_master_;
  Tensor master_;
  State exp_avg_, exp_avg_sq_;
  std::int64_t step_ = 0;
};

}  // namespace fastllm
