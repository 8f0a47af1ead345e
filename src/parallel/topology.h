#pragma once
// One rank's place in a DP x TP x PP run (docs/DESIGN.md section 5) and the communicators of
// its groups. Building it is collective over the world.
#include <functional>
#include <memory>

#include "config/architecture.h"
#include "config/layout.h"
#include "model/parameters.h"
#include "parallel/mpi_communicator.h"

namespace fastllm {

// Makes the Communicator a group's tensors go through from the group's MPI communicator (NCCL for
// the CUDA backend); collective over that group.
using CommunicatorFactory = std::function<std::unique_ptr<Communicator>(MPI_Comm)>;

// One group of ranks: its MPI communicator, for host-side scalars, and the Communicator its
// tensors go through (MPI itself unless a factory made another). Empty when this rank is in none.
struct RankGroup {
  std::unique_ptr<MpiCommunicator> mpi;
  std::unique_ptr<Communicator> device;

  explicit operator bool() const { return mpi != nullptr; }
  Communicator* get() const { return device ? device.get() : mpi.get(); }
  Communicator* operator->() const { return get(); }
  MPI_Comm comm() const { return mpi ? mpi->comm() : MPI_COMM_NULL; }
};

struct Topology {
  Layout layout;
  int rank = 0;
  Layout::Coordinates at;
  MPI_Comm world = MPI_COMM_WORLD;
  // The ranks that differ from this one only in their tensor-, data- or pipeline-parallel index.
  RankGroup tensor, data, pipeline;
  // Tensor-parallel ranks holding the same key/value heads (TP a multiple of head groups); empty
  // when each key/value head lives on one rank.
  RankGroup kv_replicas;
  // The first and last stage of this pipeline, which both hold the tied embedding; empty unless
  // the embedding is tied and there are several stages.
  RankGroup tied_embedding;

  bool first_stage() const { return at.pp == 0; }
  bool last_stage() const { return at.pp == layout.pipeline_parallel - 1; }
};

// Collective over `world`, whose size must be layout.world_size().
// With a factory, every group's tensors go through what it makes.
Topology make_topology(const Layout& layout, const Architecture& arch, MPI_Comm world,
                       const CommunicatorFactory& factory = {});

// The part of the model this rank holds; with ZeRO-1 its flat buffers are padded so that they
// split into equal data-parallel shards.
ModelPartition model_partition(const Topology& topology);

}  // namespace fastllm
