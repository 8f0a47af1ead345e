// PyTorch's AdamW on f32 master weights, one pass over a parameter (or a flat run of them).
#include <cmath>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

struct AdamScalars {
  float decay, avg_weight, avg_keep, sq_weight, beta2, neg_step_size, correction2_sqrt, eps,
      grad_scale;
  bool lerp_from_start;
};

// The operation order of torch's single-tensor AdamW, as in the host backend.
template <class G>
__global__ void adamw_kernel(float* p, const G* g, float* m, float* v, AdamScalars s,
                             std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float gi = to_f32(g[i]) * s.grad_scale;
    const float pi = p[i] * s.decay;
    const float mo = m[i];
    // torch's lerp(m, g, w) picks its formula by w.
    const float mi =
        s.lerp_from_start ? mo + s.avg_weight * (gi - mo) : gi - (gi - mo) * s.avg_keep;
    const float vi = v[i] * s.beta2 + s.sq_weight * gi * gi;
    const float denom = sqrtf(vi) / s.correction2_sqrt + s.eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + s.neg_step_size * mi / denom;
  }
}

}  // namespace

void CudaBackend::adamw(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq, float lr,
                        float beta1, float beta2, float eps, float weight_decay, std::int64_t step,
                        float grad_scale) {
  const char* op = "adamw";
  const std::int64_t n = param.numel();
  for (const Tensor* t : {&param, &exp_avg, &exp_avg_sq}) {
    require_dtype(*t, DType::F32, op, "a tensor");
    require_numel(*t, n, op, "a tensor");
  }
  require_float(grad, op, "grad");
  require_numel(grad, n, op, "grad");
  require(step >= 1, op, "step counts from 1");
  if (n == 0) return;
  const double lr_d = lr;
  AdamScalars s{};
  s.decay = static_cast<float>(1.0 - lr_d * weight_decay);
  s.avg_weight = static_cast<float>(1.0 - static_cast<double>(beta1));
  s.avg_keep = 1.0f - s.avg_weight;
  s.lerp_from_start = s.avg_weight < 0.5f;
  s.sq_weight = static_cast<float>(1.0 - static_cast<double>(beta2));
  s.beta2 = beta2;
  const double correction1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double correction2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  s.neg_step_size = static_cast<float>(-(lr_d / correction1));
  s.correction2_sqrt = static_cast<float>(std::sqrt(correction2));
  s.eps = eps;
  s.grad_scale = grad_scale;
  dispatch_float(grad.dtype, op, [&]<class G>() {
    adamw_kernel<G><<<grid_for(n, 256), 256, 0, stream()>>>(
        param.as<float>(), grad.as<G>(), exp_avg.as<float>(), exp_avg_sq.as<float>(), s, n);
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
