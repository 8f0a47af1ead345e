#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

// The row loops over the vocabulary, vectorised (FASTLLM_VECTOR_CLONES): the exponentials are most
// of a loss evaluation outside the LM head's GEMM.

// The largest value of the row (a NaN in it may be returned instead).
FASTLLM_VECTOR_CLONES
float row_maximum(const float* row, std::int64_t n) {
  std::int32_t max_bits = std::numeric_limits<std::int32_t>::min();
  for (std::int64_t j = 0; j < n; ++j)
    max_bits = std::max(max_bits, host::ordered_bits(std::bit_cast<std::int32_t>(row[j])));
  return std::bit_cast<float>(host::ordered_bits(max_bits));
}

// sum_j exp(row[j] - shift), accumulated in double.
FASTLLM_VECTOR_CLONES
double row_sum_exp(const float* row, std::int64_t n, float shift) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (std::int64_t j = 0; j < n; ++j)
    sum += static_cast<double>(host::exp_lane(row[j] - shift));
  return sum;
}

// out[j] = exp(row[j] - shift) * scale; out may be row.
FASTLLM_VECTOR_CLONES
void row_scaled_exp(const float* row, std::int64_t n, float shift, float scale, float* out) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j)
    out[j] = host::exp_lane(row[j] - shift) * scale;
}

}  // namespace

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
    const float m = vocab > 0 ? row_maximum(lr, vocab) : -std::numeric_limits<float>::infinity();
    max_out[r] = m;
    sum_out[r] = static_cast<float>(row_sum_exp(lr, vocab, m));
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
    row_scaled_exp(lr, vocab, m, scale, dr);
    const std::int64_t local = static_cast<std::int64_t>(target[r]) - vocab_offset;
    if (local >= 0 && local < vocab) dr[local] -= grad_scale;
  }
}

void HostBackend::cross_entropy_rescale(Tensor row_sumexp, Tensor slice_max, Tensor global_max) {
  const char* op = "cross_entropy_rescale";
  const std::int64_t rows = row_sumexp.numel();
  for (const Tensor* t : {&row_sumexp, &slice_max, &global_max}) {
    host::require_dtype(*t, DType::F32, op, "a statistic");
    host::require_numel(*t, rows, op, "a statistic");
  }
  float* sum = row_sumexp.as<float>();
  const float* slice = slice_max.as<float>();
  const float* global = global_max.as<float>();
  for (std::int64_t r = 0; r < rows; ++r)
    sum[r] = static_cast<float>(sum[r] * std::exp(static_cast<double>(slice[r]) - global[r]));
}

double HostBackend::cross_entropy_loss(Tensor row_max, Tensor row_sumexp, Tensor target_logit,
                                       Tensor targets) {
  const char* op = "cross_entropy_loss";
  const std::int64_t rows = targets.numel();
  host::require_dtype(targets, DType::I32, op, "targets");
  for (const Tensor* t : {&row_max, &row_sumexp, &target_logit}) {
    host::require_dtype(*t, DType::F32, op, "a statistic");
    host::require_numel(*t, rows, op, "a statistic");
  }
  const float* mx = row_max.as<float>();
  const float* se = row_sumexp.as<float>();
  const float* tl = target_logit.as<float>();
  const std::int32_t* target = targets.as<std::int32_t>();
  double sum = 0.0;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (target[r] >= 0) sum += std::log(static_cast<double>(se[r])) + mx[r] - tl[r];
  }
  return sum;
}

}  // namespace fastllm
