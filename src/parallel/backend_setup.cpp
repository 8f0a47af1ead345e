#include "parallel/backend_setup.h"

#include <stdexcept>

#include "io/error.h"
#include "kernels/backend_factory.h"
#include "parallel/nccl_communicator.h"

namespace fastllm {

std::unique_ptr<Backend> backend_from_flags(const Options& options) {
  // kernels/ reports a bad --backend, --dtype or --attention_kernel as invalid_argument naming the
  // flag; on the command line that is the user's error (exit code 2).
  try {
    const std::string dtype = options.get_string("dtype");
    return make_backend(
        options.get_string("backend"),
        dtype == "auto" ? std::nullopt : std::optional<DType>(parse_compute_dtype(dtype)),
        parse_attention_kernel(options.get_string("attention_kernel")));
  } catch (const std::invalid_argument& e) {
    throw UserError(e.what());
  }
}

CommunicatorFactory communicator_factory(Backend& backend) {
  if (backend.name() != "cuda") return {};
  return [&backend](MPI_Comm group) { return make_nccl_communicator(group, backend); };
}

double peak_tflops(const Options& options, const Backend& backend) {
  const double given = options.get_float("peak_tflops");
  if (given > 0) return given;
  return backend.name() == "cuda" ? 989.0 : 0.0;
}

}  // namespace fastllm
