#include "parallel/finalize.h"

#include <algorithm>

namespace fastllm {

namespace {

// Sums over the ranks of one model replica the gradient of a parameter several of them hold.
void sum_replicas(Parameter& p, const Topology& topology) {
  if (p.sync == GradientSync::KvReplicas && topology.kv_replicas)
    topology.kv_replicas->all_reduce(p.grad, ReduceOp::Sum);
  if (p.sync == GradientSync::TiedEmbedding && topology.tied_embedding)
    topology.tied_embedding->all_reduce(p.grad, ReduceOp::Sum);
  if (p.sync == GradientSync::SequenceParallel) topology.tensor->all_reduce(p.grad, ReduceOp::Sum);
}

}  // namespace

void ShardedGradientSink::take(const std::vector<Parameter*>& params, std::int64_t flat_begin,
                               Tensor grads) {
  // The tied embedding's buckets come here from finalize_gradients, summed already.
  for (Parameter* p : params) {
    if (p->sync != GradientSync::TiedEmbedding) sum_replicas(*p, topology_);
  }
  const std::int64_t shard = shard_.numel(), end = flat_begin + grads.numel();
  Communicator& data = *topology_.data.get();
  for (int owner = 0; owner < data.size(); ++owner) {
    const std::int64_t lo = std::max(flat_begin, owner * shard);
    const std::int64_t hi = std::min(end, (owner + 1) * shard);
    if (lo >= hi) continue;
    const Tensor piece = grads.rows(lo - flat_begin, hi - lo);
    data.reduce(piece, owner, ReduceOp::Sum);
    if (owner == data.rank()) backend_.add(shard_.rows(lo - owner * shard, hi - lo), piece, 1.0f);
  }
}

void finalize_gradients(Model& model, const Topology& topology, Tensor zero_shard) {
  if (model.gradient_buckets()) {
    for (Parameter& p : model.parameters()) {
      if (p.sync == GradientSync::TiedEmbedding) sum_replicas(p, topology);
    }
    model.flush_deferred_gradients();
    return;
  }
  for (Parameter& p : model.parameters())
    sum_replicas(p, topology);
  if (topology.layout.data_parallel == 1) return;
  if (zero_shard.data) {
    topology.data->reduce_scatter(model.padded_grads(), zero_shard, ReduceOp::Sum);
  } else {
    topology.data->all_reduce(model.flat_grads(), ReduceOp::Sum);
  }
}

GlobalLoss global_loss(const PipelineTotals& local, const Topology& topology) {
  const bool reports = topology.last_stage() && topology.at.tp == 0;
  std::vector<double> sums = {local.ce_sum, local.aux_sum, static_cast<double>(local.predicted)};
  sums.insert(sums.end(), local.expert_load_sum.begin(), local.expert_load_sum.end());
  if (!reports) std::fill(sums.begin(), sums.end(), 0.0);
  MPI_Allreduce(MPI_IN_PLACE, sums.data(), static_cast<int>(sums.size()), MPI_DOUBLE, MPI_SUM,
                topology.world);
  return {sums[0], sums[1], static_cast<std::int64_t>(sums[2]),
          std::vector<double>(sums.begin() + 3, sums.end())};
}

}  // namespace fastllm
