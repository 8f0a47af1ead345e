#pragma once
// Shared by the host op files: argument checks and row geometry.
#include <omp.h>

#include <bit>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace fastllm::host {

// Wrong shapes or dtypes here are bugs in the caller, not user input, hence invalid_argument.
[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("HostBackend::") + op + ": " + what);
}

inline void require(bool ok, const char* op, const char* what) {
  if (!ok) fail(op, what);
}

inline void require_dtype(const Tensor& t, DType dtype, const char* op, const char* name) {
  if (t.dtype != dtype)
    fail(op, std::string(name) + " is " + dtype_name(t.dtype) + ", expected " + dtype_name(dtype));
}

inline void require_numel(const Tensor& t, std::int64_t n, const char* op, const char* name) {
  if (t.numel() != n)
    fail(op, std::string(name) + " has " + std::to_string(t.numel()) + " elements, expected " +
                 std::to_string(n));
}

// An optional argument left out: a default Tensor (no data) or one with no elements.
inline bool is_empty(const Tensor& t) {
  return t.data == nullptr || t.numel() == 0;
}

// The length of the last axis, and the number of rows before it.
inline std::int64_t row_width(const Tensor& t) {
  return t.rank == 0 ? 1 : t.size(-1);
}
inline std::int64_t row_count(const Tensor& t) {
  const std::int64_t width = row_width(t);
  return width == 0 ? 0 : t.numel() / width;
}

// The build targets baseline x86-64 (SSE2). Loops over exp and friends marked with this are
// compiled for AVX-512 and AVX2 besides the baseline, and the loader picks the best one the CPU
// runs (the vectoriser runs after cloning, so each clone is vectorised at its own width).
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define FASTLLM_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef FASTLLM_VECTOR_CLONES
#define FASTLLM_VECTOR_CLONES
#endif

// GCC does not if-convert selects on floats under the default -ftrapping-math (nor some integer
// ternaries), which would leave the loops calling these scalar: every select below is bit-mask
// arithmetic.

// e^x to about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (truncation under 1e-8 relative), 2^n through the exponent bits. x < -87 gives 0, x > 88
// saturates at e^88, NaN stays NaN.
inline float exp_lane(float x) {
  constexpr std::uint32_t kLowest = 0xC2AE0000u;  // -87.0f; bit patterns up to -inf lie below it
  constexpr std::uint32_t kMinusInfinity = 0xFF800000u;
  constexpr std::uint32_t kHighest = 0x42B00000u;  // 88.0f; bit patterns up to +inf lie above it
  constexpr std::uint32_t kInfinity = 0x7F800000u;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f;  // few mantissa bits, so n * kLn2High is exact
  constexpr float kLn2Low = -2.12194440054690583e-4f;
  constexpr float kRoundToInteger = 12582912.0f;  // 1.5 * 2^23
  std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t under =
      0u - static_cast<std::uint32_t>((bits > kLowest) & (bits <= kMinusInfinity));
  const std::uint32_t over =
      0u - static_cast<std::uint32_t>((bits > kHighest) & (bits <= kInfinity));
  bits = (bits & ~(under | over)) | (kLowest & under) | (kHighest & over);
  const float t = std::bit_cast<float>(bits);
  const float n = (t * kLog2e + kRoundToInteger) - kRoundToInteger;
  const float r = (t - n * kLn2High) - n * kLn2Low;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::uint32_t two_to_n = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127)
                                 << 23;
  return p * std::bit_cast<float>(two_to_n & ~under);
}

// An int32 whose order is the float order (NaN aside): negative floats get their magnitude bits
// flipped. Its own inverse.
inline std::int32_t ordered_bits(std::int32_t i) {
  return i ^ ((i >> 31) & 0x7fffffff);
}

// OpenBLAS's build configuration, the kernels it runs and its threading, for benchmark reports.
std::string blas_description();

// A parameter gradient [width] summed over rows by several threads: each thread adds into its own
// row of partial sums, and add_to() folds them into the gradient in thread order, so the result is
// the same on every run with the same thread count.
class ThreadPartials {
 public:
  explicit ThreadPartials(std::int64_t width)
      : width_(width), sums_(static_cast<std::size_t>(omp_get_max_threads() * width), 0.0f) {}
  // The calling thread's partial sums.
  float* local() { return sums_.data() + omp_get_thread_num() * width_; }
  void add_to(float* gradient) const {
    const std::int64_t threads = width_ == 0 ? 0 : static_cast<std::int64_t>(sums_.size()) / width_;
    for (std::int64_t j = 0; j < width_; ++j) {
      float total = 0.0f;
      for (std::int64_t t = 0; t < threads; ++t)
        total += sums_[t * width_ + j];
      gradient[j] += total;
    }
  }

 private:
  std::int64_t width_;
  std::vector<float> sums_;
};

}  // namespace fastllm::host
