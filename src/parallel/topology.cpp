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
  t.at = layout.coordinates(t.rank);
  using Dim = Layout::Dim;
  auto along = [&](Dim d) {
    return split(world, layout.group_id(t.rank, d), layout.group_index(t.rank, d), factory);
  };
  t.tensor = along(Dim::Tensor);
  t.data = along(Dim::Data);
  t.pipeline = along(Dim::Pipeline);
  // Key/value replicas: runs of kv_replicas consecutive tensor-parallel ranks.
  const int replicas = layout.kv_replicas(arch);
  Layout::Coordinates head = t.at;
  head.tp -= head.tp % replicas;
  t.kv_replicas =
      split(world, replicas > 1 ? layout.rank_of(head) : MPI_UNDEFINED, t.at.tp, factory);
  // The tied embedding: this pipeline's first and last stage.
  const bool tied = arch.tie_word_embeddings && layout.pipeline_parallel > 1;
  const int tied_color = tied && (t.first_stage() || t.last_stage())
                             ? layout.group_id(t.rank, Dim::Pipeline)
                             : MPI_UNDEFINED;
  t.tied_embedding = split(world, tied_color, t.at.pp, factory);
  return t;
}

ModelPartition model_partition(const Topology& t) {
  ModelPartition p;
  p.layout = t.layout;
  p.at = t.at;
  p.tensor = t.tensor.get();
  p.data = t.data.get();
  p.flat_alignment = t.layout.zero_stage >= 1 ? t.layout.data_parallel : 1;
  p.gradient_buckets = t.layout.zero_stage == 2 && t.layout.data_parallel > 1;
  return p;
}

}  // namespace fastllm
