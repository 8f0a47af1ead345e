#include <cmath>
#include <numbers>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

constexpr std::int64_t kParallelMin = 1 << 14;
constexpr auto kInvSqrt2 = static_cast<float>(1.0 / std::numbers::sqrt2);
// 1 / sqrt(2 pi), the standard normal density at 0.
constexpr auto kInvSqrt2Pi = static_cast<float>(std::numbers::inv_sqrtpi / std::numbers::sqrt2);

// act(x) and act'(x). GeLU is the exact erf form (transformers' "gelu"), not the tanh estimate.
template <Activation K>
float act(float x) {
  if constexpr (K == Activation::SiLU) {
    return x / (1.0f + std::exp(-x));
  } else {
    return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2));
  }
}

template <Activation K>
float act_grad(float x) {
  if constexpr (K == Activation::SiLU) {
    const float s = 1.0f / (1.0f + std::exp(-x));
    return s * (1.0f + x * (1.0f - s));
  } else {
    const float cdf = 0.5f * (1.0f + std::erf(x * kInvSqrt2));
    return cdf + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
  }
}

// Runs body.template operator()<K>() for the runtime kind.
template <class Body>
void dispatch(Activation kind, Body&& body) {
  switch (kind) {
    case Activation::SiLU:
      body.template operator()<Activation::SiLU>();
      return;
    case Activation::GeLU:
      body.template operator()<Activation::GeLU>();
      return;
  }
  host::fail("activation", "unknown activation kind");
}

void require_f32(const char* op, std::initializer_list<const Tensor*> tensors, std::int64_t n) {
  for (const Tensor* t : tensors) {
    host::require_dtype(*t, DType::F32, op, "a tensor");
    host::require_numel(*t, n, op, "a tensor");
  }
}

}  // namespace

void HostBackend::activation_forward(Activation kind, Tensor x, Tensor y) {
  const std::int64_t n = x.numel();
  require_f32("activation_forward", {&x, &y}, n);
  const float* in = x.as<float>();
  float* out = y.as<float>();
  dispatch(kind, [&]<Activation K>() {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (std::int64_t i = 0; i < n; ++i)
      out[i] = act<K>(in[i]);
  });
}

void HostBackend::activation_backward(Activation kind, Tensor x, Tensor dy, Tensor dx) {
  const std::int64_t n = x.numel();
  require_f32("activation_backward", {&x, &dy, &dx}, n);
  const float* in = x.as<float>();
  const float* grad = dy.as<float>();
  float* out = dx.as<float>();
  dispatch(kind, [&]<Activation K>() {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (std::int64_t i = 0; i < n; ++i)
      out[i] = grad[i] * act_grad<K>(in[i]);
  });
}

void HostBackend::gated_forward(Activation kind, Tensor gate, Tensor up, Tensor y) {
  const std::int64_t n = gate.numel();
  require_f32("gated_forward", {&gate, &up, &y}, n);
  const float* g = gate.as<float>();
  const float* u = up.as<float>();
  float* out = y.as<float>();
  dispatch(kind, [&]<Activation K>() {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (std::int64_t i = 0; i < n; ++i)
      out[i] = act<K>(g[i]) * u[i];
  });
}

void HostBackend::gated_backward(Activation kind, Tensor gate, Tensor up, Tensor dy, Tensor dgate,
                                 Tensor dup) {
  const std::int64_t n = gate.numel();
  require_f32("gated_backward", {&gate, &up, &dy, &dgate, &dup}, n);
  const float* g = gate.as<float>();
  const float* u = up.as<float>();
  const float* grad = dy.as<float>();
  float* dg = dgate.as<float>();
  float* du = dup.as<float>();
  dispatch(kind, [&]<Activation K>() {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (std::int64_t i = 0; i < n; ++i) {
      // Read everything first: dgate or dup may share memory with gate, up or dy.
      const float gv = g[i];
      const float uv = u[i];
      const float dyv = grad[i];
      dg[i] = dyv * uv * act_grad<K>(gv);
      du[i] = dyv * act<K>(gv);
    }
  });
}

}  // namespace fastllm
