#pragma once
// Training checkpoints: one HDF5 file each (DESIGN.md section 6) holding the fp32 master weights,
// the AdamW moments, and everything needed to continue exactly: iteration, consumed samples, the
// sampler's position, the seed and the resolved configuration.
#include <mpi.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/model.h"
#include "train/optimizer.h"

namespace fastllm {

struct TrainState {
  std::int64_t iteration = 0;         // completed iterations
  std::int64_t consumed_samples = 0;  // training samples consumed so far
  std::uint64_t seed = 0;
  std::string config_json;  // the resolved configuration of the run that saved it
};

// "checkpoint-00001200.h5" for iteration 1200.
std::string checkpoint_name(std::int64_t iteration);
// Committed checkpoint files in `dir`, oldest first (".tmp" files of interrupted saves excluded).
std::vector<std::string> list_checkpoints(const std::string& dir);

// Collective. Writes `path` atomically. The optimizer may be null (a converted model: no moments).
void save_checkpoint(const std::string& path, Model& model, const AdamW* optimizer,
                     const TrainState& state, MPI_Comm comm);

// Collective. Reads weights (and moments when the optimizer is given and the file has them).
// UserError when the file is unreadable or holds another architecture.
TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                           MPI_Comm comm);

// The architecture a checkpoint file was saved with, without loading it.
Architecture checkpoint_architecture(const std::string& path, MPI_Comm comm);

}  // namespace fastllm
