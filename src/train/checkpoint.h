#pragma once
// Training checkpoints: one HDF5 file each (docs/DESIGN.md section 6) with the fp32 master weights,
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

// The ranks sharing a checkpoint file: all of `world` open it; each saves and loads the parameters
// its model holds (its tensor-parallel part of its pipeline stage), in the file's global,
// layout-independent datasets, so a checkpoint saved under one layout loads under any other.
// Ranks holding the same part of the model (data-parallel replicas) split the writing between them.
struct CheckpointRanks {
  MPI_Comm world = MPI_COMM_WORLD;
  int dp_rank = 0;
  int dp_size = 1;
  // load_checkpoint prints, on world rank 0, the dataset bytes each rank read next to its share
  // (the bytes of the parameters and, with an optimizer, the optimizer shard it holds).
  bool report_reads = false;
  // save_checkpoint refuses (UserError, nothing written) weights that are not finite, so that a
  // diverged run never replaces its last good checkpoint. Off for `convert`, which copies a model
  // as it is (export then refuses it).
  bool refuse_non_finite = false;
};

// Collective. Writes `path` atomically. The optimizer may be null (a converted model: no moments).
void save_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                     const TrainState& state, const CheckpointRanks& ranks);

// Collective. Reads weights (and moments when the optimizer is given and the file has them).
// UserError when the file is unreadable or holds another architecture.
TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                           const CheckpointRanks& ranks);

// The same, for ranks that each hold the whole model (replicas of it over `comm`).
void save_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                     const TrainState& state, MPI_Comm comm);
TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer, MPI_Comm comm);

// The iteration a checkpoint file's name says ("checkpoint-00001200.h5": 1200), if it has that
// form.
std::optional<std::int64_t> iteration_in_name(const std::string& path);
// Collective. The iteration a checkpoint holds, after checking that it opens as a fastllm
// checkpoint and that its name (when of the form above) says the same; UserError otherwise.
std::int64_t checkpoint_iteration(const std::string& path, MPI_Comm comm);

// The architecture a checkpoint file was saved with, without loading it.
Architecture checkpoint_architecture(const std::string& path, MPI_Comm comm);

}  // namespace fastllm
