#pragma once
// Every kernel test body runs against every backend this build has; a backend whose device is
// absent (CUDA without a GPU) is skipped with a message.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/backend_factory.h"
#include "kernels/host/host_backend.h"
#include "support/numeric.h"

namespace fastllm::test {

inline std::vector<std::string> backend_names() {
  return built_backends();
}

// CUDA runs the tests in fp32 (TF32 off), held to the host's tolerances.
inline std::shared_ptr<Backend> make_backend(const std::string& name) {
  if (name == "host") return std::make_shared<HostBackend>();
  if (!backend_available(name)) return nullptr;
  return ::fastllm::make_backend(name, DType::F32);
}

class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    backend_ = make_backend(GetParam());
    if (!backend_) GTEST_SKIP() << "backend " << GetParam() << " has no device here";
  }
  Backend& be() { return *backend_; }

  // A device tensor holding the given host values.
  Tensor upload(const std::vector<float>& values, std::initializer_list<std::int64_t> shape) {
    buffers_.push_back(backend_->allocate(values.size() * sizeof(float) + 1));
    Tensor t = buffers_.back().tensor(DType::F32, shape);
    backend_->copy_from_host(t, values.data());
    return t;
  }
  Tensor upload_ints(const std::vector<std::int32_t>& values,
                     std::initializer_list<std::int64_t> shape) {
    buffers_.push_back(backend_->allocate(values.size() * sizeof(std::int32_t) + 1));
    Tensor t = buffers_.back().tensor(DType::I32, shape);
    backend_->copy_from_host(t, values.data());
    return t;
  }
  Tensor zeros(std::initializer_list<std::int64_t> shape, DType dtype = DType::F32) {
    std::int64_t n = 1;
    for (auto d : shape)
      n *= d;
    buffers_.push_back(backend_->allocate(static_cast<std::size_t>(n) * dtype_size(dtype) + 1));
    Tensor t = buffers_.back().tensor(dtype, shape);
    backend_->fill(t, 0.0f);
    return t;
  }
  std::vector<float> download(Tensor t) {
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    backend_->copy_to_host(out.data(), t);
    return out;
  }
  std::vector<std::int32_t> download_ints(Tensor t) {
    std::vector<std::int32_t> out(static_cast<std::size_t>(t.numel()));
    backend_->copy_to_host(out.data(), t);
    return out;
  }

 private:
  std::shared_ptr<Backend> backend_;
  std::vector<Buffer> buffers_;
};

inline std::vector<double> to_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// The gradient of a scalar function by central differences in double precision:
// (f(x + h e_i) - f(x - h e_i)) / 2h for every i. f may read x but must leave it unchanged.
inline std::vector<double> central_difference(
    const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
    double h = 1e-6) {
  std::vector<double> grad(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = f(x);
    x[i] = saved - h;
    const double down = f(x);
    x[i] = saved;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

#define FASTLLM_INSTANTIATE_BACKENDS(suite) \
  INSTANTIATE_TEST_SUITE_P(Backends, suite, ::testing::ValuesIn(::fastllm::test::backend_names()))

}  // namespace fastllm::test
