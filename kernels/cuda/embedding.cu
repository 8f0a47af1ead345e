// Token embedding, vocab-parallel: this rank holds rows [vocab_offset, vocab_offset + V).
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/sorted_index.h"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void embedding_forward_kernel(const std::int32_t* ids, const T* table,
                                         std::int64_t vocab, std::int64_t dim,
                                         std::int64_t vocab_offset, std::int64_t tokens, T* out) {
  const std::int64_t n = tokens * dim;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / dim;
    const std::int64_t local = ids[t] - vocab_offset;
    out[i] = local >= 0 && local < vocab ? table[local * dim + i % dim] : from_f32<T>(0.0f);
  }
}

// Block (p, column chunk): when sorted position p starts a run of equal ids, adds the run's rows
// of dout, in token order, to that id's row.
template <class T>
__global__ void embedding_backward_kernel(const std::int32_t* keys, const std::int32_t* order,
                                          std::int64_t tokens, const T* dout, std::int64_t vocab,
                                          std::int64_t dim, std::int64_t vocab_offset,
                                          float* dtable) {
  const std::int64_t p = blockIdx.x;
  const std::int32_t id = keys[p];
  if (p > 0 && keys[p - 1] == id) return;
  const std::int64_t local = id - vocab_offset;
  if (local < 0 || local >= vocab) return;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  float* row = dtable + local * dim + j;
  float acc = *row;
  for (std::int64_t q = p; q < tokens && keys[q] == id; ++q)
    acc += to_f32(dout[static_cast<std::int64_t>(order[q]) * dim + j]);
  *row = acc;
}

}  // namespace

void CudaBackend::embedding_forward(Tensor ids, Tensor table, std::int64_t vocab_offset,
                                    Tensor out) {
  const char* op = "embedding_forward";
  require_dtype(ids, DType::I32, op, "ids");
  require_float(table, op, "table");
  require_dtype(out, table.dtype, op, "out");
  const std::int64_t vocab = row_count(table);
  const std::int64_t dim = row_width(table);
  const std::int64_t tokens = ids.numel();
  require_numel(out, tokens * dim, op, "out");
  if (tokens * dim == 0) return;
  dispatch_float(table.dtype, op, [&]<class T>() {
    embedding_forward_kernel<T><<<grid_for(tokens * dim, kThreads), kThreads, 0, stream()>>>(
        ids.as<std::int32_t>(), table.as<T>(), vocab, dim, vocab_offset, tokens, out.as<T>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::embedding_backward(Tensor ids, Tensor dout, std::int64_t vocab_offset,
                                     Tensor dtable) {
  const char* op = "embedding_backward";
  require_dtype(ids, DType::I32, op, "ids");
  require_float(dout, op, "dout");
  require_dtype(dtable, DType::F32, op, "dtable");
  const std::int64_t vocab = row_count(dtable);
  const std::int64_t dim = row_width(dtable);
  const std::int64_t tokens = ids.numel();
  require_numel(dout, tokens * dim, op, "dout");
  if (tokens * dim == 0) return;
  const SortedIndex sorted = sort_by_index(*this, ids.as<std::int32_t>(), tokens);
  const dim3 grid(static_cast<unsigned>(tokens),
                  static_cast<unsigned>((dim + kThreads - 1) / kThreads));
  dispatch_float(dout.dtype, op, [&]<class T>() {
    embedding_backward_kernel<T><<<grid, kThreads, 0, stream()>>>(
        static_cast<const std::int32_t*>(sorted.keys.data()),
        static_cast<const std::int32_t*>(sorted.order.data()), tokens, dout.as<T>(), vocab, dim,
        vocab_offset, dtable.as<float>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
