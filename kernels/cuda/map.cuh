#pragma once
// Element-wise maps over tensors of one dtype: out_b[i] = op(in_0[i], ...)_b. Where every pointer
// is 16-byte aligned, each thread moves 16 bytes per tensor at a time (8 bf16 or 4 f32 values);
// the tail, and unaligned tensors, go one element at a time. A thread reads all its inputs before
// it writes, so outputs may alias inputs.
#include <array>
#include <cstdint>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {

template <class P, int N>
struct Pointers {
  P p[N];
};

template <class T, int kIn, int kOut, class Op>
__global__ void map_kernel(Pointers<const T*, kIn> in, Pointers<T*, kOut> out, std::int64_t n,
                           Op op, bool packed) {
  constexpr int kPack = 16 / sizeof(T);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t first = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  std::int64_t tail = 0;
  if (packed) {
    const std::int64_t packs = n / kPack;
    for (std::int64_t p = first; p < packs; p += stride) {
      float x[kIn][kPack];
#pragma unroll
      for (int a = 0; a < kIn; ++a) {
        const uint4 raw = *reinterpret_cast<const uint4*>(in.p[a] + p * kPack);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int v = 0; v < kPack; ++v)
          x[a][v] = to_f32(e[v]);
      }
      uint4 raw[kOut];
#pragma unroll
      for (int v = 0; v < kPack; ++v) {
        float xi[kIn];
        float yi[kOut];
#pragma unroll
        for (int a = 0; a < kIn; ++a)
          xi[a] = x[a][v];
        op(xi, yi);
#pragma unroll
        for (int b = 0; b < kOut; ++b)
          reinterpret_cast<T*>(&raw[b])[v] = from_f32<T>(yi[b]);
      }
#pragma unroll
      for (int b = 0; b < kOut; ++b)
        *reinterpret_cast<uint4*>(out.p[b] + p * kPack) = raw[b];
    }
    tail = packs * kPack;
  }
  for (std::int64_t i = tail + first; i < n; i += stride) {
    float xi[kIn];
    float yi[kOut];
#pragma unroll
    for (int a = 0; a < kIn; ++a)
      xi[a] = to_f32(in.p[a][i]);
    op(xi, yi);
#pragma unroll
    for (int b = 0; b < kOut; ++b)
      out.p[b][i] = from_f32<T>(yi[b]);
  }
}

template <class T, int kIn, int kOut, class Op>
void map(CudaBackend& be, const std::array<const T*, kIn>& in, const std::array<T*, kOut>& out,
         std::int64_t n, Op op) {
  if (n == 0) return;
  bool packed = true;
  Pointers<const T*, kIn> ins{};
  Pointers<T*, kOut> outs{};
  for (int a = 0; a < kIn; ++a) {
    ins.p[a] = in[a];
    packed = packed && reinterpret_cast<std::uintptr_t>(in[a]) % 16 == 0;
  }
  for (int b = 0; b < kOut; ++b) {
    outs.p[b] = out[b];
    packed = packed && reinterpret_cast<std::uintptr_t>(out[b]) % 16 == 0;
  }
  constexpr int kThreads = 256;
  const std::int64_t items = packed ? n / static_cast<std::int64_t>(16 / sizeof(T)) + 1 : n;
  map_kernel<T, kIn, kOut, Op>
      <<<grid_for(items, kThreads), kThreads, 0, be.stream()>>>(ins, outs, n, op, packed);
  FASTLLM_CUDA_LAUNCHED();
}

}  // namespace fastllm::cuda
