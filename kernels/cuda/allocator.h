#pragma once
// Device memory for one CUDA backend: blocks are kept after release and handed out again, so a
// training step, which asks for the same sizes every time, calls cudaMalloc only in its first step.
//
// Every op of a backend runs on its one stream, in host order: a block released by the host while
// kernels still use it is only reused by work enqueued later on that stream, hence safe.
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"

namespace fastllm::cuda {

class CachingAllocator : public std::enable_shared_from_this<CachingAllocator> {
 public:
  explicit CachingAllocator(int device) : device_(device) {}
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Each Buffer holds a reference to the allocator, which therefore outlives its buffers.
  Buffer allocate(std::size_t bytes);
  CudaMemoryStats stats() const;
  // Returns every cached block to the driver (waits for the device).
  void release_cached();

 private:
  void release(void* data, std::size_t block_bytes);
  void release_cached_locked();

  int device_;
  mutable std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;  // block size -> block
  std::size_t in_use_ = 0;
  std::size_t peak_ = 0;
  std::size_t cached_ = 0;
};

}  // namespace fastllm::cuda
