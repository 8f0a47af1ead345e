#include "config/layout.h"

#include <algorithm>
#include <string>

#include "io/error.h"

namespace fastllm {
namespace {

std::string n(std::int64_t v) {
  return std::to_string(v);
}

void check_sizes(const Layout& l) {
  if (l.tensor_parallel < 1)
    throw UserError("--tensor_parallel=" + n(l.tensor_parallel) + ": expected >= 1");
  if (l.pipeline_parallel < 1)
    throw UserError("--pipeline_parallel=" + n(l.pipeline_parallel) + ": expected >= 1");
  if (l.data_parallel < 1)
    throw UserError("--data_parallel=" + n(l.data_parallel) + ": expected >= 1");
}

}  // namespace

Layout::Coordinates Layout::coordinates(int rank) const {
  Coordinates c;
  for (Dim d : kRankOrder) {
    c.along(d) = rank % size(d);
    rank /= size(d);
  }
  return c;
}

int Layout::rank_of(const Coordinates& c) const {
  int rank = 0;
  for (auto d = kRankOrder.rbegin(); d != kRankOrder.rend(); ++d)
    rank = rank * size(*d) + c.along(*d);
  return rank;
}

int Layout::group_id(int rank, Dim d) const {
  Coordinates c = coordinates(rank);
  c.along(d) = 0;
  return rank_of(c);
}

LayerRange Layout::stage_layers(std::int64_t num_layers, int stage) const {
  const std::int64_t base = num_layers / pipeline_parallel, extra = num_layers % pipeline_parallel;
  LayerRange r;
  r.begin = stage * base + std::min<std::int64_t>(stage, extra);
  r.end = r.begin + base + (stage < extra ? 1 : 0);
  return r;
}

VocabSlice Layout::vocab_slice(std::int64_t vocab_size, int tp_rank) const {
  const std::int64_t rows = (vocab_size + tensor_parallel - 1) / tensor_parallel;
  VocabSlice s;
  s.begin = std::min(vocab_size, tp_rank * rows);
  s.rows = std::min(rows, vocab_size - s.begin);
  return s;
}

int Layout::kv_replicas(const Architecture& arch) const {
  return arch.head_groups % tensor_parallel == 0
             ? 1
             : tensor_parallel / static_cast<int>(arch.head_groups);
}

std::int64_t Layout::kv_heads_per_rank(const Architecture& arch) const {
  return kv_replicas(arch) == 1 ? arch.head_groups / tensor_parallel : 1;
}

std::int64_t Layout::first_kv_head(const Architecture& arch, int tp_rank) const {
  return tp_rank / kv_replicas(arch) * kv_heads_per_rank(arch);
}

void Layout::validate(const Architecture& a) const {
  check_sizes(*this);
  const int tp = tensor_parallel;
  if (a.num_attention_heads % tp != 0)
    throw UserError("--tensor_parallel=" + n(tp) +
                    " does not divide --num_attention_heads=" + n(a.num_attention_heads));
  if (a.head_groups % tp != 0 && tp % a.head_groups != 0)
    throw UserError("--tensor_parallel=" + n(tp) + " and --head_groups=" + n(a.head_groups) +
                    ": head groups must be a multiple of the tensor-parallel size or divide it");
  if (a.ffn_hidden_size % tp != 0)
    throw UserError("--tensor_parallel=" + n(tp) +
                    " does not divide --ffn_hidden_size=" + n(a.ffn_hidden_size));
  if (a.num_layers < pipeline_parallel)
    throw UserError("--pipeline_parallel=" + n(pipeline_parallel) + " exceeds --num_layers=" +
                    n(a.num_layers) + ": every stage needs at least one layer");
  if (vocab_slice(a.vocab_size, tp - 1).rows < 1)
    throw UserError("--tensor_parallel=" + n(tp) + " splits --vocab_size=" + n(a.vocab_size) +
                    " into slices of " + n(vocab_slice(a.vocab_size, 0).rows) +
                    " rows, leaving the last rank none");
}

void Layout::validate_sequence(std::int64_t sequence_length, const std::string& what) const {
  if (sequence_parallel && sequence_length % tensor_parallel != 0)
    throw UserError(what + "=" + n(sequence_length) + " is not a multiple of --tensor_parallel=" +
                    n(tensor_parallel) + ", which --sequence_parallel=1 splits each sequence over");
}

Layout resolve_layout(const Options& options, int world_size, const Architecture& arch) {
  Layout l;
  l.tensor_parallel = static_cast<int>(options.get_int("tensor_parallel"));
  l.pipeline_parallel = static_cast<int>(options.get_int("pipeline_parallel"));
  l.zero_stage = static_cast<int>(options.get_int("zero_stage"));
  l.sequence_parallel = options.get_bool("sequence_parallel");
  check_sizes(l);
  const int model_ranks = l.tensor_parallel * l.pipeline_parallel;
  if (world_size % model_ranks != 0)
    throw UserError("--tensor_parallel=" + n(l.tensor_parallel) + " x --pipeline_parallel=" +
                    n(l.pipeline_parallel) + " = " + n(model_ranks) + " does not divide the " +
                    n(world_size) + " MPI ranks; the world must be data x tensor x pipeline");
  l.data_parallel = world_size / model_ranks;
  l.validate(arch);
  return l;
}

}  // namespace fastllm
