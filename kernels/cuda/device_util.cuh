#pragma once
// Device-side helpers shared by the op files: bf16 <-> f32, reductions, dtype dispatch and launch
// geometry.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_util.h"

namespace fastllm::cuda {

using bf16 = __nv_bfloat16;
// Only copy converts to and from f16 (the input dtype of cuDNN's fused attention); no op computes
// in it, and dispatch_float rejects it.
using f16 = __half;

__device__ __forceinline__ float to_f32(float x) {
  return x;
}
__device__ __forceinline__ float to_f32(bf16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_f32(f16 x) {
  return __half2float(x);
}

// Round to nearest even, as the host backend and PyTorch do; a NaN stays a quiet NaN.
__device__ __forceinline__ bf16 f32_to_bf16(float value) {
  const unsigned bits = __float_as_uint(value);
  unsigned short half;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    half = static_cast<unsigned short>((bits >> 16) | 0x40u);
  } else {
    half = static_cast<unsigned short>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  return __ushort_as_bfloat16(half);
}

template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  return f32_to_bf16(x);
}
// Round to nearest even, as the host's _Float16 and PyTorch do.
template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
  return __float2half_rn(x);
}

// Rounds x to T and back: what storing in T and reading again gives.
template <class T>
__device__ __forceinline__ float round_to(float x) {
  return to_f32(from_f32<T>(x));
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The sum of v over the block, returned to every thread; `shared` holds 32 values. The sum's
// order is fixed by the block size alone, so results repeat bit for bit.
template <class T>
__device__ T block_sum(T v, T* shared) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // an earlier call may still read shared
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? shared[lane] : T(0);
  v = warp_sum(v);
  return v;
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? shared[lane] : -INFINITY;
  return warp_max(v);
}

// Runs body.template operator()<T>() with T the element type of a float dtype.
template <class Body>
void dispatch_float(DType dtype, const char* op, Body&& body) {
  switch (dtype) {
    case DType::F32:
      body.template operator()<float>();
      return;
    case DType::BF16:
      body.template operator()<bf16>();
      return;
    case DType::I32:
    case DType::F16:
      break;
  }
  fail(op, std::string("tensor is ") + dtype_name(dtype) + ", expected f32 or bf16");
}

// Blocks for a grid-stride loop over n items.
inline unsigned grid_for(std::int64_t n, int threads) {
  const std::int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<std::int64_t>(blocks, 1, std::int64_t{1} << 20));
}

}  // namespace fastllm::cuda
