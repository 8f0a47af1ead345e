#pragma once
// How a run is split: world = data x tensor x pipeline, rank order tensor fastest, then data, then
// pipeline (DESIGN.md section 5), and what each rank holds of the model.
#include <cstdint>

#include "config/architecture.h"

namespace fastllm {

struct Layout {
  int tensor_parallel = 1;
  int pipeline_parallel = 1;
  int data_parallel = 1;
  int zero_stage = 0;

  int world_size() const { return tensor_parallel * pipeline_parallel * data_parallel; }
  int tp_rank(int rank) const { return rank % tensor_parallel; }
  int dp_rank(int rank) const { return (rank / tensor_parallel) % data_parallel; }
  int pp_rank(int rank) const { return rank / (tensor_parallel * data_parallel); }
};

// Throws UserError naming the flag for a layout the model cannot be split into.
void validate_layout(const Layout& layout, const Architecture& arch);

// The layout of a run on world_size ranks: --tensor_parallel, --pipeline_parallel and --zero_stage
// from the flags (FlagGroup::Layout), data parallel the rest of the world. Validated as above, and
// UserError when TP x PP does not divide the world; every rank throws the same message.
Layout resolve_layout(const Options& options, int world_size, const Architecture& arch);

// Layers [begin, end) of pipeline stage `stage`: contiguous blocks, the first stages taking one
// more layer when the count does not divide.
struct LayerRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
};
LayerRange stage_layers(std::int64_t num_layers, int stages, int stage);

// Vocabulary rows per tensor-parallel rank (the vocabulary padded to a multiple of TP).
std::int64_t vocab_per_rank(std::int64_t vocab_size, int tensor_parallel);

// Parameters one rank of pipeline stage `stage` holds (its tensor-parallel slice).
std::int64_t rank_parameters(const Architecture& arch, const Layout& layout, int stage);

}  // namespace fastllm
