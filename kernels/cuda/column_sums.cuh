#pragma once
// Parameter gradients summed over rows (bias, norm weights): out[j] += sum_r term(r, j), in a
// fixed order, so results repeat bit for bit. Blocks of 32 columns x 8 row lanes take a share of
// the rows each; the shares land in a scratch [splits, width] and one more pass adds them up.
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {

template <class Term>
__global__ void column_partials_kernel(Term term, std::int64_t rows, std::int64_t width,
                                       std::int64_t rows_per_split, double* partials) {
  __shared__ double sums[8][33];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const std::int64_t begin = blockIdx.y * rows_per_split;
  const std::int64_t end = min(rows, begin + rows_per_split);
  double acc = 0.0;
  if (j < width) {
    for (std::int64_t r = begin + threadIdx.y; r < end; r += 8)
      acc += static_cast<double>(term(r, j));
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < width) {
    double total = 0.0;
    for (int y = 0; y < 8; ++y)
      total += sums[y][threadIdx.x];
    partials[blockIdx.y * width + j] = total;
  }
}

static __global__ void column_finish_kernel(const double* partials, std::int64_t splits,
                                            std::int64_t width, float* out) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  double total = 0.0;
  for (std::int64_t s = 0; s < splits; ++s)
    total += partials[s * width + j];
  out[j] += static_cast<float>(total);
}

template <class Term>
void column_sums(CudaBackend& be, Term term, std::int64_t rows, std::int64_t width, float* out) {
  if (rows == 0 || width == 0) return;
  const std::int64_t column_blocks = (width + 31) / 32;
  const std::int64_t want = std::max<std::int64_t>(1, 4 * be.multiprocessors() / column_blocks);
  const std::int64_t splits = std::min<std::int64_t>((rows + 63) / 64, want);
  const std::int64_t rows_per_split = (rows + splits - 1) / splits;
  Buffer partials = be.scratch(static_cast<std::size_t>(splits * width) * sizeof(double));
  column_partials_kernel<<<dim3(static_cast<unsigned>(column_blocks),
                                static_cast<unsigned>(splits)),
                           dim3(32, 8), 0, be.stream()>>>(term, rows, width, rows_per_split,
                                                          static_cast<double*>(partials.data()));
  FASTLLM_CUDA_LAUNCHED();
  column_finish_kernel<<<grid_for(width, 256), 256, 0, be.stream()>>>(
      static_cast<const double*>(partials.data()), splits, width, out);
  FASTLLM_CUDA_LAUNCHED();
}

}  // namespace fastllm::cuda
