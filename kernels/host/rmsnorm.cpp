#include <cmath>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

void HostBackend::rmsnorm_forward(Tensor x, Tensor weight, float eps, Tensor y, Tensor rstd) {
  for (const Tensor* t : {&x, &weight, &y, &rstd})
    host::require_dtype(*t, DType::F32, "rmsnorm_forward", "a tensor");
  const std::int64_t dim = host::row_width(x);
  const std::int64_t rows = host::row_count(x);
  host::require_numel(weight, dim, "rmsnorm_forward", "weight");
  host::require_numel(y, rows * dim, "rmsnorm_forward", "y");
  host::require_numel(rstd, rows, "rmsnorm_forward", "rstd");
  const float* in = x.as<float>();
  const float* w = weight.as<float>();
  float* out = y.as<float>();
  float* rs = rstd.as<float>();
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = in + r * dim;
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (std::int64_t j = 0; j < dim; ++j)
      squares += static_cast<double>(xr[j]) * xr[j];
    // As transformers: the fp32 variance plus eps, then its reciprocal square root, then
    // weight * (x * rstd).
    const float variance = static_cast<float>(squares / static_cast<double>(dim));
    const float inv = 1.0f / std::sqrt(variance + eps);
    rs[r] = inv;
    float* yr = out + r * dim;
#pragma omp simd
    for (std::int64_t j = 0; j < dim; ++j)
      yr[j] = w[j] * (xr[j] * inv);
  }
}

void HostBackend::rmsnorm_backward(Tensor x, Tensor weight, Tensor rstd, Tensor dy, Tensor dx,
                                   Tensor dweight) {
  for (const Tensor* t : {&x, &weight, &rstd, &dy, &dx, &dweight})
    host::require_dtype(*t, DType::F32, "rmsnorm_backward", "a tensor");
  const std::int64_t dim = host::row_width(x);
  const std::int64_t rows = host::row_count(x);
  host::require_numel(weight, dim, "rmsnorm_backward", "weight");
  host::require_numel(dweight, dim, "rmsnorm_backward", "dweight");
  host::require_numel(rstd, rows, "rmsnorm_backward", "rstd");
  host::require_numel(dy, rows * dim, "rmsnorm_backward", "dy");
  host::require_numel(dx, rows * dim, "rmsnorm_backward", "dx");
  const float* in = x.as<float>();
  const float* w = weight.as<float>();
  const float* rs = rstd.as<float>();
  const float* grad = dy.as<float>();
  float* out = dx.as<float>();
  host::ThreadPartials dw(dim);
#pragma omp parallel if (rows * dim > (1 << 14))
  {
    float* dw_local = dw.local();
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* xr = in + r * dim;
      const float* gr = grad + r * dim;
      const double inv = rs[r];
      double dot = 0.0;
#pragma omp simd reduction(+ : dot)
      for (std::int64_t j = 0; j < dim; ++j)
        dot += static_cast<double>(gr[j]) * w[j] * xr[j];
      // d/dx_i of w_i x_i rstd: rstd w_i dy_i - x_i rstd^3 sum_j(dy_j w_j x_j) / dim.
      const auto inv_f = static_cast<float>(inv);
      const auto coef = static_cast<float>(inv * inv * inv * dot / static_cast<double>(dim));
      float* dr = out + r * dim;
#pragma omp simd
      for (std::int64_t j = 0; j < dim; ++j) {
        const float g = gr[j];
        const float xv = xr[j];
        dw_local[j] += g * xv * inv_f;
        dr[j] = inv_f * w[j] * g - coef * xv;
      }
    }
  }
  dw.add_to(dweight.as<float>());
}

}  // namespace fastllm
