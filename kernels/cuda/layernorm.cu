// LayerNorm over the last axis: mean and variance about it in double, y = xhat * w + b.
#include "kernels/cuda/column_sums.cuh"
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void layernorm_forward_kernel(const T* x, const T* weight, const T* bias, float eps,
                                         std::int64_t rows, std::int64_t dim, T* y, float* mean,
                                         float* rstd) {
  __shared__ double shared[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    double sum = 0.0;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x)
      sum += to_f32(xr[j]);
    const double mu = block_sum(sum, shared) / static_cast<double>(dim);
    // Two passes: the variance about the mean does not cancel catastrophically.
    double squares = 0.0;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const double d = to_f32(xr[j]) - mu;
      squares += d * d;
    }
    squares = block_sum(squares, shared);
    const auto mu_f = static_cast<float>(mu);
    const auto inv = static_cast<float>(1.0 / sqrt(squares / static_cast<double>(dim) + eps));
    if (threadIdx.x == 0) {
      mean[r] = mu_f;
      rstd[r] = inv;
    }
    T* yr = y + r * dim;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x)
      yr[j] = from_f32<T>((to_f32(xr[j]) - mu_f) * inv * to_f32(weight[j]) + to_f32(bias[j]));
  }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w.
template <class T>
__global__ void layernorm_dx_kernel(const T* x, const T* weight, const float* mean,
                                    const float* rstd, const T* dy, std::int64_t rows,
                                    std::int64_t dim, T* dx) {
  __shared__ double shared[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    const T* gr = dy + r * dim;
    const float m = mean[r];
    const float inv = rstd[r];
    double sum_g = 0.0;
    double sum_gx = 0.0;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const double g = static_cast<double>(to_f32(gr[j])) * to_f32(weight[j]);
      sum_g += g;
      sum_gx += g * ((to_f32(xr[j]) - m) * inv);
    }
    sum_g = block_sum(sum_g, shared);
    sum_gx = block_sum(sum_gx, shared);
    const auto mean_g = static_cast<float>(sum_g / static_cast<double>(dim));
    const auto mean_gx = static_cast<float>(sum_gx / static_cast<double>(dim));
    T* dr = dx + r * dim;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const float xhat = (to_f32(xr[j]) - m) * inv;
      dr[j] = from_f32<T>(inv * (to_f32(gr[j]) * to_f32(weight[j]) - mean_g - xhat * mean_gx));
    }
  }
}

template <class T>
struct LnWeightTerm {
  const T* x;
  const T* dy;
  const float* mean;
  const float* rstd;
  std::int64_t dim;
  __device__ float operator()(std::int64_t r, std::int64_t j) const {
    return to_f32(dy[r * dim + j]) * ((to_f32(x[r * dim + j]) - mean[r]) * rstd[r]);
  }
};

template <class T>
struct LnBiasTerm {
  const T* dy;
  std::int64_t dim;
  __device__ float operator()(std::int64_t r, std::int64_t j) const {
    return to_f32(dy[r * dim + j]);
  }
};

unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(rows, 1, 65535));
}

}  // namespace

void CudaBackend::layernorm_forward(Tensor x, Tensor weight, Tensor bias, float eps, Tensor y,
                                    Tensor mean, Tensor rstd) {
  const char* op = "layernorm_forward";
  require_float(x, op, "x");
  require_dtype(weight, x.dtype, op, "weight");
  require_dtype(bias, x.dtype, op, "bias");
  require_dtype(y, x.dtype, op, "y");
  require_dtype(mean, DType::F32, op, "mean");
  require_dtype(rstd, DType::F32, op, "rstd");
  const std::int64_t dim = row_width(x);
  const std::int64_t rows = row_count(x);
  require_numel(weight, dim, op, "weight");
  require_numel(bias, dim, op, "bias");
  require_numel(y, rows * dim, op, "y");
  require_numel(mean, rows, op, "mean");
  require_numel(rstd, rows, op, "rstd");
  if (rows * dim == 0) return;
  dispatch_float(x.dtype, op, [&]<class T>() {
    layernorm_forward_kernel<T><<<row_blocks(rows), kThreads, 0, stream()>>>(
        x.as<T>(), weight.as<T>(), bias.as<T>(), eps, rows, dim, y.as<T>(), mean.as<float>(),
        rstd.as<float>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::layernorm_backward(Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dy,
                                     Tensor dx, Tensor dweight, Tensor dbias) {
  const char* op = "layernorm_backward";
  require_float(x, op, "x");
  require_dtype(weight, x.dtype, op, "weight");
  require_dtype(dy, x.dtype, op, "dy");
  require_dtype(dx, x.dtype, op, "dx");
  for (const Tensor* t : {&mean, &rstd, &dweight, &dbias})
    require_dtype(*t, DType::F32, op, "a statistic or gradient");
  const std::int64_t dim = row_width(x);
  const std::int64_t rows = row_count(x);
  require_numel(weight, dim, op, "weight");
  require_numel(dweight, dim, op, "dweight");
  require_numel(dbias, dim, op, "dbias");
  require_numel(mean, rows, op, "mean");
  require_numel(rstd, rows, op, "rstd");
  require_numel(dy, rows * dim, op, "dy");
  require_numel(dx, rows * dim, op, "dx");
  if (rows * dim == 0) return;
  dispatch_float(x.dtype, op, [&]<class T>() {
    // The parameter gradients first: dx may overwrite dy.
    column_sums(*this,
                LnWeightTerm<T>{x.as<T>(), dy.as<T>(), mean.as<float>(), rstd.as<float>(), dim},
                rows, dim, dweight.as<float>());
    column_sums(*this, LnBiasTerm<T>{dy.as<T>(), dim}, rows, dim, dbias.as<float>());
    layernorm_dx_kernel<T><<<row_blocks(rows), kThreads, 0, stream()>>>(
        x.as<T>(), weight.as<T>(), mean.as<float>(), rstd.as<float>(), dy.as<T>(), rows, dim,
        dx.as<T>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
