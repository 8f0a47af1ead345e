#include <cmath>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

void HostBackend::layernorm_forward(Tensor x, Tensor weight, Tensor bias, float eps, Tensor y,
                                    Tensor mean, Tensor rstd) {
  for (const Tensor* t : {&x, &weight, &bias, &y, &mean, &rstd})
    host::require_dtype(*t, DType::F32, "layernorm_forward", "a tensor");
  const std::int64_t dim = host::row_width(x);
  const std::int64_t rows = host::row_count(x);
  host::require_numel(weight, dim, "layernorm_forward", "weight");
  host::require_numel(bias, dim, "layernorm_forward", "bias");
  host::require_numel(y, rows * dim, "layernorm_forward", "y");
  host::require_numel(mean, rows, "layernorm_forward", "mean");
  host::require_numel(rstd, rows, "layernorm_forward", "rstd");
  const float* in = x.as<float>();
  const float* w = weight.as<float>();
  const float* b = bias.as<float>();
  float* out = y.as<float>();
  float* mu_out = mean.as<float>();
  float* rs_out = rstd.as<float>();
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = in + r * dim;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t j = 0; j < dim; ++j)
      sum += xr[j];
    const double mu = sum / static_cast<double>(dim);
    // Two passes: the variance about the mean does not cancel catastrophically.
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (std::int64_t j = 0; j < dim; ++j)
      squares += (xr[j] - mu) * (xr[j] - mu);
    const auto mu_f = static_cast<float>(mu);
    const auto inv = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(dim) + eps));
    mu_out[r] = mu_f;
    rs_out[r] = inv;
    float* yr = out + r * dim;
#pragma omp simd
    for (std::int64_t j = 0; j < dim; ++j)
      yr[j] = (xr[j] - mu_f) * inv * w[j] + b[j];
  }
}

void HostBackend::layernorm_backward(Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dy,
                                     Tensor dx, Tensor dweight, Tensor dbias) {
  for (const Tensor* t : {&x, &weight, &mean, &rstd, &dy, &dx, &dweight, &dbias})
    host::require_dtype(*t, DType::F32, "layernorm_backward", "a tensor");
  const std::int64_t dim = host::row_width(x);
  const std::int64_t rows = host::row_count(x);
  host::require_numel(weight, dim, "layernorm_backward", "weight");
  host::require_numel(dweight, dim, "layernorm_backward", "dweight");
  host::require_numel(dbias, dim, "layernorm_backward", "dbias");
  host::require_numel(mean, rows, "layernorm_backward", "mean");
  host::require_numel(rstd, rows, "layernorm_backward", "rstd");
  host::require_numel(dy, rows * dim, "layernorm_backward", "dy");
  host::require_numel(dx, rows * dim, "layernorm_backward", "dx");
  const float* in = x.as<float>();
  const float* w = weight.as<float>();
  const float* mu = mean.as<float>();
  const float* rs = rstd.as<float>();
  const float* grad = dy.as<float>();
  float* out = dx.as<float>();
  host::ThreadPartials dw(dim);
  host::ThreadPartials db(dim);
#pragma omp parallel if (rows * dim > (1 << 14))
  {
    float* dw_local = dw.local();
    float* db_local = db.local();
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* xr = in + r * dim;
      const float* gr = grad + r * dim;
      const float m = mu[r];
      const float inv = rs[r];
      double sum_g = 0.0;
      double sum_gx = 0.0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (std::int64_t j = 0; j < dim; ++j) {
        const double g = static_cast<double>(gr[j]) * w[j];
        sum_g += g;
        sum_gx += g * ((xr[j] - m) * inv);
      }
      // dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w.
      const auto mean_g = static_cast<float>(sum_g / static_cast<double>(dim));
      const auto mean_gx = static_cast<float>(sum_gx / static_cast<double>(dim));
      float* dr = out + r * dim;
#pragma omp simd
      for (std::int64_t j = 0; j < dim; ++j) {
        const float gy = gr[j];
        const float xhat = (xr[j] - m) * inv;
        dw_local[j] += gy * xhat;
        db_local[j] += gy;
        dr[j] = inv * (gy * w[j] - mean_g - xhat * mean_gx);
      }
    }
  }
  dw.add_to(dweight.as<float>());
  db.add_to(dbias.as<float>());
}

}  // namespace fastllm
