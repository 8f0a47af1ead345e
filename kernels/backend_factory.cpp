#include "kernels/backend_factory.h"

#include <stdexcept>

#include "kernels/host/host_backend.h"
#if FASTLLM_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace fastllm {

std::vector<std::string> built_backends() {
#if FASTLLM_HAVE_CUDA
  return {"host", "cuda"};
#else
  return {"host"};
#endif
}

bool backend_available(const std::string& name) {
  if (name == "host") return true;
#if FASTLLM_HAVE_CUDA
  if (name == "cuda") return cuda_device_available();
#endif
  return false;
}

// No fp16: DType::F16 exists as an input dtype of the CUDA backend's fused attention only.
// Training in fp16 would need loss scaling (its 5 exponent bits underflow small gradients), which
// fastllm does not do, so it is no compute dtype.
DType parse_compute_dtype(const std::string& value) {
  if (value == "fp32" || value == "f32") return DType::F32;
  if (value == "bf16") return DType::BF16;
  throw std::invalid_argument("--dtype: '" + value + "', expected fp32 or bf16");
}

AttentionKernel parse_attention_kernel(const std::string& value) {
  if (value == "cudnn") return AttentionKernel::Cudnn;
  if (value == "own") return AttentionKernel::Own;
  throw std::invalid_argument("--attention_kernel: '" + value + "', expected cudnn or own");
}

std::unique_ptr<Backend> make_backend(const std::string& name, std::optional<DType> compute,
                                      AttentionKernel attention) {
  if (name == "host") {
    if (compute && *compute != DType::F32)
      throw std::invalid_argument(
          std::string("--dtype: '") + dtype_name(*compute) +
          "' with --backend=host, expected fp32 (the host backend computes in fp32)");
    return std::make_unique<HostBackend>();
  }
  if (name == "cuda") {
#if FASTLLM_HAVE_CUDA
    if (!cuda_device_available())
      throw std::invalid_argument(
          "--backend: 'cuda', but no CUDA device is visible here; expected a GPU, or "
          "--backend=host");
    return make_cuda_backend(compute.value_or(DType::BF16), -1, attention);
#else
    static_cast<void>(attention);
    throw std::invalid_argument(
        "--backend: 'cuda', but this fastllm was built without CUDA; expected host, or "
        "a build configured with -DFASTLLM_CUDA=ON where nvcc is installed");
#endif
  }
  throw std::invalid_argument("--backend: '" + name + "', expected host or cuda");
}

}  // namespace fastllm
