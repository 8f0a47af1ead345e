#include "kernels/backend_factory.h"

#include "io/error.h"
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

DType parse_compute_dtype(const std::string& value) {
  if (value == "fp32" || value == "f32") return DType::F32;
  if (value == "bf16") return DType::BF16;
  throw UserError("--dtype: '" + value + "', expected fp32 or bf16");
}

std::unique_ptr<Backend> make_backend(const std::string& name, std::optional<DType> compute) {
  if (name == "host") {
    if (compute && *compute != DType::F32)
      throw UserError(std::string("--dtype: '") + dtype_name(*compute) +
                      "' with --backend=host, expected fp32 (the host backend computes in fp32)");
    return std::make_unique<HostBackend>();
  }
  if (name == "cuda") {
#if FASTLLM_HAVE_CUDA
    if (!cuda_device_available())
      throw UserError(
          "--backend: 'cuda', but no CUDA device is visible here; expected a GPU, or "
          "--backend=host");
    return make_cuda_backend(compute.value_or(DType::BF16));
#else
    throw UserError(
        "--backend: 'cuda', but this fastllm was built without CUDA; expected host, or "
        "a build configured with -DFASTLLM_CUDA=ON where nvcc is installed");
#endif
  }
  throw UserError("--backend: '" + name + "', expected host or cuda");
}

}  // namespace fastllm
