#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/gemm_plan.h"

namespace fastllm {
namespace {

constexpr std::size_t kGemmWorkspace = std::size_t{32} << 20;

// The launcher's node-local rank, so that each rank of a node takes its own GPU.
int local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    if (const char* value = std::getenv(name)) return std::atoi(value);
  }
  return 0;
}

}  // namespace

bool cuda_device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error to keep
    return false;
  }
  return count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(DType compute, int device, AttentionKernel attention) {
  if (compute != DType::F32 && compute != DType::BF16)
    throw std::invalid_argument(std::string("make_cuda_backend: compute dtype ") +
                                dtype_name(compute) + ", expected f32 or bf16");
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no CUDA device: ") + (status == cudaSuccess
                                                                    ? "the driver reports 0 devices"
                                                                    : cudaGetErrorString(status)));
  }
  if (device < 0) device = local_rank() % count;
  if (device >= count)
    throw std::invalid_argument("make_cuda_backend: device " + std::to_string(device) +
                                ", expected < " + std::to_string(count));
  return std::make_unique<cuda::CudaBackend>(compute, device, attention);
}

void* cuda_stream(Backend& backend) {
  return cuda::as_cuda(backend).stream();
}

CudaMemoryStats cuda_memory_stats(Backend& backend) {
  return cuda::as_cuda(backend).memory_stats();
}

CudaKernelStats cuda_kernel_stats(Backend& backend) {
  return cuda::as_cuda(backend).kernel_stats();
}

namespace cuda {

CudaBackend& as_cuda(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (!cuda) throw std::invalid_argument("backend " + backend.name() + " is not the CUDA backend");
  return *cuda;
}

CudaBackend::CudaBackend(DType compute, int device, AttentionKernel attention)
    : compute_(compute),
      device_(device),
      attention_kernel_(attention),
      allocator_(std::make_shared<CachingAllocator>(device)) {
  FASTLLM_CUDA_CHECK(cudaSetDevice(device_));
  cudaDeviceProp prop{};
  FASTLLM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  multiprocessors_ = prop.multiProcessorCount;
  max_shared_per_block_ = prop.sharedMemPerBlockOptin;
  const char* own_attention = std::getenv("FASTLLM_CUDA_ATTENTION");
  tensor_core_attention_ = !(own_attention && std::string(own_attention) == "simt");
  cudaStream_t stream = nullptr;
  FASTLLM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  stream_.reset(stream);
  cublasLtHandle_t lt = nullptr;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error("cublasLtCreate failed on device " + std::to_string(device_));
  lt_.reset(lt);
  void* flag = nullptr;
  FASTLLM_CUDA_CHECK(cudaHostAlloc(&flag, sizeof(int), cudaHostAllocMapped));
  flag_.reset(flag);
  *index_flag() = 0;
  gemm_workspace_ = allocator_->allocate(kGemmWorkspace);
}

// Out of line: GemmPlan is complete only in matmul.cu.
CudaBackend::~CudaBackend() {
  // Kernels may still read buffers whose owners go with this backend.
  cudaStreamSynchronize(stream_.get());
  // cuDNN's handle runs on the stream: it goes first.
  cudnn_.reset();
}

Buffer CudaBackend::allocate(std::size_t bytes) {
  return allocator_->allocate(bytes);
}

void CudaBackend::copy_from_host(Tensor dst, const void* src) {
  if (dst.bytes() == 0) return;
  // From pageable memory the call returns once src has been read, so the caller may reuse it.
  FASTLLM_CUDA_CHECK(
      cudaMemcpyAsync(dst.data, src, dst.bytes(), cudaMemcpyHostToDevice, stream_.get()));
}

void CudaBackend::copy_to_host(void* dst, Tensor src) {
  if (src.bytes() == 0) return;
  FASTLLM_CUDA_CHECK(
      cudaMemcpyAsync(dst, src.data, src.bytes(), cudaMemcpyDeviceToHost, stream_.get()));
  FASTLLM_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  raise_index_errors();
}

void CudaBackend::synchronize() {
  FASTLLM_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  raise_index_errors();
}

void CudaBackend::check_flag(const char* op, const char* what) {
  // A bounded list: a step checks a few ops per layer between two waits.
  constexpr std::size_t kMostListed = 64;
  if (unchecked_.size() < kMostListed) unchecked_.push_back(std::string(op) + ": " + what);
}

void CudaBackend::raise_index_errors() {
  if (unchecked_.empty()) return;
  std::vector<std::string> checked;
  checked.swap(unchecked_);
  volatile int* flag = index_flag();
  if (*flag == 0) return;
  *flag = 0;
  std::string ops;
  for (const std::string& c : checked)
    ops += (ops.empty() ? "" : "; ") + c;
  fail("index check", "an index was out of range in one of: " + ops);
}

const float* CudaBackend::rope_table(double theta, std::int64_t seq, std::int64_t dim,
                                     bool want_sin) {
  if (!(rope_.theta == theta && rope_.seq == seq && rope_.dim == dim && rope_.cos.data())) {
    // Rounded as the host backend (and transformers) round: float32 inv_freq and angle, then cos
    // and sin of that angle in double, rounded once.
    const std::int64_t half = dim / 2;
    std::vector<float> inv_freq(static_cast<std::size_t>(half));
    const auto base = static_cast<double>(static_cast<float>(theta));
    for (std::int64_t i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
      const auto power = static_cast<float>(std::pow(base, static_cast<double>(exponent)));
      inv_freq[i] = 1.0f / power;
    }
    std::vector<float> cos(static_cast<std::size_t>(seq * half));
    std::vector<float> sin(cos.size());
    for (std::int64_t s = 0; s < seq; ++s) {
      for (std::int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(s) * inv_freq[i];
        cos[s * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin[s * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    }
    rope_.cos = allocate(cos.size() * sizeof(float));
    rope_.sin = allocate(sin.size() * sizeof(float));
    FASTLLM_CUDA_CHECK(cudaMemcpyAsync(rope_.cos.data(), cos.data(), cos.size() * sizeof(float),
                                       cudaMemcpyHostToDevice, stream_.get()));
    FASTLLM_CUDA_CHECK(cudaMemcpyAsync(rope_.sin.data(), sin.data(), sin.size() * sizeof(float),
                                       cudaMemcpyHostToDevice, stream_.get()));
    rope_.theta = theta;
    rope_.seq = seq;
    rope_.dim = dim;
  }
  return static_cast<const float*>(want_sin ? rope_.sin.data() : rope_.cos.data());
}

}  // namespace cuda
}  // namespace fastllm
