// Incremental decoding with a key/value cache: rotary embedding at an absolute position and
// attention of new queries against the cache (inference only, no backward).
#include <string>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

template <class T>
__global__ void rope_at_kernel(T* x, const float* cos, const float* sin, std::int64_t rows,
                               std::int64_t seq, std::int64_t heads, std::int64_t half,
                               std::int64_t offset) {
  const std::int64_t n = rows * heads * half;
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = idx % half;
    const std::int64_t row_head = idx / half;  // (b * seq + s) * heads + h
    const std::int64_t pos = offset + row_head / heads % seq;
    T* x1 = x + row_head * 2 * half + i;
    T* x2 = x1 + half;
    const float a = to_f32(*x1);
    const float b = to_f32(*x2);
    const float c = cos[pos * half + i];
    const float s = sin[pos * half + i];
    *x1 = from_f32<T>(a * c - b * s);
    *x2 = from_f32<T>(b * c + a * s);
  }
}

// One block per (query, head, batch): the scores of the visible keys go to `scores` (global
// scratch, a row of `span` per block), then a block-wide max and sum, then each thread one
// output dimension. A decoding step has one query per sequence, so the parallelism is over keys
// and dimensions, not queries.
template <class T>
__global__ void attention_cached_kernel(const T* q, const T* k, const T* v, T* out, float* scores,
                                        std::int64_t q_len, std::int64_t heads, std::int64_t groups,
                                        std::int64_t dim, std::int64_t capacity,
                                        std::int64_t offset, std::int64_t window, std::int64_t span,
                                        float scale) {
  extern __shared__ float shared[];  // q row [dim], then 32 for the reductions
  float* qs = shared;
  float* reduce = shared + dim;
  const std::int64_t i = blockIdx.x / heads, h = blockIdx.x % heads, b = blockIdx.y;
  const std::int64_t g = h / (heads / groups);
  const std::int64_t pos = offset + i;
  const std::int64_t first = window > 0 ? max(std::int64_t{0}, pos - window + 1) : 0;
  const std::int64_t count = pos - first + 1;
  const T* qrow = q + ((b * q_len + i) * heads + h) * dim;
  for (std::int64_t e = threadIdx.x; e < dim; e += blockDim.x)
    qs[e] = to_f32(qrow[e]);
  __syncthreads();
  float* row_scores =
      scores + (static_cast<std::int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * span;
  float top = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const T* krow = k + ((b * capacity + first + j) * groups + g) * dim;
    float dot = 0;
    for (std::int64_t e = 0; e < dim; ++e)
      dot += qs[e] * to_f32(krow[e]);
    row_scores[j] = dot * scale;
    top = fmaxf(top, dot * scale);
  }
  top = block_max(top, reduce);
  float total = 0;
  for (std::int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const float p = __expf(row_scores[j] - top);
    row_scores[j] = p;
    total += p;
  }
  total = block_sum(total, reduce);  // its barriers also publish row_scores to the block
  T* orow = out + ((b * q_len + i) * heads + h) * dim;
  for (std::int64_t e = threadIdx.x; e < dim; e += blockDim.x) {
    float acc = 0;
    for (std::int64_t j = 0; j < count; ++j)
      acc += row_scores[j] * to_f32(v[((b * capacity + first + j) * groups + g) * dim + e]);
    orow[e] = from_f32<T>(acc / total);
  }
}

void require_rank4(const Tensor& t, const char* op, const char* name) {
  if (t.rank != 4)
    fail(op, std::string(name) + " has rank " + std::to_string(t.rank) +
                 ", expected 4 [batch, positions, heads, head_dim]");
}

}  // namespace

void CudaBackend::rope_at(Tensor x, double theta, std::int64_t offset) {
  require_float(x, "rope_at", "x");
  require_rank4(x, "rope_at", "x");
  const std::int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), dim = x.size(3);
  if (dim % 2 != 0) fail("rope_at", "head_dim is " + std::to_string(dim) + ", expected even");
  if (!(theta > 0.0)) fail("rope_at", "theta is " + std::to_string(theta) + ", expected > 0");
  if (offset < 0) fail("rope_at", "offset is " + std::to_string(offset) + ", expected >= 0");
  if (x.numel() == 0) return;
  // The table's rows do not depend on its length, so it is asked for in steps of 1024 positions:
  // a decoding step, one position further, reuses the table of the one before.
  const std::int64_t rows = (offset + seq + 1023) / 1024 * 1024;
  const float* cos = rope_table(theta, rows, dim, false);
  const float* sin = rope_table(theta, rows, dim, true);
  const std::int64_t half = dim / 2;
  dispatch_float(x.dtype, "rope_at", [&]<class T>() {
    rope_at_kernel<T><<<grid_for(batch * seq * heads * half, 256), 256, 0, stream()>>>(
        x.as<T>(), cos, sin, batch * seq, seq, heads, half, offset);
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::attention_cached(Tensor q, Tensor k_cache, Tensor v_cache, std::int64_t offset,
                                   std::int64_t window, Tensor out) {
  const char* op = "attention_cached";
  require_float(q, op, "q");
  require_rank4(q, op, "q");
  require_rank4(k_cache, op, "k_cache");
  require_rank4(v_cache, op, "v_cache");
  require_rank4(out, op, "out");
  if (k_cache.dtype != q.dtype || v_cache.dtype != q.dtype || out.dtype != q.dtype)
    fail(op, "q, k_cache, v_cache and out must have one dtype");
  const std::int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), dim = q.size(3);
  const std::int64_t capacity = k_cache.size(1), groups = k_cache.size(2);
  if (out.dims != q.dims) fail(op, "out has another shape than q");
  if (v_cache.dims != k_cache.dims) fail(op, "v_cache has another shape than k_cache");
  if (k_cache.size(0) != batch || k_cache.size(3) != dim)
    fail(op, "k_cache's batch or head_dim differs from q's");
  if (groups < 1 || heads % groups != 0)
    fail(op, std::to_string(heads) + " heads do not split into " + std::to_string(groups) +
                 " key/value heads");
  if (offset < 0 || window < 0) fail(op, "offset and window must be >= 0");
  if (offset + q_len > capacity)
    fail(op, "positions up to " + std::to_string(offset + q_len) + " do not fit a cache of " +
                 std::to_string(capacity));
  if (q.numel() == 0) return;
  const std::int64_t kv_len = offset + q_len;
  const std::int64_t span = window > 0 ? std::min(window, kv_len) : kv_len;
  const Buffer scores =
      scratch(static_cast<std::size_t>(batch * q_len * heads * span) * sizeof(float));
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const dim3 grid(static_cast<unsigned>(q_len * heads), static_cast<unsigned>(batch));
  const std::size_t shared = static_cast<std::size_t>(dim + 32) * sizeof(float);
  dispatch_float(q.dtype, op, [&]<class T>() {
    attention_cached_kernel<T>
        <<<grid, 256, shared, stream()>>>(q.as<T>(), k_cache.as<T>(), v_cache.as<T>(), out.as<T>(),
                                          static_cast<float*>(scores.data()), q_len, heads, groups,
                                          dim, capacity, offset, window, span, scale);
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
