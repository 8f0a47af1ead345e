// MLP activations (SiLU, exact-erf GeLU) and the gated form act(gate) * up.
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/map.cuh"

namespace fastllm::cuda {
namespace {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // the standard normal density at 0

template <Activation K>
__device__ __forceinline__ float act(float x) {
  if constexpr (K == Activation::SiLU) {
    return x / (1.0f + expf(-x));
  } else {
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  }
}

template <Activation K>
__device__ __forceinline__ float act_grad(float x) {
  if constexpr (K == Activation::SiLU) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
  } else {
    const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
    return cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  }
}

template <Activation K>
struct ActivationForward {
  __device__ void operator()(const float* x, float* y) const { y[0] = act<K>(x[0]); }
};

// (x, dy) -> dx
template <Activation K>
struct ActivationBackward {
  __device__ void operator()(const float* in, float* dx) const {
    dx[0] = in[1] * act_grad<K>(in[0]);
  }
};

// (gate, up) -> y. As transformers in a bf16 model: act(gate) is rounded to the dtype before the
// product.
template <Activation K, class T>
struct GatedForward {
  __device__ void operator()(const float* in, float* y) const {
    y[0] = round_to<T>(act<K>(in[0])) * in[1];
  }
};

// (gate, up, dy) -> (dgate, dup)
template <Activation K>
struct GatedBackward {
  __device__ void operator()(const float* in, float* out) const {
    out[0] = in[2] * in[1] * act_grad<K>(in[0]);
    out[1] = in[2] * act<K>(in[0]);
  }
};

// Runs body.template operator()<K, T>() for the runtime kind and dtype.
template <class Body>
void dispatch(Activation kind, DType dtype, const char* op, Body&& body) {
  dispatch_float(dtype, op, [&]<class T>() {
    switch (kind) {
      case Activation::SiLU:
        body.template operator()<Activation::SiLU, T>();
        return;
      case Activation::GeLU:
        body.template operator()<Activation::GeLU, T>();
        return;
    }
    fail(op, "unknown activation kind");
  });
}

void require_same(const char* op, std::initializer_list<const Tensor*> tensors) {
  const Tensor& first = **tensors.begin();
  require_float(first, op, "a tensor");
  for (const Tensor* t : tensors) {
    require_dtype(*t, first.dtype, op, "a tensor");
    require_numel(*t, first.numel(), op, "a tensor");
  }
}

}  // namespace

void CudaBackend::activation_forward(Activation kind, Tensor x, Tensor y) {
  require_same("activation_forward", {&x, &y});
  const std::int64_t n = x.numel();
  if (n == 0) return;
  dispatch(kind, x.dtype, "activation_forward", [&]<Activation K, class T>() {
    map<T, 1, 1>(*this, {x.as<T>()}, {y.as<T>()}, n, ActivationForward<K>{});
  });
}

void CudaBackend::activation_backward(Activation kind, Tensor x, Tensor dy, Tensor dx) {
  require_same("activation_backward", {&x, &dy, &dx});
  const std::int64_t n = x.numel();
  if (n == 0) return;
  dispatch(kind, x.dtype, "activation_backward", [&]<Activation K, class T>() {
    map<T, 2, 1>(*this, {x.as<T>(), dy.as<T>()}, {dx.as<T>()}, n, ActivationBackward<K>{});
  });
}

void CudaBackend::gated_forward(Activation kind, Tensor gate, Tensor up, Tensor y) {
  require_same("gated_forward", {&gate, &up, &y});
  const std::int64_t n = gate.numel();
  if (n == 0) return;
  dispatch(kind, gate.dtype, "gated_forward", [&]<Activation K, class T>() {
    map<T, 2, 1>(*this, {gate.as<T>(), up.as<T>()}, {y.as<T>()}, n, GatedForward<K, T>{});
  });
}

void CudaBackend::gated_backward(Activation kind, Tensor gate, Tensor up, Tensor dy, Tensor dgate,
                                 Tensor dup) {
  require_same("gated_backward", {&gate, &up, &dy, &dgate, &dup});
  const std::int64_t n = gate.numel();
  if (n == 0) return;
  dispatch(kind, gate.dtype, "gated_backward", [&]<Activation K, class T>() {
    map<T, 3, 2>(*this, {gate.as<T>(), up.as<T>(), dy.as<T>()}, {dgate.as<T>(), dup.as<T>()}, n,
                 GatedBackward<K>{});
  });
}

}  // namespace fastllm::cuda
