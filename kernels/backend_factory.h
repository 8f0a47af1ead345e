#pragma once
// The backend a run computes on, chosen by name (the --backend flag) and compute dtype (--dtype).
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace fastllm {

// The backends this build has: "host", and "cuda" when it was built with CUDA.
std::vector<std::string> built_backends();

// True when the named backend can run here (for "cuda": built with CUDA and a device present).
bool backend_available(const std::string& name);

// The errors below are std::invalid_argument naming the flag, the value found and the values
// expected; the command line turns them into user errors (src/parallel/backend_setup.cpp), as
// kernels/ knows nothing of the program's error types.

// "fp32" (or "f32") -> F32, "bf16" -> BF16; anything else throws naming --dtype.
DType parse_compute_dtype(const std::string& value);

// "cudnn" or "own" (the --attention_kernel flag); anything else throws naming the flag.
AttentionKernel parse_attention_kernel(const std::string& value);

// "host" (F32 only) or "cuda" (BF16 by default, or F32 with exact fp32 math). Throws naming
// --backend for an unknown name, a build without CUDA or a machine without a GPU, and naming
// --dtype for a dtype the backend does not compute in. `attention` picks the CUDA backend's
// attention kernel; the host backend has one.
std::unique_ptr<Backend> make_backend(const std::string& name,
                                      std::optional<DType> compute = std::nullopt,
                                      AttentionKernel attention = AttentionKernel::Cudnn);

}  // namespace fastllm
