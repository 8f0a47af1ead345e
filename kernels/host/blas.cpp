// What OpenBLAS runs: its build, the kernel set it picked for this CPU and its threading.
#include <cblas.h>

#include <string>

#include "kernels/host/host_util.h"

namespace fastllm::host {

std::string blas_description() {
  const char* threading[] = {"sequential", "pthreads", "OpenMP"};
  const int parallel = openblas_get_parallel();
  std::string text = std::string(openblas_get_config()) + "; kernels " + openblas_get_corename();
  text += "; threading ";
  text += parallel >= 0 && parallel <= 2 ? threading[parallel] : "unknown";
  text += ", " + std::to_string(openblas_get_num_threads()) + " threads";
  return text;
}

}  // namespace fastllm::host
