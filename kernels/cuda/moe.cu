// Mixture of experts: the router (softmax, top-k, renormalised weights) and its gradient, the
// load-balancing statistics, and the permutation of token slots into per-expert runs with the row
// gathers, scatters and scalings around the experts' GEMMs.
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/sorted_index.h"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 256;

// One thread per token, in double like the host backend, so both pick the same experts.
__global__ void router_forward_kernel(const float* logits, std::int64_t tokens,
                                      std::int64_t experts, int top_k, float* probs,
                                      std::int32_t* topk_index, float* topk_weight) {
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const float* lt = logits + t * experts;
  float* pt = probs + t * experts;
  double m = lt[0];
  for (std::int64_t e = 1; e < experts; ++e)
    m = fmax(m, static_cast<double>(lt[e]));
  double sum = 0.0;
  for (std::int64_t e = 0; e < experts; ++e)
    sum += exp(lt[e] - m);
  for (std::int64_t e = 0; e < experts; ++e)
    pt[e] = static_cast<float>(exp(lt[e] - m) / sum);
  std::int32_t* it = topk_index + t * top_k;
  float* wt = topk_weight + t * top_k;
  // k passes of an arg-max over the unchosen experts; the strict > keeps the lower index on ties.
  float selected = 0.0f;
  for (int s = 0; s < top_k; ++s) {
    std::int64_t best = -1;
    for (std::int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int r = 0; r < s; ++r)
        taken = taken || it[r] == e;
      if (taken) continue;
      if (best < 0 || pt[e] > pt[best]) best = e;
    }
    it[s] = static_cast<std::int32_t>(best);
    wt[s] = pt[best];
    selected += pt[best];
  }
  for (int s = 0; s < top_k; ++s)
    wt[s] /= selected;
}

__global__ void router_backward_kernel(const float* probs, const std::int32_t* topk_index,
                                       const float* dtopk_weight, const float* dprob,
                                       std::int64_t tokens, std::int64_t experts,
                                       std::int64_t top_k, float* dlogits, int* flag) {
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const float* pt = probs + t * experts;
  const std::int32_t* it = topk_index + t * top_k;
  const float* dwt = dtopk_weight + t * top_k;
  for (std::int64_t s = 0; s < top_k; ++s) {
    if (it[s] < 0 || it[s] >= experts) {
      *flag = 1;
      return;
    }
  }
  // w_j = p_j / S with S the sum of the chosen p: dL/dp_i = (dw_i - sum_j dw_j w_j) / S.
  double selected = 0.0;
  for (std::int64_t s = 0; s < top_k; ++s)
    selected += pt[it[s]];
  double weighted = 0.0;
  for (std::int64_t s = 0; s < top_k; ++s)
    weighted += dwt[s] * (pt[it[s]] / selected);
  auto grad = [&](std::int64_t e) {
    double g = dprob ? dprob[e] : 0.0;
    for (std::int64_t s = 0; s < top_k; ++s)
      if (it[s] == e) g += (dwt[s] - weighted) / selected;
    return g;
  };
  // Softmax backward: dlogit_e = p_e (g_e - sum_f g_f p_f).
  double dot = 0.0;
  for (std::int64_t e = 0; e < experts; ++e)
    dot += grad(e) * pt[e];
  float* dt = dlogits + t * experts;
  for (std::int64_t e = 0; e < experts; ++e)
    dt[e] = static_cast<float>(pt[e] * (grad(e) - dot));
}

// Block e: slots choosing e and the sum of probs[:, e], added to counts[e] and prob_sums[e].
__global__ void router_statistics_kernel(const float* probs, const std::int32_t* topk_index,
                                         std::int64_t tokens, std::int64_t experts,
                                         std::int64_t slots, float* counts, float* prob_sums,
                                         int* flag) {
  __shared__ double shared[32];
  const std::int64_t e = blockIdx.x;
  double count = 0.0;
  for (std::int64_t i = threadIdx.x; i < slots; i += blockDim.x) {
    const std::int32_t index = topk_index[i];
    if (index < 0 || index >= experts) *flag = 1;
    count += index == e ? 1.0 : 0.0;
  }
  double sum = 0.0;
  for (std::int64_t t = threadIdx.x; t < tokens; t += blockDim.x)
    sum += probs[t * experts + e];
  count = block_sum(count, shared);
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    counts[e] += static_cast<float>(count);
    prob_sums[e] += static_cast<float>(sum);
  }
}

