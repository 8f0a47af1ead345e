#include <algorithm>
#include <cmath>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

// The update's scalars, formed once per call.
struct AdamWStep {
  float decay, avg_weight, avg_keep, beta2, sq_weight, correction2_sqrt, eps, neg_step_size,
      grad_scale;
  bool lerp_from_start;
};

// One thread's range of the update. Vectorised (FASTLLM_VECTOR_CLONES): the square root and the
// division of every element make it compute-bound at baseline SSE2 width, not memory-bound.
FASTLLM_VECTOR_CLONES
void adamw_range(const AdamWStep& s, float* p, const float* g, float* m, float* v, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * s.grad_scale;
    const float pi = p[i] * s.decay;
    // torch's lerp(m, g, w) picks its formula by w.
    const float mi =
        s.lerp_from_start ? m[i] + s.avg_weight * (gi - m[i]) : gi - (gi - m[i]) * s.avg_keep;
    const float vi = v[i] * s.beta2 + s.sq_weight * gi * gi;
    const float denom = std::sqrt(vi) / s.correction2_sqrt + s.eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + s.neg_step_size * mi / denom;
  }
}

// The scalars are formed in double and rounded to float once, and each update follows the
// operation order of torch's single-tensor AdamW, so that trajectories agree to rounding.
AdamWStep make_step(float lr, float beta1, float beta2, float eps, float weight_decay,
                    std::int64_t step, float grad_scale) {
  const double lr_d = lr;
  AdamWStep st{};
  st.decay = static_cast<float>(1.0 - lr_d * weight_decay);
  st.avg_weight = static_cast<float>(1.0 - static_cast<double>(beta1));
  st.avg_keep = 1.0f - st.avg_weight;
  st.lerp_from_start = st.avg_weight < 0.5f;
  st.beta2 = beta2;
  st.sq_weight = static_cast<float>(1.0 - static_cast<double>(beta2));
  const double correction1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double correction2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  st.neg_step_size = static_cast<float>(-(lr_d / correction1));
  st.correction2_sqrt = static_cast<float>(std::sqrt(correction2));
  st.eps = eps;
  st.grad_scale = grad_scale;
  return st;
}

void update(const AdamWStep& st, float* p, const float* g, float* m, float* v, std::int64_t n) {
#pragma omp parallel if (n > (1 << 15))
  {
    const std::int64_t threads = omp_get_num_threads();
    const std::int64_t thread = omp_get_thread_num();
    const std::int64_t begin = n * thread / threads;
    const std::int64_t end = n * (thread + 1) / threads;
    if (end > begin) adamw_range(st, p + begin, g + begin, m + begin, v + begin, end - begin);
  }
}

}  // namespace

void HostBackend::adamw_ranges(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq,
                               Tensor weights, const std::vector<AdamWRange>& ranges,
                               const AdamWStepScalars& s, bool zero_grad) {
  const char* op = "adamw_ranges";
  const std::int64_t n = param.numel();
  for (const Tensor* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    host::require_dtype(*t, DType::F32, op, "a tensor");
    host::require_numel(*t, n, op, "a tensor");
  }
  const bool write_weights = weights.data != nullptr;
  if (write_weights) {
    host::require_dtype(weights, DType::F32, op, "weights");
    host::require_numel(weights, n, op, "weights");
  }
  host::require(s.step >= 1, op, "step counts from 1");
  for (const AdamWRange& r : ranges)
    host::require(r.begin >= 0 && r.count >= 0 && r.begin + r.count <= n, op,
                  "a range outside the buffers");
  float* p = param.as<float>();
  float* g = grad.as<float>();
  float* m = exp_avg.as<float>();
  float* v = exp_avg_sq.as<float>();
  for (const AdamWRange& r : ranges) {
    const std::int64_t b = r.begin;
    update(make_step(s.lr, s.beta1, s.beta2, s.eps, r.weight_decay, s.step, s.grad_scale), p + b,
           g + b, m + b, v + b, r.count);
    if (write_weights && weights.data != param.data)
      std::copy(p + b, p + b + r.count, weights.as<float>() + b);
    if (zero_grad) std::fill(g + b, g + b + r.count, 0.0f);
  }
}

}  // namespace fastllm
