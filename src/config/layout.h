#pragma once
// The parallel geometry of a run, owned in one place (docs/DESIGN.md section 5): world = data x
// tensor x pipeline, the rank order (tensor fastest, then data, then pipeline), each rank's
// coordinates, the groups derived from them, and what of the model a coordinate holds (pipeline
// stage layers, vocabulary slice, key/value heads).
#include <array>
#include <cstdint>
#include <string>

#include "config/architecture.h"

namespace fastllm {

// Layers [begin, end) of one pipeline stage.
struct LayerRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
};

// Rows [begin, begin + rows) of the vocabulary one tensor-parallel rank holds.
struct VocabSlice {
  std::int64_t begin = 0;
  std::int64_t rows = 0;
};

struct Layout {
  int tensor_parallel = 1;
  int pipeline_parallel = 1;
  int data_parallel = 1;
  int zero_stage = 0;
  // Megatron's sequence parallelism: outside the tensor-parallel regions each tensor-parallel rank
  // holds a contiguous 1/T of a micro-batch's tokens.
  bool sequence_parallel = false;

  enum class Dim { Tensor, Data, Pipeline };
  // The dimensions in rank order, fastest first, as Megatron and Fast-LLM order them, so that a
  // tensor-parallel group sits inside a node.
  static constexpr std::array<Dim, 3> kRankOrder{Dim::Tensor, Dim::Data, Dim::Pipeline};

  struct Coordinates {
    int tp = 0, dp = 0, pp = 0;
    int& along(Dim d) { return d == Dim::Tensor ? tp : d == Dim::Data ? dp : pp; }
    int along(Dim d) const { return d == Dim::Tensor ? tp : d == Dim::Data ? dp : pp; }
  };

  int size(Dim d) const {
    return d == Dim::Tensor ? tensor_parallel : d == Dim::Data ? data_parallel : pipeline_parallel;
  }
  int world_size() const { return tensor_parallel * pipeline_parallel * data_parallel; }
  Coordinates coordinates(int rank) const;
  int rank_of(const Coordinates& c) const;
  // The group of ranks that differ from `rank` only along `d`: an identifier shared by exactly
  // those ranks (the rank of its member at coordinate 0 along d), and the rank's place in it.
  int group_id(int rank, Dim d) const;
  int group_index(int rank, Dim d) const { return coordinates(rank).along(d); }

  // ---- what a coordinate holds of the model ----
  LayerRange stage_layers(std::int64_t num_layers, int stage) const;
  // Slices of ceil(V / T) rows, the last one shorter (no padding row is stored or predicted).
  VocabSlice vocab_slice(std::int64_t vocab_size, int tp_rank) const;
  // Tensor-parallel ranks sharing each key/value head: 1 when head groups split over the ranks,
  // T / head_groups when the ranks outnumber them (validate() allows nothing else).
  int kv_replicas(const Architecture& arch) const;
  // Key/value heads each tensor-parallel rank holds, and the first of them.
  std::int64_t kv_heads_per_rank(const Architecture& arch) const;
  std::int64_t first_kv_head(const Architecture& arch, int tp_rank) const;
  // Throws UserError naming the flag for a layout the model cannot be split into.
  void validate(const Architecture& arch) const;
  // Throws UserError naming `what` (the flag or file that gave it) when sequences of that length
  // cannot be split over the tensor-parallel ranks.
  void validate_sequence(std::int64_t sequence_length, const std::string& what) const;
  // Token rows a rank holds between the tensor-parallel regions, of a micro-batch of `tokens`.
  std::int64_t local_tokens(std::int64_t tokens) const {
    return sequence_parallel ? tokens / tensor_parallel : tokens;
  }
};

// The layout of a run on world_size ranks: --tensor_parallel, --pipeline_parallel and --zero_stage
// from the flags (FlagGroup::Layout), data parallel the rest of the world. Validated as above, and
// UserError when TP x PP does not divide the world; every rank throws the same message.
Layout resolve_layout(const Options& options, int world_size, const Architecture& arch);

}  // namespace fastllm
