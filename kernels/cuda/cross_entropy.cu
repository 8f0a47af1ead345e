// Cross-entropy over a (possibly vocab-parallel) slice of logits [rows, V_local], straight from
// the logits in their own dtype: no f32 copy of the [rows, V] matrix is made.
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 512;

template <class T>
__global__ void cross_entropy_stats_kernel(const T* logits, const std::int32_t* targets,
                                           std::int64_t rows, std::int64_t vocab,
                                           std::int64_t vocab_offset, float* row_max,
                                           float* row_sumexp, float* target_logit) {
  __shared__ float shared_max[32];
  __shared__ double shared_sum[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * vocab;
    float m = -INFINITY;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      m = fmaxf(m, to_f32(lr[j]));
    m = block_max(m, shared_max);
    double sum = 0.0;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      sum += expf(to_f32(lr[j]) - m);
    sum = block_sum(sum, shared_sum);
    if (threadIdx.x == 0) {
      row_max[r] = m;
      row_sumexp[r] = static_cast<float>(sum);
      const std::int64_t local = static_cast<std::int64_t>(targets[r]) - vocab_offset;
      target_logit[r] = targets[r] >= 0 && local >= 0 && local < vocab ? to_f32(lr[local]) : 0.0f;
    }
  }
}

// Element-wise per row, so dlogits may be the logits themselves.
template <class TL, class TD>
__global__ void cross_entropy_backward_kernel(const TL* logits, const std::int32_t* targets,
                                              std::int64_t rows, std::int64_t vocab,
                                              std::int64_t vocab_offset, const float* row_max,
                                              const float* row_sumexp, float grad_scale,
                                              TD* dlogits) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TL* lr = logits + r * vocab;
    TD* dr = dlogits + r * vocab;
    const std::int32_t target = targets[r];
    if (target < 0) {
      for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
        dr[j] = from_f32<TD>(0.0f);
      continue;
    }
    const float m = row_max[r];
    const float scale = grad_scale / row_sumexp[r];
    const std::int64_t local = static_cast<std::int64_t>(target) - vocab_offset;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      float v = expf(to_f32(lr[j]) - m) * scale;
      if (j == local) v -= grad_scale;
      dr[j] = from_f32<TD>(v);
    }
  }
}

__global__ void cross_entropy_rescale_kernel(float* row_sumexp, const float* slice_max,
                                             const float* global_max, std::int64_t rows) {
  const std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (r < rows)
    row_sumexp[r] = static_cast<float>(row_sumexp[r] * exp(static_cast<double>(slice_max[r]) -
                                                           static_cast<double>(global_max[r])));
}

// One block: the rows of a micro-batch are few next to its vocabulary.
__global__ void cross_entropy_loss_kernel(const float* row_max, const float* row_sumexp,
                                          const float* target_logit, const std::int32_t* targets,
                                          std::int64_t rows, double* out) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (std::int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    if (targets[r] >= 0)
      acc += log(static_cast<double>(row_sumexp[r])) + row_max[r] - target_logit[r];
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = acc;
}

unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(rows, 1, 65535));
}

}  // namespace

void CudaBackend::cross_entropy_stats(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                                      Tensor row_max, Tensor row_sumexp, Tensor target_logit) {
  const char* op = "cross_entropy_stats";
  require_float(logits, op, "logits");
  require_dtype(targets, DType::I32, op, "targets");
  const std::int64_t vocab = row_width(logits);
  const std::int64_t rows = row_count(logits);
  require_numel(targets, rows, op, "targets");
  for (const Tensor* t : {&row_max, &row_sumexp, &target_logit}) {
    require_dtype(*t, DType::F32, op, "a statistic");
    require_numel(*t, rows, op, "a statistic");
  }
  if (rows == 0) return;
  dispatch_float(logits.dtype, op, [&]<class T>() {
    cross_entropy_stats_kernel<T><<<row_blocks(rows), kThreads, 0, stream()>>>(
        logits.as<T>(), targets.as<std::int32_t>(), rows, vocab, vocab_offset, row_max.as<float>(),
        row_sumexp.as<float>(), target_logit.as<float>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::cross_entropy_backward(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                                         Tensor row_max, Tensor row_sumexp, float grad_scale,
                                         Tensor dlogits) {
  const char* op = "cross_entropy_backward";
  require_float(logits, op, "logits");
  require_float(dlogits, op, "dlogits");
  require_dtype(targets, DType::I32, op, "targets");
  const std::int64_t vocab = row_width(logits);
  const std::int64_t rows = row_count(logits);
  require_numel(dlogits, rows * vocab, op, "dlogits");
  require_numel(targets, rows, op, "targets");
  for (const Tensor* t : {&row_max, &row_sumexp}) {
    require_dtype(*t, DType::F32, op, "a statistic");
    require_numel(*t, rows, op, "a statistic");
  }
  if (rows == 0) return;
  dispatch_float(logits.dtype, op, [&]<class TL>() {
    dispatch_float(dlogits.dtype, op, [&]<class TD>() {
      cross_entropy_backward_kernel<TL, TD><<<row_blocks(rows), kThreads, 0, stream()>>>(
          logits.as<TL>(), targets.as<std::int32_t>(), rows, vocab, vocab_offset,
          row_max.as<float>(), row_sumexp.as<float>(), grad_scale, dlogits.as<TD>());
      FASTLLM_CUDA_LAUNCHED();
    });
  });
}

void CudaBackend::cross_entropy_rescale(Tensor row_sumexp, Tensor slice_max, Tensor global_max) {
  const char* op = "cross_entropy_rescale";
  const std::int64_t rows = row_sumexp.numel();
  for (const Tensor* t : {&row_sumexp, &slice_max, &global_max}) {
    require_dtype(*t, DType::F32, op, "a statistic");
    require_numel(*t, rows, op, "a statistic");
  }
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>((rows + kThreads - 1) / kThreads);
  cross_entropy_rescale_kernel<<<blocks, kThreads, 0, stream()>>>(
      row_sumexp.as<float>(), slice_max.as<float>(), global_max.as<float>(), rows);
  FASTLLM_CUDA_LAUNCHED();
}

double CudaBackend::cross_entropy_loss(Tensor row_max, Tensor row_sumexp, Tensor target_logit,
                                       Tensor targets) {
  const char* op = "cross_entropy_loss";
  const std::int64_t rows = targets.numel();
  require_dtype(targets, DType::I32, op, "targets");
  for (const Tensor* t : {&row_max, &row_sumexp, &target_logit}) {
    require_dtype(*t, DType::F32, op, "a statistic");
    require_numel(*t, rows, op, "a statistic");
  }
  if (rows == 0) return 0.0;
  Buffer result = scratch(sizeof(double));
  auto* out = static_cast<double*>(result.data());
  cross_entropy_loss_kernel<<<1, kThreads, 0, stream()>>>(
      row_max.as<float>(), row_sumexp.as<float>(), target_logit.as<float>(),
      targets.as<std::int32_t>(), rows, out);
  FASTLLM_CUDA_LAUNCHED();
  double total = 0.0;
  FASTLLM_CUDA_CHECK(cudaMemcpyAsync(&total, out, sizeof total, cudaMemcpyDeviceToHost, stream()));
  FASTLLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  return total;
}

}  // namespace fastllm::cuda
