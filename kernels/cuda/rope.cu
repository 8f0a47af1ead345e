// Rotary embedding, half-split convention, in place on x [batch, seq, heads, head_dim], with the
// host backend's cos/sin tables; x[b, s] at position s, or at positions[b, s] (packed documents).
#include <string>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

template <class T>
__global__ void rope_kernel(T* x, const float* cos, const float* sin, const std::int32_t* positions,
                            std::int64_t rows, std::int64_t seq, std::int64_t heads,
                            std::int64_t half, float sign) {
  const std::int64_t n = rows * heads * half;
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = idx % half;
    const std::int64_t row_head = idx / half;  // (b * seq + s) * heads + h
    const std::int64_t s = positions ? positions[row_head / heads] : row_head / heads % seq;
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

// The positions, 0 <= positions[b, s] <= s, are trusted: the host checked them where they were
// made.
void rotate(CudaBackend& backend, const char* op, Tensor x, const std::int32_t* positions,
            double theta, bool inverse) {
  require_float(x, op, "x");
  if (x.rank != 4)
    fail(op, "x has rank " + std::to_string(x.rank) + ", expected 4 [batch, seq, heads, head_dim]");
  const std::int64_t batch = x.size(0);
  const std::int64_t seq = x.size(1);
  const std::int64_t heads = x.size(2);
  const std::int64_t dim = x.size(3);
  if (dim % 2 != 0) fail(op, "head_dim is " + std::to_string(dim) + ", expected even");
  if (!(theta > 0.0)) fail(op, "theta is " + std::to_string(theta) + ", expected > 0");
  if (x.numel() == 0) return;
  const float* cos = backend.rope_table(theta, seq, dim, false);
  const float* sin = backend.rope_table(theta, seq, dim, true);
  const std::int64_t half = dim / 2;
  // The inverse rotation is the transpose, i.e. the same rotation with sin negated.
  const float sign = inverse ? -1.0f : 1.0f;
  dispatch_float(x.dtype, op, [&]<class T>() {
    rope_kernel<T><<<grid_for(batch * seq * heads * half, 256), 256, 0, backend.stream()>>>(
        x.as<T>(), cos, sin, positions, batch * seq, seq, heads, half, sign);
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace

void CudaBackend::rope(Tensor x, double theta, bool inverse) {
  rotate(*this, "rope", x, nullptr, theta, inverse);
}

void CudaBackend::rope_positions(Tensor x, Tensor positions, double theta, bool inverse) {
  require_dtype(positions, DType::I32, "rope_positions", "positions");
  if (positions.rank != 2 || x.rank != 4 || positions.dims[0] != x.dims[0] ||
      positions.dims[1] != x.dims[1])
    fail("rope_positions", "positions has " + std::to_string(positions.numel()) +
                               " elements in rank " + std::to_string(positions.rank) +
                               ", expected [batch, seq] of x");
  rotate(*this, "rope_positions", x, positions.as<std::int32_t>(), theta, inverse);
}

}  // namespace fastllm::cuda
