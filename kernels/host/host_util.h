#pragma once
// Shared by the host op files: argument checks and row geometry.
#include <omp.h>

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
