#pragma once
// What the layout tests share: a fixture's model flags, `fastllm` started under mpiexec and probe
// outputs read back; support/numeric.h has the relative error every layout is held to.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "support/numeric.h"
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

// The flags that load a fixture's Hugging Face checkpoint.
inline std::string fixture_model(const std::string& fixture) {
  return "--pretrained_checkpoint_type=huggingface --pretrained_checkpoint_path=" + kFixtureDir +
         "/" + fixture;
}

// `fastllm <args>` on `ranks` MPI processes of one OpenMP thread each (the machine may have fewer
// cores than ranks).
inline CommandResult run_mpi(int ranks, const std::string& args) {
  return run_shell("OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " +
                   std::string(FASTLLM_MPIEXEC) + " --oversubscribe --allow-run-as-root -np " +
                   std::to_string(ranks) + " " + FASTLLM_BINARY + " " + args);
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

// One single-rank `fastllm probe` of `model_flags` on `input`, written to dir/KEY.safetensors;
// cached by key for the whole test program, so a reference shared by several layouts runs once.
inline std::map<std::string, std::vector<float>> single_rank_probe(const std::filesystem::path& dir,
                                                                   const std::string& key,
                                                                   const std::string& model_flags,
                                                                   const std::string& input) {
  static std::map<std::string, std::map<std::string, std::vector<float>>> cache;
  if (cache.count(key)) return cache[key];
  const std::string out = (dir / (key + ".safetensors")).string();
  const CommandResult r =
      run_fastllm("probe " + model_flags + " --input=" + input + " --output=" + out);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return cache[key] = read_tensors(out);
}

}  // namespace fastllm::test
