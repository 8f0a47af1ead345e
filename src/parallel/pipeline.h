#pragma once
// Micro-batches through the pipeline stages (DESIGN.md section 5): the 1F1B schedule for training
// and probing, plain forward passes for evaluation, and the gradient sums between ranks that hold
// copies of one parameter within a model replica.
#include <cstdint>
#include <vector>

#include "model/model.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"

namespace fastllm {

// Sums over this rank's micro-batches; only the last stage computes a loss, so elsewhere they are
// 0.
struct PipelineTotals {
  double ce_sum = 0;
  double aux_sum = 0;
  std::int64_t predicted = 0;
};

class Pipeline {
 public:
  // `stages`: the pipeline-parallel group, its rank the stage's index; null for a one-stage model.
  Pipeline(Model& model, Communicator* stages);

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
  Communicator* comm_;
  int stages_ = 1;
  int stage_ = 0;
};

// Sums, within one model replica, the gradients of parameters that several ranks hold: key/value
// heads replicated over tensor-parallel ranks, and the tied embedding of the first and last stage.
void sync_replicated_gradients(Model& model, const Topology& topology);

}  // namespace fastllm
