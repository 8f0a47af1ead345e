// RMSNorm over the last axis, as transformers computes it: the fp32 mean of squares plus eps, its
// reciprocal square root, x * rstd rounded to the input dtype, then times the weight.
#include "kernels/cuda/column_sums.cuh"
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* weight, float eps, std::int64_t rows,
                                       std::int64_t dim, T* y, float* rstd) {
  __shared__ double shared[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    double squares = 0.0;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const double v = to_f32(xr[j]);
      squares += v * v;
    }
    squares = block_sum(squares, shared);
    const float variance = static_cast<float>(squares / static_cast<double>(dim));
    const float inv = 1.0f / sqrtf(variance + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    T* yr = y + r * dim;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x)
      yr[j] = from_f32<T>(to_f32(weight[j]) * round_to<T>(to_f32(xr[j]) * inv));
  }
}

// d/dx_i of w_i x_i rstd: rstd w_i dy_i - x_i rstd^3 sum_j(dy_j w_j x_j) / dim.
template <class T>
__global__ void rmsnorm_dx_kernel(const T* x, const T* weight, const float* rstd, const T* dy,
                                  std::int64_t rows, std::int64_t dim, T* dx) {
  __shared__ double shared[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    const T* gr = dy + r * dim;
    double dot = 0.0;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x)
      dot += static_cast<double>(to_f32(gr[j])) * to_f32(weight[j]) * to_f32(xr[j]);
    dot = block_sum(dot, shared);
    const double inv = rstd[r];
    const auto inv_f = static_cast<float>(inv);
    const auto coef = static_cast<float>(inv * inv * inv * dot / static_cast<double>(dim));
    T* dr = dx + r * dim;
    // dx may be dy itself: each element is read before it is written, by the same thread.
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x)
      dr[j] = from_f32<T>(inv_f * to_f32(weight[j]) * to_f32(gr[j]) - coef * to_f32(xr[j]));
  }
}

template <class T>
struct RmsWeightTerm {
  const T* x;
  const T* dy;
  const float* rstd;
  std::int64_t dim;
  __device__ float operator()(std::int64_t r, std::int64_t j) const {
    return to_f32(dy[r * dim + j]) * to_f32(x[r * dim + j]) * rstd[r];
  }
};

unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(rows, 1, 65535));
}

}  // namespace

void CudaBackend::rmsnorm_forward(Tensor x, Tensor weight, float eps, Tensor y, Tensor rstd) {
  const char* op = "rmsnorm_forward";
  require_float(x, op, "x");
  require_dtype(weight, x.dtype, op, "weight");
  require_dtype(y, x.dtype, op, "y");
  require_dtype(rstd, DType::F32, op, "rstd");
  const std::int64_t dim = row_width(x);
  const std::int64_t rows = row_count(x);
  require_numel(weight, dim, op, "weight");
  require_numel(y, rows * dim, op, "y");
  require_numel(rstd, rows, op, "rstd");
  if (rows * dim == 0) return;
  dispatch_float(x.dtype, op, [&]<class T>() {
    rmsnorm_forward_kernel<T><<<row_blocks(rows), kThreads, 0, stream()>>>(
        x.as<T>(), weight.as<T>(), eps, rows, dim, y.as<T>(), rstd.as<float>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::rmsnorm_backward(Tensor x, Tensor weight, Tensor rstd, Tensor dy, Tensor dx,
                                   Tensor dweight) {
  const char* op = "rmsnorm_backward";
  require_float(x, op, "x");
  require_dtype(weight, x.dtype, op, "weight");
  require_dtype(dy, x.dtype, op, "dy");
  require_dtype(dx, x.dtype, op, "dx");
  require_dtype(rstd, DType::F32, op, "rstd");
  require_dtype(dweight, DType::F32, op, "dweight");
  const std::int64_t dim = row_width(x);
  const std::int64_t rows = row_count(x);
  require_numel(weight, dim, op, "weight");
  require_numel(dweight, dim, op, "dweight");
  require_numel(rstd, rows, op, "rstd");
  require_numel(dy, rows * dim, op, "dy");
  require_numel(dx, rows * dim, op, "dx");
  if (rows * dim == 0) return;
  dispatch_float(x.dtype, op, [&]<class T>() {
    // The weight gradient first: dx may overwrite dy.
    column_sums(*this, RmsWeightTerm<T>{x.as<T>(), dy.as<T>(), rstd.as<float>(), dim}, rows, dim,
                dweight.as<float>());
    rmsnorm_dx_kernel<T><<<row_blocks(rows), kThreads, 0, stream()>>>(
        x.as<T>(), weight.as<T>(), rstd.as<float>(), dy.as<T>(), rows, dim, dx.as<T>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
