#include "train/optimizer.h"

namespace fastllm {

AdamW::State AdamW::zeros(std::int64_t n) {
  State s;
  s.buffer = backend_.allocate(static_cast<std::size_t>(n) * sizeof(float));
  s.t = s.buffer.tensor(DType::F32, {n});
  backend_.fill(s.t, 0.0f);
  return s;
}

AdamW::AdamW(Backend& backend, Model& model, const AdamWSettings& settings)
    : backend_(backend), model_(model), settings_(settings) {
  const std::int64_t n = model.parameter_count();
  if (model.flat_weights().dtype == DType::F32) {
    master_ = model.flat_weights();
  } else {
    own_master_ = zeros(n);
    master_ = own_master_.t;
    backend_.copy(master_, model.flat_weights());
  }
  exp_avg_ = zeros(n);
  exp_avg_sq_ = zeros(n);
}

void AdamW::step(double lr, double grad_scale) {
  ++step_;
  const Tensor grads = model_.flat_grads();
  for (const Parameter& p : model_.parameters()) {
    auto slice = [&](Tensor t) { return t.rows(p.offset, p.numel); };
    backend_.adamw(slice(master_), slice(grads), slice(exp_avg_.t), slice(exp_avg_sq_.t),
                   static_cast<float>(lr), static_cast<float>(settings_.beta1),
                   static_cast<float>(settings_.beta2), static_cast<float>(settings_.eps),
                   p.decay ? static_cast<float>(settings_.weight_decay) : 0.0f, step_,
                   static_cast<float>(grad_scale));
  }
  if (own_master_.t.data) master_to_model();
}

void AdamW::master_to_model() {
  if (master_.data != model_.flat_weights().data) backend_.copy(model_.flat_weights(), master_);
}

}  // namespace fastllm
