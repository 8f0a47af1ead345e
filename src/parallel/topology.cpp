#include "parallel/topology.h"

#include <stdexcept>

namespace fastllm {
namespace {

// Collective: the ranks passing the same color form one group, ordered by key; a rank passing
// MPI_UNDEFINED gets none.
RankGroup split(MPI_Comm world, int color, int key, const CommunicatorFactory& factory) {
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm_split(world, color, key, &comm);
  RankGroup group;
  if (comm == MPI_COMM_NULL) return group;
  group.mpi = std::make_unique<MpiCommunicator>(comm);
  if (factory) group.device = factory(comm);
  return group;
}

}  // namespace

Topology make_topology(const Layout& layout, const Architecture& arch, MPI_Comm world,
                       const CommunicatorFactory& factory) {
  Topology t;
  t.layout = layout;
  t.world = world;
  int size = 0;
  MPI_Comm_rank(world, &t.rank);
  MPI_Comm_size(world, &size);
  if (size != layout.world_size())
    throw std::invalid_argument("make_topology: the layout is not one of this world");
  const int tp = layout.tensor_parallel, dp = layout.data_parallel;
  t.tp_rank = layout.tp_rank(t.rank);
  t.dp_rank = layout.dp_rank(t.rank);
  t.pp_rank = layout.pp_rank(t.rank);
  t.tensor = split(world, t.dp_rank + dp * t.pp_rank, t.tp_rank, factory);
  t.data = split(world, t.tp_rank + tp * t.pp_rank, t.dp_rank, factory);
  t.pipeline = split(world, t.tp_rank + tp * t.dp_rank, t.pp_rank, factory);
  const int replicas = tp > arch.head_groups ? tp / static_cast<int>(arch.head_groups) : 1;
  const int kv_color = replicas > 1 ? t.rank / replicas : MPI_UNDEFINED;
  t.kv_replicas = split(world, kv_color, t.rank, factory);
  const bool tied = arch.tie_word_embeddings && layout.pipeline_parallel > 1;
  const int tied_color =
      tied && (t.first_stage() || t.last_stage()) ? t.tp_rank + tp * t.dp_rank : MPI_UNDEFINED;
  t.tied_embedding = split(world, tied_color, t.pp_rank, factory);
  return t;
}

ModelPartition model_partition(const Topology& t) {
  ModelPartition p;
  p.tensor_parallel = t.layout.tensor_parallel;
  p.tp_rank = t.tp_rank;
  p.pipeline_parallel = t.layout.pipeline_parallel;
  p.pp_rank = t.pp_rank;
  p.tensor = t.tensor.get();
  p.flat_alignment = t.layout.zero_stage == 1 ? t.layout.data_parallel : 1;
  return p;
}

}  // namespace fastllm