// Rows of any 2- or 4-byte element type move as U.
template <class U>
__global__ void gather_rows_kernel(const U* src, std::int64_t src_rows, const std::int32_t* index,
                                   std::int64_t n, std::int64_t width, U* dst, int* flag) {
  const std::int64_t total = n * width;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t row = index[i / width];
    if (row < 0 || row >= src_rows) {
      *flag = 1;
      continue;
    }
    dst[i] = src[row * width + i % width];
  }
}

// Block (p, column chunk): when sorted position p starts a run of equal destination rows, adds
// the run's weighted source rows to that row, in source order.
template <class T>
__global__ void scatter_add_rows_kernel(const std::int32_t* keys, const std::int32_t* order,
                                        std::int64_t n, const T* src, const float* weight,
                                        std::int64_t rows, std::int64_t width, T* dst, int* flag) {
  const std::int64_t p = blockIdx.x;
  const std::int32_t row = keys[p];
  if (p > 0 && keys[p - 1] == row) return;
  if (row < 0 || row >= rows) {
    *flag = 1;
    return;
  }
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  T* out = dst + row * width + j;
  float acc = to_f32(*out);
  for (std::int64_t q = p; q < n && keys[q] == row; ++q) {
    const std::int64_t i = order[q];
    const float s = weight ? weight[i] : 1.0f;
    acc += s * to_f32(src[i * width + j]);
  }
  *out = from_f32<T>(acc);
}

template <class T>
__global__ void scale_rows_kernel(T* y, const float* weight, std::int64_t rows,
                                  std::int64_t width) {
  const std::int64_t total = rows * width;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    y[i] = from_f32<T>(to_f32(y[i]) * weight[i / width]);
}

// One warp per row, in double like the host backend.
template <class T>
__global__ void dot_rows_gathered_kernel(const T* a, const T* b, std::int64_t b_rows,
                                         const std::int32_t* index, std::int64_t n,
                                         std::int64_t width, float* out, int* flag) {
  const int lane = threadIdx.x & 31;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * blockDim.x / 32;
  for (std::int64_t i = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / 32;
       i < n; i += warps) {
    const std::int64_t row = index[i];
    if (row < 0 || row >= b_rows) {
      if (lane == 0) *flag = 1;
      continue;
    }
    const T* ar = a + i * width;
    const T* br = b + row * width;
    double dot = 0.0;
    for (std::int64_t j = lane; j < width; j += 32)
      dot += static_cast<double>(to_f32(ar[j])) * to_f32(br[j]);
    dot = warp_sum(dot);
    if (lane == 0) out[i] = static_cast<float>(dot);
  }
}

// Sorted position i (of the slots sorted by expert, stable): the slot it came from and that
// slot's token; an expert index outside [0, experts) raises the flag.
__global__ void permute_outputs_kernel(const std::int32_t* keys, const std::int32_t* order,
                                       std::int64_t slots, std::int64_t top_k, int experts,
                                       std::int32_t* sorted_slot, std::int32_t* sorted_token,
                                       int* flag) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < slots;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    if (keys[i] < 0 || keys[i] >= experts) *flag = 1;
    sorted_slot[i] = order[i];
    sorted_token[i] = static_cast<std::int32_t>(order[i] / top_k);
  }
}

// offsets[e] for e in [0, experts]: the first sorted position whose expert is >= e.
__global__ void run_offsets_kernel(const std::int32_t* keys, std::int64_t slots, int experts,
                                   std::int32_t* offsets) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e > experts) return;
  std::int64_t lo = 0, hi = slots;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    if (keys[mid] < e) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[e] = static_cast<std::int32_t>(lo);
}

}  // namespace

void CudaBackend::router_forward(Tensor logits, int top_k, Tensor probs, Tensor topk_index,
                                 Tensor topk_weight) {
  const char* op = "router_forward";
  require_dtype(logits, DType::F32, op, "logits");
  require_dtype(probs, DType::F32, op, "probs");
  require_dtype(topk_index, DType::I32, op, "topk_index");
  require_dtype(topk_weight, DType::F32, op, "topk_weight");
  const std::int64_t experts = row_width(logits);
  const std::int64_t tokens = row_count(logits);
  require(top_k >= 1 && top_k <= experts, op, "top_k is outside [1, experts]");
  require_numel(probs, tokens * experts, op, "probs");
  require_numel(topk_index, tokens * top_k, op, "topk_index");
  require_numel(topk_weight, tokens * top_k, op, "topk_weight");
  if (tokens == 0) return;
  router_forward_kernel<<<grid_for(tokens, kThreads), kThreads, 0, stream()>>>(
      logits.as<float>(), tokens, experts, top_k, probs.as<float>(), topk_index.as<std::int32_t>(),
      topk_weight.as<float>());
  FASTLLM_CUDA_LAUNCHED();
}

