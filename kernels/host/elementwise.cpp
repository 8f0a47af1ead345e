#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

namespace {
// Below this many elements a parallel region costs more than the loop.
constexpr std::int64_t kParallelMin = 1 << 15;
}  // namespace

void HostBackend::add(Tensor y, Tensor x, float alpha) {
  host::require_dtype(y, DType::F32, "add", "y");
  host::require_dtype(x, DType::F32, "add", "x");
  const std::int64_t n = y.numel();
  host::require_numel(x, n, "add", "x");
  float* out = y.as<float>();
  const float* in = x.as<float>();
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
  for (std::int64_t i = 0; i < n; ++i)
    out[i] += alpha * in[i];
}

void HostBackend::scale(Tensor y, float alpha) {
  host::require_dtype(y, DType::F32, "scale", "y");
  const std::int64_t n = y.numel();
  float* out = y.as<float>();
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
  for (std::int64_t i = 0; i < n; ++i)
    out[i] *= alpha;
}

double HostBackend::sum_squares(Tensor x) {
  host::require_dtype(x, DType::F32, "sum_squares", "x");
  const std::int64_t n = x.numel();
  const float* in = x.as<float>();
  double total = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : total) if (n > kParallelMin)
  for (std::int64_t i = 0; i < n; ++i)
    total += static_cast<double>(in[i]) * in[i];
  return total;
}

double HostBackend::sum_squares_ranges(Tensor x, const std::vector<FlatRange>& ranges) {
  host::require_dtype(x, DType::F32, "sum_squares_ranges", "x");
  const Tensor flat = x.view({x.numel()});
  double total = 0.0;
  for (const FlatRange& r : ranges) {
    host::require(r.begin >= 0 && r.count >= 0 && r.begin + r.count <= x.numel(),
                  "sum_squares_ranges", "a range outside x");
    // Range by range as sum_squares sums, so that the two agree to the last bit.
    total += sum_squares(flat.rows(r.begin, r.count));
  }
  return total;
}

}  // namespace fastllm
