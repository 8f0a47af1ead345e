#pragma once
// Host-side helpers of the CUDA op files: argument checks (the same rules and exception type as
// the host backend) and CUDA status checks.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/backend.h"

namespace fastllm::cuda {

// Wrong shapes or dtypes are bugs in the caller, not user input, hence invalid_argument.
[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("CudaBackend::") + op + ": " + what);
}

inline void require(bool ok, const char* op, const char* what) {
  if (!ok) fail(op, what);
}

inline void require_dtype(const Tensor& t, DType dtype, const char* op, const char* name) {
  if (t.dtype != dtype)
    fail(op, std::string(name) + " is " + dtype_name(t.dtype) + ", expected " + dtype_name(dtype));
}

// F32 or BF16: the dtypes activations and weights may have.
inline void require_float(const Tensor& t, const char* op, const char* name) {
  if (t.dtype != DType::F32 && t.dtype != DType::BF16)
    fail(op, std::string(name) + " is " + dtype_name(t.dtype) + ", expected f32 or bf16");
}

inline void require_numel(const Tensor& t, std::int64_t n, const char* op, const char* name) {
  if (t.numel() != n)
    fail(op, std::string(name) + " has " + std::to_string(t.numel()) + " elements, expected " +
                 std::to_string(n));
}

inline bool is_empty(const Tensor& t) {
  return t.data == nullptr || t.numel() == 0;
}

inline std::int64_t row_width(const Tensor& t) {
  return t.rank == 0 ? 1 : t.size(-1);
}
inline std::int64_t row_count(const Tensor& t) {
  const std::int64_t width = row_width(t);
  return width == 0 ? 0 : t.numel() / width;
}

// The bf16 bit pattern of value, rounded to nearest even (a NaN stays a quiet NaN), on the host:
// the same rounding as f32_to_bf16 on the device.
inline std::uint16_t bf16_bits(float value) {
  std::uint32_t bits;
  static_assert(sizeof bits == sizeof value);
  __builtin_memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// A failed CUDA call is a broken device or driver, not a caller's bug: runtime_error.
inline void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ") in " + what + " at " + file + ":" +
                             std::to_string(line));
}

}  // namespace fastllm::cuda

#define FASTLLM_CUDA_CHECK(expr) ::fastllm::cuda::check((expr), #expr, __FILE__, __LINE__)
// After every kernel launch: a bad configuration shows up here, not at the next sync.
#define FASTLLM_CUDA_LAUNCHED() \
  ::fastllm::cuda::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
