#pragma once
// AdamW on fp32 master weights (docs/DESIGN.md section 7), over all a rank's parameters, with the
// gradient sum over the data-parallel group and ZeRO-1 (each data-parallel rank keeps the master
// weights and moments of one shard of the flat parameters, updates it, and the ranks all-gather
// the new weights).
#include <cstdint>
#include <vector>

#include "kernels/communicator.h"
#include "model/model.h"

namespace fastllm {

struct AdamWSettings {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // applied only to parameters with 2 or more dimensions
};

enum class OptimizerState { Master, ExpAvg, ExpAvgSq };

class AdamW {
 public:
  // data_parallel: the ranks holding the same part of the model (null: just this one). With zero,
  // the model's flat buffers must be padded to a multiple of the group's size (ModelPartition).
  AdamW(Backend& backend, Model& model, const AdamWSettings& settings,
        Communicator* data_parallel = nullptr, bool zero = false);

  // Where finalize_gradients (parallel/finalize.h) reduce-scatters this rank's shard of the summed
  // gradients with ZeRO-1; empty without it (the model's flat gradients are all-reduced in place).
  Tensor gradient_shard() const { return zero_ ? grad_shard_.t : Tensor(); }
  // Sum of squares of the reduced gradients this rank accounts for in the global norm: its
  // primary parameters, within its shard with ZeRO-1, and on data-parallel rank 0 only without.
  double grad_sum_squares();
  // One update with learning rate lr; gradients are multiplied by grad_scale first (clipping).
  // One fused pass over the shard (Backend::adamw_ranges) that also writes a bf16 model's weights
  // and, with zero_grads, clears the gradients it read: the model's without ZeRO-1, this rank's
  // reduced shard with it (the model's full gradients are then still the caller's to clear).
  void step(double lr, double grad_scale, bool zero_grads = false);
  std::int64_t steps() const { return step_; }
  void set_steps(std::int64_t steps) { step_ = steps; }

  // The flat range of the model's parameters whose state this rank keeps and updates.
  std::int64_t shard_begin() const { return shard_begin_; }
  std::int64_t shard_end() const { return shard_end_; }
  // F32 state of [shard_begin, shard_end).
  Tensor master() const { return shard(master_); }
  Tensor exp_avg() const { return shard(exp_avg_.t); }
  Tensor exp_avg_sq() const { return shard(exp_avg_sq_.t); }
  // Collective over the data-parallel group with ZeRO-1: the state of all of this rank's
  // parameters, in flat order, on the host.
  std::vector<float> gather(OptimizerState which);
  // Sets the state of [shard_begin, shard_end) from the host.
  void load(OptimizerState which, const float* values);
  // After the model's weights were set (loaded, initialised): the master weights from them.
  void model_to_master();
  // After the master weights were overwritten: the model's copy from them.
  void master_to_model();

 private:
  struct State {
    Buffer buffer;
    Tensor t;
  };
  State zeros(std::int64_t n);
  Tensor shard(Tensor t) const { return t.rows(0, shard_end_ - shard_begin_); }
  Tensor full_shard(OptimizerState which) const;
  // This rank's shard of the model's own (compute-dtype) weights, padding included.
  Tensor model_shard_weights() const;
  // The reduced gradients, indexed like the shard's state.
  Tensor shard_grads() const;

  Backend& backend_;
  Model& model_;
  AdamWSettings settings_;
  Communicator* data_parallel_;
  bool zero_;
  // ZeRO-1 shards of shard_size_ elements (padding included); the first covers the whole model
  // without ZeRO.
  std::int64_t shard_size_ = 0, shard_begin_ = 0, shard_end_ = 0;
  // The model's own weights when they are F32; a separate copy when the model computes in bf16.
  State own_master_;
  Tensor master_;
  State exp_avg_, exp_avg_sq_, grad_shard_;
  std::int64_t step_ = 0;
};

}  // namespace fastllm
