// Copies with dtype conversion (f32, bf16 and f16, each way), and fill.
#include <string>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T e[4];
};

// Four elements per thread and access where both sides are aligned to four of their elements (the
// master-weight copies of every step), one at a time otherwise and for the tail.
template <class To, class From>
__global__ void convert_kernel(To* dst, const From* src, std::int64_t n, bool packed) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t first = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  std::int64_t tail = 0;
  if (packed) {
    const std::int64_t quads = n / 4;
    for (std::int64_t q = first; q < quads; q += stride) {
      const Quad<From> in = reinterpret_cast<const Quad<From>*>(src)[q];
      Quad<To> out;
#pragma unroll
      for (int v = 0; v < 4; ++v)
        out.e[v] = from_f32<To>(to_f32(in.e[v]));
      reinterpret_cast<Quad<To>*>(dst)[q] = out;
    }
    tail = quads * 4;
  }
  for (std::int64_t i = tail + first; i < n; i += stride)
    dst[i] = from_f32<To>(to_f32(src[i]));
}

// dispatch_float with f16 besides: the dtypes copy converts between.
template <class Body>
void dispatch_convertible(DType dtype, Body&& body) {
  if (dtype == DType::F16) {
    body.template operator()<f16>();
  } else {
    dispatch_float(dtype, "copy", body);
  }
}

template <class T>
__global__ void fill_kernel(T* dst, T value, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    dst[i] = value;
}

}  // namespace

void CudaBackend::copy(Tensor dst, Tensor src) {
  require_numel(dst, src.numel(), "copy", "destination");
  const std::int64_t n = src.numel();
  if (n == 0) return;
  if (dst.dtype == src.dtype) {
    if (dst.data != src.data)
      FASTLLM_CUDA_CHECK(
          cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  if (dst.dtype == DType::I32 || src.dtype == DType::I32)
    fail("copy",
         std::string("cannot convert ") + dtype_name(src.dtype) + " to " + dtype_name(dst.dtype));
  dispatch_convertible(dst.dtype, [&]<class To>() {
    dispatch_convertible(src.dtype, [&]<class From>() {
      const bool packed = reinterpret_cast<std::uintptr_t>(dst.data) % (4 * sizeof(To)) == 0 &&
                          reinterpret_cast<std::uintptr_t>(src.data) % (4 * sizeof(From)) == 0;
      convert_kernel<To, From><<<grid_for(packed ? n / 4 + 1 : n, 256), 256, 0, stream()>>>(
          dst.as<To>(), src.as<From>(), n, packed);
      FASTLLM_CUDA_LAUNCHED();
    });
  });
}

void CudaBackend::fill(Tensor t, float value) {
  const std::int64_t n = t.numel();
  if (n == 0) return;
  switch (t.dtype) {
    case DType::F32:
      fill_kernel<float><<<grid_for(n, 256), 256, 0, stream()>>>(t.as<float>(), value, n);
      break;
    case DType::I32:
      fill_kernel<std::int32_t><<<grid_for(n, 256), 256, 0, stream()>>>(
          t.as<std::int32_t>(), static_cast<std::int32_t>(value), n);
      break;
    case DType::BF16:
      fill_kernel<std::uint16_t>
          <<<grid_for(n, 256), 256, 0, stream()>>>(t.as<std::uint16_t>(), bf16_bits(value), n);
      break;
    case DType::F16:
      fail("fill", "t is f16, which only copy and cuDNN's fused attention take");
  }
  FASTLLM_CUDA_LAUNCHED();
}

}  // namespace fastllm::cuda
