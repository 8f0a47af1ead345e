#include <cmath>
#include <limits>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

void HostBackend::cross_entropy_stats(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                                      Tensor row_max, Tensor row_sumexp, Tensor target_logit) {
  const char* op = "cross_entropy_stats";
  host::require_dtype(logits, DType::F32, op, "logits");
  host::require_dtype(targets, DType::I32, op, "targets");
  const std::int64_t vocab = host::row_width(logits);
  const std::int64_t rows = host::row_count(logits);
  host::require_numel(targets, rows, op, "targets");
  for (const Tensor* t : {&row_max, &row_sumexp, &target_logit}) {
    host::require_dtype(*t, DType::F32, op, "a statistic");
    host::require_numel(*t, rows, op, "a statistic");
  }
  const float* in = logits.as<float>();
  const std::int32_t* target = targets.as<std::int32_t>();
  float* max_out = row_max.as<float>();
  float* sum_out = row_sumexp.as<float>();
  float* target_out = target_logit.as<float>();
#pragma omp parallel for schedule(static) if (rows * vocab > (1 << 14))
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* lr = in + r * vocab;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (std::int64_t j = 0; j < vocab; ++j)
      m = lr[j] > m ? lr[j] : m;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t j = 0; j < vocab; ++j)
      sum += std::exp(lr[j] - m);
    max_out[r] = m;
    sum_out[r] = static_cast<float>(sum);
    const std::int64_t local = static_cast<std::int64_t>(target[r]) - vocab_offset;
    target_out[r] = target[r] >= 0 && local >= 0 && local < vocab ? lr[local] : 0.0f;
  }
}

void HostBackend::cross_entropy_backward(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                                         Tensor row_max, Tensor row_sumexp, float grad_scale,
                                         Tensor dlogits) {
  const char* op = "cross_entropy_backward";
  host::require_dtype(logits, DType::F32, op, "logits");
  host::require_dtype(dlogits, DType::F32, op, "dlogits");
  host::require_dtype(targets, DType::I32, op, "targets");
  const std::int64_t vocab = host::row_width(logits);
  const std::int64_t rows = host::row_count(logits);
  host::require_numel(dlogits, rows * vocab, op, "dlogits");
  host::require_numel(targets, rows, op, "targets");
  for (const Tensor* t : {&row_max, &row_sumexp}) {
    host::require_dtype(*t, DType::F32, op, "a statistic");
    host::require_numel(*t, rows, op, "a statistic");
  }
  const float* in = logits.as<float>();
  const std::int32_t* target = targets.as<std::int32_t>();
  const float* max_in = row_max.as<float>();
  const float* sum_in = row_sumexp.as<float>();
  float* out = dlogits.as<float>();
  // Element-wise in place per row, so out may be the logits themselves.
#pragma omp parallel for schedule(static) if (rows * vocab > (1 << 14))
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* lr = in + r * vocab;
    float* dr = out + r * vocab;
    if (target[r] < 0) {
      for (std::int64_t j = 0; j < vocab; ++j)
        dr[j] = 0.0f;
      continue;
    }
    const float m = max_in[r];
    const float scale = grad_scale / sum_in[r];
    for (std::int64_t j = 0; j < vocab; ++j)
      dr[j] = std::exp(lr[j] - m) * scale;
    const std::int64_t local = static_cast<std::int64_t>(target[r]) - vocab_offset;
    if (local >= 0 && local < vocab) dr[local] -= grad_scale;
  }
}

}  // namespace fastllm
