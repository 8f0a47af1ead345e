#pragma once
// The cross-entropy of logits split by vocabulary over the tensor-parallel group (Megatron's
// vocab-parallel cross-entropy, docs/DESIGN.md section 5): each rank holds the logits of its
// vocabulary rows, the softmax statistics are combined over the group on the device, and only the
// loss sum comes back to the host.
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/communicator.h"
#include "model/model.h"

namespace fastllm {

// What backward needs of one micro-batch's loss: the targets and the global softmax statistics.
struct CrossEntropyState {
  DeviceArray targets, row_max, row_sumexp;
};

class VocabParallelCrossEntropy {
 public:
  // tensor: the tensor-parallel group (null on one rank); vocab: this rank's rows.
  VocabParallelCrossEntropy(Backend& backend, Communicator* tensor, VocabSlice vocab)
      : backend_(backend), tensor_(tensor), vocab_(vocab) {}

  // Sum of the cross-entropy over the predicted tokens (targets >= 0) of logits [tokens, rows].
  double forward(Tensor logits, const std::vector<std::int32_t>& targets, CrossEntropyState& state);
  // Writes the gradient of grad_scale * (that sum) over the logits.
  void backward(Tensor logits, const CrossEntropyState& state, float grad_scale);

 private:
  Backend& backend_;
  Communicator* tensor_;
  VocabSlice vocab_;
};

}  // namespace fastllm
