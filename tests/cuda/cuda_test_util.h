#pragma once
// The GPU tests: the CUDA backend (fp32 or bf16 compute) against the host backend on the same
// inputs. Every test skips with a message where no CUDA device is present (CI, a laptop); they run
// for real in benchmarks/gpu/run.sh on the GPU machine.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/host/host_backend.h"
#include "support/numeric.h"

namespace fastllm::test {

inline const char* kNoDevice =
    "no CUDA device here: the GPU tests run on a GPU machine (benchmarks/gpu/run.sh)";

inline Tensor shaped(void* data, DType dtype, const std::vector<std::int64_t>& shape) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.rank = static_cast<int>(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i)
    t.dims[i] = shape[i];
  return t;
}

inline std::int64_t count(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape)
    n *= d;
  return n;
}

// A CUDA backend computing in `dtype` beside the host backend, with helpers that put the same
// values on both.
class CudaVsHost {
 public:
  explicit CudaVsHost(DType dtype, AttentionKernel attention = AttentionKernel::Cudnn)
      : dtype_(dtype), cuda_(make_cuda_backend(dtype, -1, attention)) {}

  Backend& cuda() { return *cuda_; }
  HostBackend& host() { return host_; }
  DType dtype() const { return dtype_; }
  // The agreement expected of one op: fp32 arithmetic, or bf16 storage of inputs and outputs.
  double tolerance() const { return dtype_ == DType::F32 ? 1e-5 : 2e-2; }

  // The values as a tensor of `dtype` holds them (bf16 keeps 8 significant bits, f16 11 and
  // 5 exponent bits; f16 rounded by the host compiler's _Float16, independently of the device).
  std::vector<float> representable(const std::vector<float>& v, DType dtype) {
    if (dtype == DType::F16) {
      std::vector<float> out(v.size());
      for (std::size_t i = 0; i < v.size(); ++i)
        out[i] = static_cast<float>(static_cast<_Float16>(v[i]));
      return out;
    }
    if (dtype != DType::BF16) return v;
    std::vector<float> out(v.size());
    std::vector<std::uint16_t> half(v.size());
    const auto n = static_cast<std::int64_t>(v.size());
    host_.copy(Tensor(half.data(), DType::BF16, {n}),
               Tensor(const_cast<float*>(v.data()), DType::F32, {n}));
    host_.copy(Tensor(out.data(), DType::F32, {n}), Tensor(half.data(), DType::BF16, {n}));
    return out;
  }

  // A device tensor of `dtype` holding v (rounded to it).
  Tensor device(const std::vector<float>& v, const std::vector<std::int64_t>& shape, DType dtype) {
    Tensor staging = device_raw(shape, DType::F32);
    cuda_->copy_from_host(staging, v.data());
    if (dtype == DType::F32) return staging;
    Tensor t = device_raw(shape, dtype);
    cuda_->copy(t, staging);
    return t;
  }
  Tensor device(const std::vector<float>& v, const std::vector<std::int64_t>& shape) {
    return device(v, shape, dtype_);
  }
  Tensor device_ints(const std::vector<std::int32_t>& v, const std::vector<std::int64_t>& shape) {
    Tensor t = device_raw(shape, DType::I32);
    cuda_->copy_from_host(t, v.data());
    return t;
  }
  // Uninitialised device memory, poisoned with NaN so that unwritten outputs show.
  Tensor device_poisoned(const std::vector<std::int64_t>& shape, DType dtype) {
    // fill takes no f16 (only copy and cuDNN's attention do): NaN copied from f32.
    if (dtype == DType::F16) return device(std::vector<float>(count(shape), NAN), shape, dtype);
    Tensor t = device_raw(shape, dtype);
    cuda_->fill(t, dtype == DType::I32 ? -7.0f : NAN);
    return t;
  }
  std::vector<float> read(Tensor t) {
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    if (t.dtype == DType::F32) {
      cuda_->copy_to_host(out.data(), t);
    } else {
      Tensor staging = device_raw({t.numel()}, DType::F32);
      cuda_->copy(staging, t.view({t.numel()}));
      cuda_->copy_to_host(out.data(), staging);
    }
    return out;
  }
  std::vector<std::int32_t> read_ints(Tensor t) {
    std::vector<std::int32_t> out(static_cast<std::size_t>(t.numel()));
    cuda_->copy_to_host(out.data(), t);
    return out;
  }

  // A host tensor over a vector the test keeps.
  Tensor on_host(std::vector<float>& v, const std::vector<std::int64_t>& shape) {
    return shaped(v.data(), DType::F32, shape);
  }
  Tensor on_host_ints(std::vector<std::int32_t>& v, const std::vector<std::int64_t>& shape) {
    return shaped(v.data(), DType::I32, shape);
  }

 private:
  Tensor device_raw(const std::vector<std::int64_t>& shape, DType dtype) {
    const std::int64_t n = count(shape);
    buffers_.push_back(cuda_->allocate(static_cast<std::size_t>(n) * dtype_size(dtype)));
    return shaped(buffers_.back().data(), dtype, shape);
  }

  DType dtype_;
  HostBackend host_;
  std::unique_ptr<Backend> cuda_;
  std::vector<Buffer> buffers_;
};

inline std::string dtype_test_name(const ::testing::TestParamInfo<DType>& info) {
  return info.param == DType::F32 ? "fp32" : "bf16";
}

}  // namespace fastllm::test
