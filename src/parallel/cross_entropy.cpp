#include "parallel/cross_entropy.h"

namespace fastllm {

double VocabParallelCrossEntropy::forward(Tensor logits, const std::vector<std::int32_t>& targets,
                                          CrossEntropyState& state) {
  const auto tokens = static_cast<std::int64_t>(targets.size());
  state.targets = device_array(backend_, DType::I32, {tokens});
  backend_.copy_from_host(state.targets.t, targets.data());
  state.row_max = device_array(backend_, DType::F32, {tokens});
  state.row_sumexp = device_array(backend_, DType::F32, {tokens});
  DeviceArray target_logit = device_array(backend_, DType::F32, {tokens});
  backend_.cross_entropy_stats(logits, state.targets.t, vocab_.begin, state.row_max.t,
                               state.row_sumexp.t, target_logit.t);
  if (tensor_ && tensor_->size() > 1) {
    // The global maximum, each slice's sum rescaled to it and summed, and the target's logit from
    // the one rank whose slice holds it.
    DeviceArray global_max = device_array(backend_, DType::F32, {tokens});
    backend_.copy(global_max.t, state.row_max.t);
    tensor_->all_reduce(global_max.t, ReduceOp::Max);
    backend_.cross_entropy_rescale(state.row_sumexp.t, state.row_max.t, global_max.t);
    tensor_->all_reduce(state.row_sumexp.t, ReduceOp::Sum);
    tensor_->all_reduce(target_logit.t, ReduceOp::Sum);
    state.row_max = std::move(global_max);
  }
  return backend_.cross_entropy_loss(state.row_max.t, state.row_sumexp.t, target_logit.t,
                                     state.targets.t);
}

void VocabParallelCrossEntropy::backward(Tensor logits, const CrossEntropyState& state,
                                         float grad_scale) {
  backend_.cross_entropy_backward(logits, state.targets.t, vocab_.begin, state.row_max.t,
                                  state.row_sumexp.t, grad_scale, logits);
}

}  // namespace fastllm
