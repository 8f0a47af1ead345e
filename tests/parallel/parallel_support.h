#pragma once
// What the layout tests share: `fastllm` started under mpiexec, probe outputs read back, and the
// relative errors every layout is held to against the single-rank result.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "support/process.h"

namespace fastllm::test {

inline const std::string kFixtureDir = FASTLLM_FIXTURES;

// A data x tensor x pipeline layout.
struct Shape {
  int dp = 1, tp = 1, pp = 1;
  int ranks() const { return dp * tp * pp; }
  std::string name() const {
    return std::to_string(dp) + "x" + std::to_string(tp) + "x" + std::to_string(pp);
  }
  std::string flags() const {
    return " --tensor_parallel=" + std::to_string(tp) +
           " --pipeline_parallel=" + std::to_string(pp);
  }
};

// `fastllm <args>` on `ranks` MPI processes of one OpenMP thread each (the machine may have fewer
// cores than ranks).
inline CommandResult run_mpi(int ranks, const std::string& args) {
  return run_shell("OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " +
                   std::string(FASTLLM_MPIEXEC) + " --oversubscribe --allow-run-as-root -np " +
                   std::to_string(ranks) + " " + FASTLLM_BINARY + " " + args);
}

// ||a - b|| / ||b|| in double.
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Every tensor of a safetensors file as float, by name.
inline std::map<std::string, std::vector<float>> read_tensors(const std::string& path) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  std::map<std::string, std::vector<float>> out;
  for (const TensorInfo& t : file.tensors()) {
    if (t.dtype != SafetensorsDtype::I64) out[t.name] = file.read_f32(t.name);
  }
  return out;
}

}  // namespace fastllm::test
