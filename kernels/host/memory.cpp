#include <bit>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

constexpr std::size_t kAlignment = 64;

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
  // aligned_alloc wants a non-zero multiple of the alignment.
  const std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* data = std::aligned_alloc(kAlignment, rounded == 0 ? kAlignment : rounded);
  if (!data) throw std::bad_alloc();
  return Buffer(data, bytes, [](void* p) { std::free(p); });
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
  }
}

}  // namespace fastllm