void CudaBackend::router_backward(Tensor probs, Tensor topk_index, Tensor dtopk_weight,
                                  Tensor dprob_per_expert, Tensor dlogits) {
  const char* op = "router_backward";
  require_dtype(probs, DType::F32, op, "probs");
  require_dtype(topk_index, DType::I32, op, "topk_index");
  require_dtype(dtopk_weight, DType::F32, op, "dtopk_weight");
  require_dtype(dlogits, DType::F32, op, "dlogits");
  const std::int64_t experts = row_width(probs);
  const std::int64_t tokens = row_count(probs);
  const std::int64_t top_k = tokens == 0 ? 0 : topk_index.numel() / tokens;
  require_numel(topk_index, tokens * top_k, op, "topk_index");
  require_numel(dtopk_weight, tokens * top_k, op, "dtopk_weight");
  require_numel(dlogits, tokens * experts, op, "dlogits");
  const bool has_dprob = !is_empty(dprob_per_expert);
  if (has_dprob) {
    require_dtype(dprob_per_expert, DType::F32, op, "dprob_per_expert");
    require_numel(dprob_per_expert, experts, op, "dprob_per_expert");
  }
  if (tokens == 0) return;
  router_backward_kernel<<<grid_for(tokens, kThreads), kThreads, 0, stream()>>>(
      probs.as<float>(), topk_index.as<std::int32_t>(), dtopk_weight.as<float>(),
      has_dprob ? dprob_per_expert.as<float>() : nullptr, tokens, experts, top_k,
      dlogits.as<float>(), index_flag());
  FASTLLM_CUDA_LAUNCHED();
  check_flag(op, "an expert index is outside [0, experts)");
}

void CudaBackend::router_statistics(Tensor probs, Tensor topk_index, Tensor counts,
                                    Tensor prob_sums) {
  const char* op = "router_statistics";
  require_dtype(probs, DType::F32, op, "probs");
  require_dtype(topk_index, DType::I32, op, "topk_index");
  require_dtype(counts, DType::F32, op, "counts");
  require_dtype(prob_sums, DType::F32, op, "prob_sums");
  const std::int64_t experts = row_width(probs);
  const std::int64_t tokens = row_count(probs);
  require_numel(counts, experts, op, "counts");
  require_numel(prob_sums, experts, op, "prob_sums");
  if (experts == 0) return;
  router_statistics_kernel<<<static_cast<unsigned>(experts), kThreads, 0, stream()>>>(
      probs.as<float>(), topk_index.as<std::int32_t>(), tokens, experts, topk_index.numel(),
      counts.as<float>(), prob_sums.as<float>(), index_flag());
  FASTLLM_CUDA_LAUNCHED();
  check_flag(op, "an expert index is outside [0, experts)");
}

// The sort runs on the device (a stable radix sort of the expert indices) and the offsets stay
// there: the only wait is the index check, as in the row ops around it.
void CudaBackend::moe_permute_offsets(Tensor topk_index, int experts, Tensor sorted_token,
                                      Tensor sorted_slot, Tensor offsets) {
  const char* op = "moe_permute_offsets";
  require_dtype(topk_index, DType::I32, op, "topk_index");
  require_dtype(sorted_token, DType::I32, op, "sorted_token");
  require_dtype(sorted_slot, DType::I32, op, "sorted_slot");
  require_dtype(offsets, DType::I32, op, "offsets");
  require(experts >= 1, op, "experts must be positive");
  const std::int64_t slots = topk_index.numel();
  const std::int64_t top_k = row_width(topk_index);
  require(top_k > 0 || slots == 0, op, "topk_index has no columns");
  require_numel(sorted_token, slots, op, "sorted_token");
  require_numel(sorted_slot, slots, op, "sorted_slot");
  require_numel(offsets, static_cast<std::int64_t>(experts) + 1, op, "offsets");
  if (slots == 0) {
    fill(offsets, 0.0f);
    return;
  }
  const SortedIndex sorted = sort_by_index(*this, topk_index.as<std::int32_t>(), slots);
  const auto* keys = static_cast<const std::int32_t*>(sorted.keys.data());
  permute_outputs_kernel<<<grid_for(slots, kThreads), kThreads, 0, stream()>>>(
      keys, static_cast<const std::int32_t*>(sorted.order.data()), slots, top_k, experts,
      sorted_slot.as<std::int32_t>(), sorted_token.as<std::int32_t>(), index_flag());
  FASTLLM_CUDA_LAUNCHED();
  run_offsets_kernel<<<grid_for(experts + 1, kThreads), kThreads, 0, stream()>>>(
      keys, slots, experts, offsets.as<std::int32_t>());
  FASTLLM_CUDA_LAUNCHED();
  check_flag(op, "an expert index is outside [0, experts)");
}

