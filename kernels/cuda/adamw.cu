// PyTorch's AdamW on f32 master weights: the fused pass over many runs that also writes the
// compute-dtype weights and clears the gradients.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/flat_ranges.h"

namespace fastllm::cuda {
namespace {

struct AdamScalars {
  float avg_weight, avg_keep, sq_weight, beta2, neg_step_size, correction2_sqrt, eps, grad_scale;
  bool lerp_from_start;
};

// One element's update, in the operation order of torch's single-tensor AdamW, as in the host
// backend; decay = 1 - lr * weight_decay.
__device__ __forceinline__ float adamw_element(const AdamScalars& s, float decay, float gi,
                                               float& p, float& m, float& v) {
  gi *= s.grad_scale;
  const float pi = p * decay;
  const float mo = m;
  // torch's lerp(m, g, w) picks its formula by w.
  const float mi = s.lerp_from_start ? mo + s.avg_weight * (gi - mo) : gi - (gi - mo) * s.avg_keep;
  const float vi = v * s.beta2 + s.sq_weight * gi * gi;
  const float denom = sqrtf(vi) / s.correction2_sqrt + s.eps;
  m = mi;
  v = vi;
  p = pi + s.neg_step_size * mi / denom;
  return p;
}

// Each block sweeps its span of the runs' concatenation; W is the weights' dtype (void: none).
template <class G, class W>
__global__ void adamw_runs_kernel(const RangeRun* runs, int run_count, std::int64_t span,
                                  std::int64_t total, float* p, G* g, float* m, float* v,
                                  W* weights, bool zero_grad, AdamScalars s) {
  const std::int64_t lo = blockIdx.x * span;
  const std::int64_t hi = lo + span < total ? lo + span : total;
  walk_span(runs, run_count, lo, hi, threadIdx.x, blockDim.x,
            [&](const RangeRun& r, std::int64_t i) {
              const float updated = adamw_element(s, r.decay, to_f32(g[i]), p[i], m[i], v[i]);
              if constexpr (!std::is_void_v<W>) weights[i] = from_f32<W>(updated);
              if (zero_grad) g[i] = from_f32<G>(0.0f);
            });
}

AdamScalars scalars_for(const AdamWStepScalars& in) {
  const double lr = in.lr;
  AdamScalars s{};
  s.avg_weight = static_cast<float>(1.0 - static_cast<double>(in.beta1));
  s.avg_keep = 1.0f - s.avg_weight;
  s.lerp_from_start = s.avg_weight < 0.5f;
  s.sq_weight = static_cast<float>(1.0 - static_cast<double>(in.beta2));
  s.beta2 = in.beta2;
  const auto step = static_cast<double>(in.step);
  const double correction1 = 1.0 - std::pow(static_cast<double>(in.beta1), step);
  const double correction2 = 1.0 - std::pow(static_cast<double>(in.beta2), step);
  s.neg_step_size = static_cast<float>(-(lr / correction1));
  s.correction2_sqrt = static_cast<float>(std::sqrt(correction2));
  s.eps = in.eps;
  s.grad_scale = in.grad_scale;
  return s;
}

}  // namespace

void CudaBackend::adamw_ranges(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq,
                               Tensor weights, const std::vector<AdamWRange>& ranges,
                               const AdamWStepScalars& scalars, bool zero_grad) {
  const char* op = "adamw_ranges";
  const std::int64_t n = param.numel();
  for (const Tensor* t : {&param, &exp_avg, &exp_avg_sq}) {
    require_dtype(*t, DType::F32, op, "a tensor");
    require_numel(*t, n, op, "a tensor");
  }
  require_float(grad, op, "grad");
  require_numel(grad, n, op, "grad");
  const bool write_weights = weights.data != nullptr;
  if (write_weights) {
    require_float(weights, op, "weights");
    require_numel(weights, n, op, "weights");
  }
  require(scalars.step >= 1, op, "step counts from 1");
  RangeRuns runs = concatenate(ranges, n, op);
  if (runs.total == 0) return;
  // Rounded as the host backend rounds it: in double, once.
  for (RangeRun& r : runs.runs)
    r.decay = static_cast<float>(1.0 - static_cast<double>(scalars.lr) * r.weight_decay);
  const AdamScalars s = scalars_for(scalars);
  const std::size_t table_bytes = runs.runs.size() * sizeof(RangeRun);
  Buffer table = scratch(table_bytes);
  FASTLLM_CUDA_CHECK(cudaMemcpyAsync(table.data(), runs.runs.data(), table_bytes,
                                     cudaMemcpyHostToDevice, stream()));
  constexpr int kThreads = 256;
  const std::int64_t blocks = std::min<std::int64_t>((runs.total + kThreads - 1) / kThreads,
                                                     std::int64_t{multiprocessors()} * 16);
  const std::int64_t span = span_per_block(runs.total, blocks);
  const auto grid = static_cast<unsigned>((runs.total + span - 1) / span);
  const auto* table_runs = static_cast<const RangeRun*>(table.data());
  const int run_count = static_cast<int>(runs.runs.size());
  dispatch_float(grad.dtype, op, [&]<class G>() {
    auto launch = [&]<class W>(W* out) {
      adamw_runs_kernel<G, W><<<grid, kThreads, 0, stream()>>>(
          table_runs, run_count, span, runs.total, param.as<float>(), grad.as<G>(),
          exp_avg.as<float>(), exp_avg_sq.as<float>(), out, zero_grad, s);
      FASTLLM_CUDA_LAUNCHED();
    };
    if (!write_weights || weights.data == param.data) {
      launch(static_cast<void*>(nullptr));
    } else {
      dispatch_float(weights.dtype, op, [&]<class W>() { launch(weights.as<W>()); });
    }
  });
}

}  // namespace fastllm::cuda
