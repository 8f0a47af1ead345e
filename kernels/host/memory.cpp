#include <unistd.h>

#include <bit>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

constexpr std::size_t kAlignment = 64;

// Keeps large freed blocks for reuse. A training step allocates and frees the same activation sizes
// every step, and glibc returns blocks this large to the kernel (it maps anything over 32 MiB
// afresh), so every step would pay a page fault and a page clearing per 4 KiB of its activations:
// a tenth of a step of a small model.
class BlockCache {
 public:
  static constexpr std::size_t kMinBytes = std::size_t{1} << 20;  // malloc recycles smaller ones

  BlockCache() {
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page_size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page_size > 0)
      limit_ = static_cast<std::size_t>(pages) * static_cast<std::size_t>(page_size) / 4;
  }
  ~BlockCache() { release_all(); }
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // The size a request is served with: the next of eight steps per power of two, so that sizes
  // that vary a little between steps share blocks, with at most 1/8 unused.
  static std::size_t size_class(std::size_t bytes) {
    const std::size_t step = std::bit_floor(bytes) / 8;
    return (bytes + step - 1) / step * step;
  }

  // A cached block of exactly `size` bytes, or null.
  void* take(std::size_t size) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = blocks_.find(size);
    if (it == blocks_.end()) return nullptr;
    void* data = it->second;
    blocks_.erase(it);
    cached_ -= size;
    return data;
  }

  // Keeps the block for reuse, or frees it when the cache holds its limit already.
  void give(void* data, std::size_t size) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + size <= limit_) {
        blocks_.emplace(size, data);
        cached_ += size;
        return;
      }
    }
    std::free(data);
  }

  void release_all() {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [size, data] : blocks_)
      std::free(data);
    blocks_.clear();
    cached_ = 0;
  }

 private:
  std::mutex mutex_;
  std::multimap<std::size_t, void*> blocks_;  // size -> block
  std::size_t cached_ = 0;
  std::size_t limit_ = std::size_t{1} << 30;  // a quarter of physical memory where it is known
};

BlockCache& block_cache() {
  static BlockCache cache;
  return cache;
}

// Round to nearest even, as PyTorch's float -> bfloat16 does; NaN stays a quiet NaN.
std::uint16_t to_bf16(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

float from_bf16(std::uint16_t value) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(value) << 16);
}

}  // namespace

Buffer HostBackend::allocate(std::size_t bytes) {
  const std::shared_ptr<Usage> usage = usage_;
  auto count = [&] {
    const std::size_t now = usage->in_use += bytes;
    std::size_t peak = usage->peak;
    while (now > peak && !usage->peak.compare_exchange_weak(peak, now)) {
    }
  };
  if (bytes < BlockCache::kMinBytes) {
    // aligned_alloc wants a non-zero multiple of the alignment.
    const std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* data = std::aligned_alloc(kAlignment, rounded == 0 ? kAlignment : rounded);
    if (!data) throw std::bad_alloc();
    count();
    return Buffer(data, bytes, [usage, bytes](void* p) {
      usage->in_use -= bytes;
      std::free(p);
    });
  }
  BlockCache& cache = block_cache();
  const std::size_t size = BlockCache::size_class(bytes);
  void* data = cache.take(size);
  if (!data) data = std::aligned_alloc(kAlignment, size);
  if (!data) {
    // What the cache holds may be what is missing.
    cache.release_all();
    data = std::aligned_alloc(kAlignment, size);
  }
  if (!data) throw std::bad_alloc();
  count();
  return Buffer(data, bytes, [&cache, size, usage, bytes](void* p) {
    usage->in_use -= bytes;
    cache.give(p, size);
  });
}

void HostBackend::copy_from_host(Tensor dst, const void* src) {
  if (dst.bytes() > 0) std::memcpy(dst.data, src, dst.bytes());
}

void HostBackend::copy_to_host(void* dst, Tensor src) {
  if (src.bytes() > 0) std::memcpy(dst, src.data, src.bytes());
}

void HostBackend::copy(Tensor dst, Tensor src) {
  host::require_numel(dst, src.numel(), "copy", "destination");
  const std::int64_t n = src.numel();
  if (dst.dtype == src.dtype) {
    if (n > 0 && dst.data != src.data) std::memmove(dst.data, src.data, src.bytes());
  } else if (dst.dtype == DType::BF16 && src.dtype == DType::F32) {
    auto* out = dst.as<std::uint16_t>();
    const float* in = src.as<float>();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (std::int64_t i = 0; i < n; ++i)
      out[i] = to_bf16(in[i]);
  } else if (dst.dtype == DType::F32 && src.dtype == DType::BF16) {
    float* out = dst.as<float>();
    const auto* in = src.as<std::uint16_t>();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (std::int64_t i = 0; i < n; ++i)
      out[i] = from_bf16(in[i]);
  } else {
    host::fail("copy", std::string("cannot convert ") + dtype_name(src.dtype) + " to " +
                           dtype_name(dst.dtype));
  }
}

void HostBackend::fill(Tensor t, float value) {
  const std::int64_t n = t.numel();
  switch (t.dtype) {
    case DType::F32: {
      float* p = t.as<float>();
      if (std::bit_cast<std::uint32_t>(value) == 0u) {
        // memset writes large ranges with streaming stores, skipping the read of every line the
        // plain loop costs (zeroing the gradients each step is the common call).
#pragma omp parallel if (n > (1 << 16))
        {
          const std::int64_t threads = omp_get_num_threads();
          const std::int64_t thread = omp_get_thread_num();
          const std::int64_t begin = n * thread / threads;
          const std::int64_t end = n * (thread + 1) / threads;
          std::memset(p + begin, 0, static_cast<std::size_t>(end - begin) * sizeof(float));
        }
        break;
      }
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (std::int64_t i = 0; i < n; ++i)
        p[i] = value;
      break;
    }
    case DType::BF16: {
      auto* p = t.as<std::uint16_t>();
      const std::uint16_t v = to_bf16(value);
      for (std::int64_t i = 0; i < n; ++i)
        p[i] = v;
      break;
    }
    case DType::I32: {
      auto* p = t.as<std::int32_t>();
      const auto v = static_cast<std::int32_t>(value);
      for (std::int64_t i = 0; i < n; ++i)
        p[i] = v;
      break;
    }
    case DType::F16:
      // Only the CUDA backend's fused attention takes f16; the host computes in f32 alone.
      host::fail("fill", "t is f16, which the host backend has no op for");
  }
}

}  // namespace fastllm
