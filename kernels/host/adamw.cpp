#include <cmath>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

void HostBackend::adamw(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq, float lr,
                        float beta1, float beta2, float eps, float weight_decay, std::int64_t step,
                        float grad_scale) {
  const char* op = "adamw";
  const std::int64_t n = param.numel();
  for (const Tensor* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    host::require_dtype(*t, DType::F32, op, "a tensor");
    host::require_numel(*t, n, op, "a tensor");
  }
  host::require(step >= 1, op, "step counts from 1");
  // The scalars are formed in double and rounded to float once, and each update follows the
  // operation order of torch's single-tensor AdamW, so that trajectories agree to rounding.
  const double lr_d = lr;
  const auto decay = static_cast<float>(1.0 - lr_d * weight_decay);
  const auto avg_weight = static_cast<float>(1.0 - static_cast<double>(beta1));
  const float avg_keep = 1.0f - avg_weight;
  const bool lerp_from_start = avg_weight < 0.5f;
  const auto sq_weight = static_cast<float>(1.0 - static_cast<double>(beta2));
  const double correction1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double correction2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  const auto neg_step_size = static_cast<float>(-(lr_d / correction1));
  const auto correction2_sqrt = static_cast<float>(std::sqrt(correction2));
  float* p = param.as<float>();
  const float* g = grad.as<float>();
  float* m = exp_avg.as<float>();
  float* v = exp_avg_sq.as<float>();
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (std::int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * grad_scale;
    const float pi = p[i] * decay;
    // torch's lerp(m, g, w) picks its formula by w.
    const float mi =
        lerp_from_start ? m[i] + avg_weight * (gi - m[i]) : gi - (gi - m[i]) * avg_keep;
    const float vi = v[i] * beta2 + sq_weight * gi * gi;
    const float denom = std::sqrt(vi) / correction2_sqrt + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step_size * mi / denom;
  }
}

}  // namespace fastllm