void CudaBackend::gather_rows(Tensor src, Tensor index, Tensor dst) {
  const char* op = "gather_rows";
  require_dtype(dst, src.dtype, op, "dst");
  require_dtype(index, DType::I32, op, "index");
  const std::int64_t width = row_width(src);
  const std::int64_t n = index.numel();
  require_numel(dst, n * width, op, "dst");
  if (n * width == 0) return;
  const std::int64_t rows = row_count(src);
  if (dtype_size(src.dtype) == 2) {
    gather_rows_kernel<std::uint16_t><<<grid_for(n * width, kThreads), kThreads, 0, stream()>>>(
        src.as<std::uint16_t>(), rows, index.as<std::int32_t>(), n, width, dst.as<std::uint16_t>(),
        index_flag());
  } else {
    gather_rows_kernel<std::uint32_t><<<grid_for(n * width, kThreads), kThreads, 0, stream()>>>(
        src.as<std::uint32_t>(), rows, index.as<std::int32_t>(), n, width, dst.as<std::uint32_t>(),
        index_flag());
  }
  FASTLLM_CUDA_LAUNCHED();
  check_flag(op, "an index is outside the rows of src");
}

void CudaBackend::scatter_add_rows(Tensor src, Tensor index, Tensor weight, Tensor dst) {
  const char* op = "scatter_add_rows";
  require_float(dst, op, "dst");
  require_dtype(src, dst.dtype, op, "src");
  require_dtype(index, DType::I32, op, "index");
  const std::int64_t width = row_width(dst);
  const std::int64_t rows = row_count(dst);
  const std::int64_t n = index.numel();
  require_numel(src, n * width, op, "src");
  const bool weighted = !is_empty(weight);
  if (weighted) {
    require_dtype(weight, DType::F32, op, "weight");
    require_numel(weight, n, op, "weight");
  }
  if (n == 0 || width == 0) return;
  const SortedIndex sorted = sort_by_index(*this, index.as<std::int32_t>(), n);
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((width + kThreads - 1) / kThreads));
  dispatch_float(dst.dtype, op, [&]<class T>() {
    scatter_add_rows_kernel<T><<<grid, kThreads, 0, stream()>>>(
        static_cast<const std::int32_t*>(sorted.keys.data()),
        static_cast<const std::int32_t*>(sorted.order.data()), n, src.as<T>(),
        weighted ? weight.as<float>() : nullptr, rows, width, dst.as<T>(), index_flag());
    FASTLLM_CUDA_LAUNCHED();
  });
  check_flag(op, "an index is outside the rows of dst");
}

void CudaBackend::scale_rows(Tensor y, Tensor weight) {
  const char* op = "scale_rows";
  require_float(y, op, "y");
  require_dtype(weight, DType::F32, op, "weight");
  const std::int64_t rows = weight.numel();
  const std::int64_t width = rows == 0 ? 0 : y.numel() / rows;
  require_numel(y, rows * width, op, "y");
  if (rows * width == 0) return;
  dispatch_float(y.dtype, op, [&]<class T>() {
    scale_rows_kernel<T><<<grid_for(rows * width, kThreads), kThreads, 0, stream()>>>(
        y.as<T>(), weight.as<float>(), rows, width);
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::dot_rows_gathered(Tensor a, Tensor b, Tensor index, Tensor out) {
  const char* op = "dot_rows_gathered";
  require_float(b, op, "b");
  require_dtype(a, b.dtype, op, "a");
  require_dtype(out, DType::F32, op, "out");
  require_dtype(index, DType::I32, op, "index");
  const std::int64_t width = row_width(b);
  const std::int64_t n = index.numel();
  require_numel(a, n * width, op, "a");
  require_numel(out, n, op, "out");
  if (n == 0) return;
  dispatch_float(b.dtype, op, [&]<class T>() {
    dot_rows_gathered_kernel<T><<<grid_for(n * 32, kThreads), kThreads, 0, stream()>>>(
        a.as<T>(), b.as<T>(), row_count(b), index.as<std::int32_t>(), n, width, out.as<float>(),
        index_flag());
    FASTLLM_CUDA_LAUNCHED();
  });
  check_flag(op, "an index is outside the rows of b");
}

}  // namespace fastllm::cuda
