#include "train/optimizer.h"

#include <algorithm>
#include <stdexcept>

namespace fastllm {

AdamW::State AdamW::zeros(std::int64_t n) {
  State s;
  s.buffer = backend_.allocate(static_cast<std::size_t>(n) * sizeof(float));
  s.t = s.buffer.tensor(DType::F32, {n});
  backend_.fill(s.t, 0.0f);
  return s;
}

AdamW::AdamW(Backend& backend, Model& model, const AdamWSettings& settings,
             Communicator* data_parallel, bool zero)
    : backend_(backend),
      model_(model),
      settings_(settings),
      data_parallel_(data_parallel && data_parallel->size() > 1 ? data_parallel : nullptr),
      zero_(zero && data_parallel_) {
  const std::int64_t n = model.parameter_count();
  const std::int64_t padded = model.padded_weights().numel();
  if (zero_) {
    const int ranks = data_parallel_->size();
    if (padded % ranks != 0)
      throw std::invalid_argument("AdamW: ZeRO-1 needs the model padded to the data-parallel size");
    shard_size_ = padded / ranks;
    shard_begin_ = std::min(n, data_parallel_->rank() * shard_size_);
    shard_end_ = std::min(n, shard_begin_ + shard_size_);
    grad_shard_ = zeros(shard_size_);
  } else {
    shard_size_ = n;
    shard_end_ = n;
  }
  if (model.flat_weights().dtype == DType::F32) {
    master_ = zero_ ? model.padded_weights().rows(data_parallel_->rank() * shard_size_, shard_size_)
                    : model.flat_weights();
  } else {
    own_master_ = zeros(shard_size_);
    master_ = own_master_.t;
    model_to_master();
  }
  exp_avg_ = zeros(shard_size_);
  exp_avg_sq_ = zeros(shard_size_);
}

Tensor AdamW::shard_grads() const {
  return zero_ ? grad_shard_.t.rows(0, shard_end_ - shard_begin_) : model_.flat_grads();
}

double AdamW::grad_sum_squares() {
  if (data_parallel_ && !zero_ && data_parallel_->rank() != 0) return 0.0;
  // Contiguous runs of counted parameters, summed by one multi-range reduction.
  std::vector<FlatRange> runs;
  for (const Parameter& p : model_.parameters()) {
    const std::int64_t lo = std::max(p.offset, shard_begin_) - shard_begin_;
    const std::int64_t hi = std::min(p.offset + p.numel, shard_end_) - shard_begin_;
    if (!p.primary || lo >= hi) {
      runs.push_back({});
      continue;
    }
    if (runs.empty() || runs.back().count == 0 || runs.back().begin + runs.back().count != lo) {
      runs.push_back({lo, hi - lo});
    } else {
      runs.back().count = hi - runs.back().begin;
    }
  }
  std::erase_if(runs, [](const FlatRange& r) { return r.count == 0; });
  return backend_.sum_squares_ranges(shard_grads(), runs);
}

void AdamW::step(double lr, double grad_scale, bool zero_grads) {
  ++step_;
  // Adjacent parameters with the same weight decay form one range of the fused update.
  std::vector<AdamWRange> ranges;
  for (const Parameter& p : model_.parameters()) {
    const std::int64_t lo = std::max(p.offset, shard_begin_) - shard_begin_;
    const std::int64_t hi = std::min(p.offset + p.numel, shard_end_) - shard_begin_;
    if (lo >= hi) continue;
    const float decay = p.decay ? static_cast<float>(settings_.weight_decay) : 0.0f;
    if (!ranges.empty() && ranges.back().begin + ranges.back().count == lo &&
        ranges.back().weight_decay == decay) {
      ranges.back().count = hi - ranges.back().begin;
    } else {
      ranges.push_back({lo, hi - lo, decay});
    }
  }
  AdamWStepScalars scalars;
  scalars.lr = static_cast<float>(lr);
  scalars.beta1 = static_cast<float>(settings_.beta1);
  scalars.beta2 = static_cast<float>(settings_.beta2);
  scalars.eps = static_cast<float>(settings_.eps);
  scalars.step = step_;
  scalars.grad_scale = static_cast<float>(grad_scale);
  // A bf16 model takes its new weights from the same pass; an F32 model's are the master weights.
  const Tensor weights = own_master_.t.data ? model_shard_weights() : Tensor{};
  backend_.adamw_ranges(master_, shard_grads(), exp_avg_.t, exp_avg_sq_.t, weights, ranges, scalars,
                        zero_grads);
  if (zero_) {
    const Tensor all = model_.padded_weights();
    data_parallel_->all_gather(all.rows(data_parallel_->rank() * shard_size_, shard_size_), all);
  }
}

Tensor AdamW::model_shard_weights() const {
  const std::int64_t offset = zero_ ? data_parallel_->rank() * shard_size_ : 0;
  return model_.padded_weights().rows(offset, shard_size_);
}

void AdamW::master_to_model() {
  if (own_master_.t.data) backend_.copy(model_shard_weights(), master_);
  if (zero_) {
    const Tensor all = model_.padded_weights();
    data_parallel_->all_gather(all.rows(data_parallel_->rank() * shard_size_, shard_size_), all);
  }
}

void AdamW::model_to_master() {
  if (own_master_.t.data) backend_.copy(master_, model_shard_weights());
}

Tensor AdamW::full_shard(OptimizerState which) const {
  switch (which) {
    case OptimizerState::Master:
      return master_;
    case OptimizerState::ExpAvg:
      return exp_avg_.t;
    case OptimizerState::ExpAvgSq:
      return exp_avg_sq_.t;
  }
  throw std::invalid_argument("unknown optimizer state");
}

std::vector<float> AdamW::gather(OptimizerState which) {
  const std::int64_t n = model_.parameter_count();
  std::vector<float> out(static_cast<std::size_t>(n));
  if (!zero_) {
    backend_.copy_to_host(out.data(), shard(full_shard(which)));
    return out;
  }
  const std::int64_t padded = shard_size_ * data_parallel_->size();
  const Buffer all = backend_.allocate(static_cast<std::size_t>(padded) * sizeof(float));
  const Tensor t = all.tensor(DType::F32, {padded});
  data_parallel_->all_gather(full_shard(which), t);
  backend_.copy_to_host(out.data(), t.rows(0, n));
  return out;
}

void AdamW::load(OptimizerState which, const float* values) {
  if (shard_end_ > shard_begin_) backend_.copy_from_host(shard(full_shard(which)), values);
}

}  // namespace fastllm
