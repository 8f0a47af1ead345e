#include "kernels/cuda/allocator.h"

#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/cuda_util.h"

namespace fastllm::cuda {
namespace {

constexpr std::size_t kSmallQuantum = 512;
constexpr std::size_t kLargeQuantum = std::size_t{2} << 20;
constexpr std::size_t kLargeFrom = std::size_t{1} << 20;

// Small requests round to 512 bytes, large ones to 2 MiB: the same tensor shape always maps to
// the same block size, and few distinct sizes keep the cache dense.
std::size_t block_size(std::size_t bytes) {
  const std::size_t quantum = bytes >= kLargeFrom ? kLargeQuantum : kSmallQuantum;
  const std::size_t rounded = (bytes + quantum - 1) / quantum * quantum;
  return rounded == 0 ? kSmallQuantum : rounded;
}

std::string gib(std::size_t bytes) {
  return std::to_string(static_cast<double>(bytes) / (1u << 30)).substr(0, 6) + " GiB";
}

}  // namespace

CachingAllocator::~CachingAllocator() {
  // No exceptions from a destructor: a failing cudaFree at exit leaves nothing to save.
  for (auto& [bytes, data] : free_)
    cudaFree(data);
}

Buffer CachingAllocator::allocate(std::size_t bytes) {
  const std::size_t size = block_size(bytes);
  std::unique_lock<std::mutex> lock(mutex_);
  void* data = nullptr;
  std::size_t taken = size;
  // The smallest cached block that fits, unless it wastes more than a quarter.
  auto it = free_.lower_bound(size);
  if (it != free_.end() && it->first <= size + size / 4) {
    taken = it->first;
    data = it->second;
    free_.erase(it);
    cached_ -= taken;
  } else {
    FASTLLM_CUDA_CHECK(cudaSetDevice(device_));
    cudaError_t status = cudaMalloc(&data, size);
    if (status == cudaErrorMemoryAllocation && !free_.empty()) {
      cudaGetLastError();  // clears the sticky-free allocation error
      release_cached_locked();
      status = cudaMalloc(&data, size);
    }
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw std::runtime_error("out of GPU memory: " + std::to_string(bytes) +
                               " bytes requested with " + gib(in_use_) + " in use (peak " +
                               gib(peak_) + ")");
    }
    FASTLLM_CUDA_CHECK(status);
  }
  in_use_ += taken;
  peak_ = std::max(peak_, in_use_);
  auto self = shared_from_this();
  return Buffer(data, bytes, [self, taken](void* p) { self->release(p, taken); });
}

void CachingAllocator::release(void* data, std::size_t block_bytes) {
  const std::lock_guard<std::mutex> lock(mutex_);
  free_.emplace(block_bytes, data);
  in_use_ -= block_bytes;
  cached_ += block_bytes;
}

CudaMemoryStats CachingAllocator::stats() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return {in_use_, peak_, cached_};
}

void CachingAllocator::release_cached() {
  const std::lock_guard<std::mutex> lock(mutex_);
  release_cached_locked();
}

void CachingAllocator::release_cached_locked() {
  // cudaFree waits for the device, so no kernel still uses a block it returns.
  for (auto& [bytes, data] : free_)
    FASTLLM_CUDA_CHECK(cudaFree(data));
  free_.clear();
  cached_ = 0;
}

}  // namespace fastllm::cuda
