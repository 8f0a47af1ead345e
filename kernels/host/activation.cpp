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

// SiLU, x sigmoid(x), and its derivative on one lane; exp_lane lets the loops vectorise.
inline float silu(float x) {
  return x / (1.0f + host::exp_lane(-x));
}

inline float silu_grad(float x) {
  const float s = 1.0f / (1.0f + host::exp_lane(-x));
  return s * (1.0f + x * (1.0f - s));
}

// GeLU, the exact erf form (transformers' "gelu"), not the tanh estimate, and its derivative.
// glibc has no vector erf, so its loops stay scalar.
float gelu(float x) {
  return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2));
}

float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + std::erf(x * kInvSqrt2));
  return cdf + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
}

// The loops over one thread's range of n elements. Outputs may alias inputs index for index, so
// each iteration reads all of its inputs before it writes.
FASTLLM_VECTOR_CLONES
void silu_forward(const float* x, float* y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = silu(x[i]);
}

FASTLLM_VECTOR_CLONES
void silu_backward(const float* x, const float* dy, float* dx, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i)
    dx[i] = dy[i] * silu_grad(x[i]);
}

FASTLLM_VECTOR_CLONES
void swiglu_forward(const float* gate, const float* up, float* y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = silu(gate[i]) * up[i];
}

FASTLLM_VECTOR_CLONES
void swiglu_backward(const float* gate, const float* up, const float* dy, float* dgate, float* dup,
                     std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float u = up[i];
    const float d = dy[i];
    // One exponential for both outputs: silu(g) = g / (1 + e), sigmoid(g) = 1 / (1 + e).
    const float e = host::exp_lane(-g);
    const float s = 1.0f / (1.0f + e);
    dgate[i] = d * u * (s * (1.0f + g * (1.0f - s)));
    dup[i] = d * (g / (1.0f + e));
  }
}

void gelu_forward(const float* x, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = gelu(x[i]);
}

void gelu_backward(const float* x, const float* dy, float* dx, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    dx[i] = dy[i] * gelu_grad(x[i]);
}

void geglu_forward(const float* gate, const float* up, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = gelu(gate[i]) * up[i];
}

void geglu_backward(const float* gate, const float* up, const float* dy, float* dgate, float* dup,
                    std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float u = up[i];
    const float d = dy[i];
    dgate[i] = d * u * gelu_grad(g);
    dup[i] = d * gelu(g);
  }
}

// Splits [0, n) into one contiguous range per thread and calls body(begin, count) on each.
template <class Body>
void parallel_ranges(std::int64_t n, Body&& body) {
#pragma omp parallel if (n > kParallelMin)
  {
    const std::int64_t threads = omp_get_num_threads();
    const std::int64_t t = omp_get_thread_num();
    const std::int64_t begin = n * t / threads;
    const std::int64_t end = n * (t + 1) / threads;
    if (end > begin) body(begin, end - begin);
  }
}

void require_f32(const char* op, Activation kind, std::initializer_list<const Tensor*> tensors,
                 std::int64_t n) {
  if (kind != Activation::SiLU && kind != Activation::GeLU)
    host::fail(op, "unknown activation kind");
  for (const Tensor* t : tensors) {
    host::require_dtype(*t, DType::F32, op, "a tensor");
    host::require_numel(*t, n, op, "a tensor");
  }
}

}  // namespace

void HostBackend::activation_forward(Activation kind, Tensor x, Tensor y) {
  const std::int64_t n = x.numel();
  require_f32("activation_forward", kind, {&x, &y}, n);
  const float* in = x.as<float>();
  float* out = y.as<float>();
  parallel_ranges(n, [&](std::int64_t b, std::int64_t c) {
    if (kind == Activation::SiLU) {
      silu_forward(in + b, out + b, c);
    } else {
      gelu_forward(in + b, out + b, c);
    }
  });
}

void HostBackend::activation_backward(Activation kind, Tensor x, Tensor dy, Tensor dx) {
  const std::int64_t n = x.numel();
  require_f32("activation_backward", kind, {&x, &dy, &dx}, n);
  const float* in = x.as<float>();
  const float* grad = dy.as<float>();
  float* out = dx.as<float>();
  parallel_ranges(n, [&](std::int64_t b, std::int64_t c) {
    if (kind == Activation::SiLU) {
      silu_backward(in + b, grad + b, out + b, c);
    } else {
      gelu_backward(in + b, grad + b, out + b, c);
    }
  });
}

void HostBackend::gated_forward(Activation kind, Tensor gate, Tensor up, Tensor y) {
  const std::int64_t n = gate.numel();
  require_f32("gated_forward", kind, {&gate, &up, &y}, n);
  const float* g = gate.as<float>();
  const float* u = up.as<float>();
  float* out = y.as<float>();
  parallel_ranges(n, [&](std::int64_t b, std::int64_t c) {
    if (kind == Activation::SiLU) {
      swiglu_forward(g + b, u + b, out + b, c);
    } else {
      geglu_forward(g + b, u + b, out + b, c);
    }
  });
}

void HostBackend::gated_backward(Activation kind, Tensor gate, Tensor up, Tensor dy, Tensor dgate,
                                 Tensor dup) {
  const std::int64_t n = gate.numel();
  require_f32("gated_backward", kind, {&gate, &up, &dy, &dgate, &dup}, n);
  const float* g = gate.as<float>();
  const float* u = up.as<float>();
  const float* grad = dy.as<float>();
  float* dg = dgate.as<float>();
  float* du = dup.as<float>();
  parallel_ranges(n, [&](std::int64_t b, std::int64_t c) {
    if (kind == Activation::SiLU) {
      swiglu_backward(g + b, u + b, grad + b, dg + b, du + b, c);
    } else {
      geglu_backward(g + b, u + b, grad + b, dg + b, du + b, c);
    }
  });
}

}  // namespace fastllm
