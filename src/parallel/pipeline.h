#pragma once
// Micro-batches through the pipeline stages (docs/DESIGN.md section 5): the 1F1B schedule for
// training and probing and plain forward passes for evaluation, with the vocabulary-parallel
// cross-entropy on the last stage.
#include <cstdint>
#include <vector>

#include "kernels/communicator.h"
#include "model/model.h"
#include "parallel/cross_entropy.h"

namespace fastllm {

// Sums over this rank's micro-batches; only the last stage computes a loss, so elsewhere they are
// 0.
struct PipelineTotals {
  double ce_sum = 0;
  double aux_sum = 0;
  std::int64_t predicted = 0;
  // MoE: Model::expert_load summed over micro-batches; one entry per expert on every stage.
  std::vector<double> expert_load_sum;
};

class Pipeline {
 public:
  // `stages`: the pipeline-parallel group, its rank the stage's index; null for a one-stage model.
  Pipeline(Model& model, Communicator* stages);
  // One stage, one rank (a model without tensor or pipeline parallelism).
  explicit Pipeline(Model& model) : Pipeline(model, nullptr) {}

  // Forward and backward of every micro-batch, one forward then one backward in the steady state
  // (1F1B: stage s runs stages - s - 1 forwards ahead), accumulating the gradient of
  //   ce_scale * sum(cross-entropy) + aux_scale * sum over micro-batches of aux_loss.
  // On the last stage, `logits` (when given) receives each micro-batch's logits of this rank's
  // vocabulary rows [tokens, vocab_rows].
  PipelineTotals forward_backward(const std::vector<MicroBatch>& batches, double ce_scale,
                                  double aux_scale,
                                  std::vector<std::vector<float>>* logits = nullptr);
  // Forward passes only (evaluation).
  PipelineTotals forward(const std::vector<MicroBatch>& batches);

 private:
  // A micro-batch between its forward and its backward.
  struct InFlight {
    std::unique_ptr<Model::ForwardState> state;
    CrossEntropyState loss;
  };
  // Forward of one micro-batch on this stage; the last stage adds its loss to totals.
  InFlight forward_one(const MicroBatch& mb, Model::StageTensors input, PipelineTotals& totals,
                       std::vector<std::vector<float>>* logits);
  PipelineTotals empty_totals() const;
  Model::StageTensors backward_one(InFlight flight, double ce_scale, double aux_scale,
                                   Model::StageTensors grad);
  bool first() const { return stage_ == 0; }
  bool last() const { return stage_ == stages_ - 1; }
  Model::StageTensors recv_forward(const MicroBatch& mb);
  void send_forward(const Model::ForwardState& state);
  Model::StageTensors send_forward_recv_backward(const Model::ForwardState& state,
                                                 const MicroBatch& next_backward);
  Model::StageTensors send_backward_recv_forward(const Model::StageTensors& grad,
                                                 const MicroBatch& next_forward);
  Model::StageTensors recv_backward(const MicroBatch& mb);
  void send_backward(const Model::StageTensors& grad);

  Model& model_;
  VocabParallelCrossEntropy loss_;
  Communicator* comm_;
  int stages_ = 1;
  int stage_ = 0;
};

}  // namespace fastllm
