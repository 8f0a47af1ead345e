// y += alpha x, y *= alpha, and the sum of squares (for the gradient norm).
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/map.cuh"
#include "kernels/flat_ranges.h"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSumBlocks = 1024;

template <class TY, class TX>
__global__ void add_kernel(TY* y, const TX* x, float alpha, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    y[i] = from_f32<TY>(to_f32(y[i]) + alpha * to_f32(x[i]));
}

// (y, x) -> y + alpha x
struct AddScaled {
  float alpha;
  __device__ void operator()(const float* in, float* out) const { out[0] = in[0] + alpha * in[1]; }
};

struct Scale {
  float alpha;
  __device__ void operator()(const float* in, float* out) const { out[0] = in[0] * alpha; }
};

// Per-block sums of squares in double; a second pass adds the blocks in order, so the total
// repeats bit for bit.
template <class T>
__global__ void sum_squares_kernel(const T* x, std::int64_t n, double* partials) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const double v = to_f32(x[i]);
    acc += v * v;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// The multi-tensor form: each block sums its span of the runs' concatenation.
template <class T>
__global__ void sum_squares_runs_kernel(const T* x, const RangeRun* runs, int run_count,
                                        std::int64_t span, std::int64_t total, double* partials) {
  __shared__ double shared[32];
  double acc = 0.0;
  const std::int64_t lo = blockIdx.x * span;
  const std::int64_t hi = lo + span < total ? lo + span : total;
  walk_span(runs, run_count, lo, hi, threadIdx.x, blockDim.x, [&](const RangeRun&, std::int64_t i) {
    const double v = to_f32(x[i]);
    acc += v * v;
  });
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void sum_partials_kernel(const double* partials, int count, double* out) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x)
    acc += partials[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = acc;
}

}  // namespace

void CudaBackend::add(Tensor y, Tensor x, float alpha) {
  require_float(y, "add", "y");
  require_float(x, "add", "x");
  const std::int64_t n = y.numel();
  require_numel(x, n, "add", "x");
  if (n == 0) return;
  if (x.dtype == y.dtype) {
    dispatch_float(y.dtype, "add", [&]<class T>() {
      map<T, 2, 1>(*this, {y.as<T>(), x.as<T>()}, {y.as<T>()}, n, AddScaled{alpha});
    });
    return;
  }
  dispatch_float(y.dtype, "add", [&]<class TY>() {
    dispatch_float(x.dtype, "add", [&]<class TX>() {
      add_kernel<TY, TX>
          <<<grid_for(n, kThreads), kThreads, 0, stream()>>>(y.as<TY>(), x.as<TX>(), alpha, n);
      FASTLLM_CUDA_LAUNCHED();
    });
  });
}

void CudaBackend::scale(Tensor y, float alpha) {
  require_float(y, "scale", "y");
  const std::int64_t n = y.numel();
  if (n == 0) return;
  dispatch_float(y.dtype, "scale", [&]<class T>() {
    map<T, 1, 1>(*this, {y.as<T>()}, {y.as<T>()}, n, Scale{alpha});
  });
}

double CudaBackend::sum_squares(Tensor x) {
  require_float(x, "sum_squares", "x");
  const std::int64_t n = x.numel();
  if (n == 0) return 0.0;
  const int blocks =
      static_cast<int>(std::min<std::int64_t>(kSumBlocks, (n + kThreads - 1) / kThreads));
  Buffer partials = scratch(static_cast<std::size_t>(blocks + 1) * sizeof(double));
  auto* p = static_cast<double*>(partials.data());
  dispatch_float(x.dtype, "sum_squares", [&]<class T>() {
    sum_squares_kernel<T><<<blocks, kThreads, 0, stream()>>>(x.as<T>(), n, p);
    FASTLLM_CUDA_LAUNCHED();
  });
  sum_partials_kernel<<<1, kThreads, 0, stream()>>>(p, blocks, p + blocks);
  FASTLLM_CUDA_LAUNCHED();
  double total = 0.0;
  FASTLLM_CUDA_CHECK(
      cudaMemcpyAsync(&total, p + blocks, sizeof total, cudaMemcpyDeviceToHost, stream()));
  FASTLLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  return total;
}

double CudaBackend::sum_squares_ranges(Tensor x, const std::vector<FlatRange>& ranges) {
  const char* op = "sum_squares_ranges";
  require_float(x, op, "x");
  const RangeRuns runs = concatenate(ranges, x.numel(), op);
  if (runs.total == 0) return 0.0;
  const std::int64_t blocks =
      std::min<std::int64_t>(kSumBlocks, (runs.total + kThreads - 1) / kThreads);
  const std::int64_t span = span_per_block(runs.total, blocks);
  const int grid = static_cast<int>((runs.total + span - 1) / span);
  const std::size_t table_bytes = runs.runs.size() * sizeof(RangeRun);
  // One scratch allocation: the partial sums (doubles) first, then the run table.
  Buffer work = scratch(static_cast<std::size_t>(grid + 1) * sizeof(double) + table_bytes);
  auto* p = static_cast<double*>(work.data());
  auto* table = reinterpret_cast<RangeRun*>(p + grid + 1);
  FASTLLM_CUDA_CHECK(
      cudaMemcpyAsync(table, runs.runs.data(), table_bytes, cudaMemcpyHostToDevice, stream()));
  dispatch_float(x.dtype, op, [&]<class T>() {
    sum_squares_runs_kernel<T><<<grid, kThreads, 0, stream()>>>(
        x.as<T>(), table, static_cast<int>(runs.runs.size()), span, runs.total, p);
    FASTLLM_CUDA_LAUNCHED();
  });
  sum_partials_kernel<<<1, kThreads, 0, stream()>>>(p, grid, p + grid);
  FASTLLM_CUDA_LAUNCHED();
  double total = 0.0;
  FASTLLM_CUDA_CHECK(
      cudaMemcpyAsync(&total, p + grid, sizeof total, cudaMemcpyDeviceToHost, stream()));
  FASTLLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  return total;
}

}  // namespace fastllm::cuda
