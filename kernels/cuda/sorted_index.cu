#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/sorted_index.h"

namespace fastllm::cuda {
namespace {

__global__ void iota_kernel(std::int32_t* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<std::int32_t>(i);
}

}  // namespace

SortedIndex sort_by_index(CudaBackend& be, const std::int32_t* index, std::int64_t n) {
  require(n < (std::int64_t{1} << 31), "sort_by_index", "more than 2^31 rows");
  const auto count = static_cast<int>(n);
  SortedIndex sorted{be.scratch(static_cast<std::size_t>(n) * 4),
                     be.scratch(static_cast<std::size_t>(n) * 4)};
  Buffer positions = be.scratch(static_cast<std::size_t>(n) * 4);
  auto* position_data = static_cast<std::int32_t*>(positions.data());
  iota_kernel<<<grid_for(n, 256), 256, 0, be.stream()>>>(position_data, n);
  FASTLLM_CUDA_LAUNCHED();
  std::size_t temp_bytes = 0;
  FASTLLM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, index, static_cast<std::int32_t*>(sorted.keys.data()), position_data,
      static_cast<std::int32_t*>(sorted.order.data()), count, 0, 32, be.stream()));
  Buffer temp = be.scratch(temp_bytes);
  FASTLLM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data(), temp_bytes, index, static_cast<std::int32_t*>(sorted.keys.data()), position_data,
      static_cast<std::int32_t*>(sorted.order.data()), count, 0, 32, be.stream()));
  return sorted;
}

}  // namespace fastllm::cuda
