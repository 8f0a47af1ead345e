// Rotary embedding, half-split convention, in place on x [batch, seq, heads, head_dim], with the
// host backend's cos/sin tables.
#include <string>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

template <class T>
__global__ void rope_kernel(T* x, const float* cos, const float* sin, std::int64_t rows,
                            std::int64_t seq, std::int64_t heads, std::int64_t half, float sign) {
  const std::int64_t n = rows * heads * half;
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = idx % half;
    const std::int64_t row_head = idx / half;  // (b * seq + s) * heads + h
    const std::int64_t s = row_head / heads % seq;
    T* x1 = x + row_head * 2 * half + i;
    T* x2 = x1 + half;
    const float a = to_f32(*x1);
    const float b = to_f32(*x2);
    const float c = cos[s * half + i];
    const float si = sign * sin[s * half + i];
    // transformers: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
    *x1 = from_f32<T>(a * c - b * si);
    *x2 = from_f32<T>(b * c + a * si);
  }
}

}  // namespace

void CudaBackend::rope(Tensor x, double theta, bool inverse) {
  require_float(x, "rope", "x");
  if (x.rank != 4)
    fail("rope",
         "x has rank " + std::to_string(x.rank) + ", expected 4 [batch, seq, heads, head_dim]");
  const std::int64_t batch = x.size(0);
  const std::int64_t seq = x.size(1);
  const std::int64_t heads = x.size(2);
  const std::int64_t dim = x.size(3);
  if (dim % 2 != 0) fail("rope", "head_dim is " + std::to_string(dim) + ", expected even");
  if (!(theta > 0.0)) fail("rope", "theta is " + std::to_string(theta) + ", expected > 0");
  if (x.numel() == 0) return;
  const float* cos = rope_table(theta, seq, dim, false);
  const float* sin = rope_table(theta, seq, dim, true);
  const std::int64_t half = dim / 2;
  // The inverse rotation is the transpose, i.e. the same rotation with sin negated.
  const float sign = inverse ? -1.0f : 1.0f;
  dispatch_float(x.dtype, "rope", [&]<class T>() {
    rope_kernel<T><<<grid_for(batch * seq * heads * half, 256), 256, 0, stream()>>>(
        x.as<T>(), cos, sin, batch * seq, seq, heads, half, sign);
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
