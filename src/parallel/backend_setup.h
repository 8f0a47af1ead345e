#pragma once
// The backend a command computes on (--backend, --dtype) and how its tensors travel between
// ranks: NCCL on CUDA, MPI on the host (docs/DESIGN.md section 4).
#include <memory>

#include "config/flags.h"
#include "kernels/backend.h"
#include "parallel/topology.h"

namespace fastllm {

std::unique_ptr<Backend> backend_from_flags(const Options& options);

// Empty (MPI over host memory) for the host backend, NCCL communicators for CUDA.
CommunicatorFactory communicator_factory(Backend& backend);

// The dense bf16 peak of one device for MFU: --peak_tflops when given, else 989 (H100/H200 SXM)
// on CUDA and none (0) on the host.
double peak_tflops(const Options& options, const Backend& backend);

}  // namespace fastllm
