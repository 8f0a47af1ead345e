#pragma once
// The CUDA backend's public face: nothing here needs the CUDA headers, so code outside
// kernels/cuda compiles with any C++ compiler.
#include <cstdint>
#include <memory>

#include "kernels/backend.h"

namespace fastllm {

// True when the CUDA runtime sees at least one device.
bool cuda_device_available();

// A backend on one GPU computing in `compute` (BF16, or F32 with TF32 off for exact results).
// device < 0 picks the device from the launcher's local rank (OMPI_COMM_WORLD_LOCAL_RANK,
// MPI_LOCALRANKID, SLURM_LOCALID) modulo the device count, else device 0. Throws
// std::runtime_error when no device is present. `attention` picks the attention kernel.
std::unique_ptr<Backend> make_cuda_backend(DType compute, int device = -1,
                                           AttentionKernel attention = AttentionKernel::Cudnn);

// The cudaStream_t every op of a CUDA backend runs on, for collectives that must stay ordered
// with them; throws std::invalid_argument for another backend.
void* cuda_stream(Backend& backend);

// Device memory of a CUDA backend: bytes held by live buffers now, their peak since the backend
// was made, and bytes the caching allocator keeps for reuse.
struct CudaMemoryStats {
  std::size_t in_use = 0;
  std::size_t peak = 0;
  std::size_t cached = 0;
};
CudaMemoryStats cuda_memory_stats(Backend& backend);

// What ran where on a CUDA backend since it was made: GEMMs cuBLASLt had no algorithm for (run by
// the own, slow kernel; each shape is also reported once on stderr), linear layers whose bias or
// bias gradient cuBLASLt could not fuse into the GEMM as an epilogue (run as the plain GEMM and
// the bias kernel; reported alike), and attention calls (forward and backward each count) run by
// cuDNN's fused SDPA or by the own kernel.
struct CudaKernelStats {
  std::int64_t gemm_fallbacks = 0;
  std::int64_t epilogue_fallbacks = 0;
  std::int64_t cudnn_attention = 0;
  std::int64_t own_attention = 0;
};
CudaKernelStats cuda_kernel_stats(Backend& backend);

}  // namespace fastllm
