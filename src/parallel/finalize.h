#pragma once
// Everything that turns each rank's micro-batch results into the step's gradients and loss, in
// one place (as Megatron's finalize_model_grads; docs/DESIGN.md section 3). The trainer and
// `fastllm probe` both go through these.
#include <cstdint>
#include <vector>

#include "model/model.h"
#include "parallel/pipeline.h"
#include "parallel/topology.h"

namespace fastllm {

// Sums the gradients of a step: first within one model replica, over the ranks that hold copies
// of one parameter (key/value heads replicated over tensor-parallel ranks, the tied embedding of
// the first and last stage, norms whose tokens sequence parallelism splits), then over the
// data-parallel group: an all-reduce of the flat gradients, or with ZeRO-1 a reduce-scatter of the
// padded gradients into `zero_shard`, this rank's shard of them. With ZeRO-2's gradient buckets the
// sink has done all of this during backward but for the tied embedding's deferred buckets.
void finalize_gradients(Model& model, const Topology& topology, Tensor zero_shard = {});

// ZeRO-2's sink (Model::GradientSink): a complete bucket is first summed over the ranks of the
// model replica that hold copies of its parameters (these run the same backward in lockstep),
// then each piece of it is reduced onto the data-parallel rank whose shard holds that range, which
// adds it to `shard` (its gradient_shard(), zeroed by the caller at the start of a step).
class ShardedGradientSink final : public GradientSink {
 public:
  ShardedGradientSink(Backend& backend, const Topology& topology, Tensor shard)
      : backend_(backend), topology_(topology), shard_(shard) {}
  void take(const std::vector<Parameter*>& params, std::int64_t flat_begin, Tensor grads) override;

 private:
  Backend& backend_;
  const Topology& topology_;
  Tensor shard_;
};

// The loss sums of the whole global batch, on every rank: only the last stage computes a loss and
// its first tensor-parallel rank reports it, summed over the data-parallel replicas.
struct GlobalLoss {
  double ce_sum = 0;   // cross-entropy summed over the predicted tokens
  double aux_sum = 0;  // MoE load-balancing losses summed over micro-batches
  std::int64_t predicted = 0;
  std::vector<double> expert_load_sum;  // MoE: expert loads summed over micro-batches
};
// Collective over the world: every rank's local.expert_load_sum has the same size (the
// pipeline's totals have one entry per expert on every stage).
GlobalLoss global_loss(const PipelineTotals& local, const Topology& topology);

}  // namespace fastllm
