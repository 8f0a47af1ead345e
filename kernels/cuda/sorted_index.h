#pragma once
// Positions grouped by an int32 index (a stable sort): the ops that add many rows into one
// (embedding and scatter backward) walk each group in position order, which keeps their sums
// deterministic and in the host backend's order, with no atomics.
#include <cstdint>

#include "kernels/cuda/cuda_backend_impl.h"

namespace fastllm::cuda {

struct SortedIndex {
  Buffer keys;   // [n] int32, the index values in ascending order
  Buffer order;  // [n] int32, the position each key came from; equal keys keep position order
};

SortedIndex sort_by_index(CudaBackend& be, const std::int32_t* index, std::int64_t n);

}  // namespace fastllm::cuda
