#include "cli/version.h"

#include <mpi.h>

#include <sstream>

#if FASTLLM_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
#if __has_include(<cudnn_version.h>)
#include <cudnn_version.h>
#define FASTLLM_VERSION_HAS_CUDNN 1
#endif
#endif

// Defined by src/CMakeLists.txt at configure time; the fallbacks keep other build systems working.
#ifndef FASTLLM_VERSION
#define FASTLLM_VERSION "unknown"
#endif
#ifndef FASTLLM_GIT_REVISION
#define FASTLLM_GIT_REVISION "unknown"
#endif
#ifndef FASTLLM_HDF5_VERSION
#define FASTLLM_HDF5_VERSION "unknown"
#endif

namespace fastllm {

namespace {

std::string mpi_version() {
  std::ostringstream out;
#if defined(OMPI_MAJOR_VERSION)
  out << "Open MPI " << OMPI_MAJOR_VERSION << "." << OMPI_MINOR_VERSION << "."
      << OMPI_RELEASE_VERSION << ", ";
#elif defined(MPICH_VERSION)
  out << "MPICH " << MPICH_VERSION << ", ";
#endif
  out << "MPI standard " << MPI_VERSION << "." << MPI_SUBVERSION;
  return out.str();
}

}  // namespace

std::string version_text() {
  std::ostringstream out;
  out << "fastllm " << FASTLLM_VERSION << " (git " << FASTLLM_GIT_REVISION << ")\n";
#if FASTLLM_HAVE_CUDA
  out << "backends: host, cuda\n";
  out << "CUDA runtime: " << CUDART_VERSION / 1000 << "." << CUDART_VERSION % 1000 / 10 << "\n";
#ifdef FASTLLM_VERSION_HAS_CUDNN
  out << "cuDNN: " << CUDNN_MAJOR << "." << CUDNN_MINOR << "." << CUDNN_PATCHLEVEL << "\n";
#endif
  out << "NCCL: " << NCCL_MAJOR << "." << NCCL_MINOR << "." << NCCL_PATCH << "\n";
#else
  out << "backends: host (built without CUDA)\n";
#endif
  out << "MPI: " << mpi_version() << "\n";
  out << "HDF5: " << FASTLLM_HDF5_VERSION << "\n";
  return out.str();
}

}  // namespace fastllm
