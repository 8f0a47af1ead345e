#pragma once
// Every parameter of an architecture, described once (docs/DESIGN.md section 6): its Hugging Face
// name, its role in the model, its whole shape, how tensor parallelism cuts it and where it lives
// in an HDF5 checkpoint. The model's wiring, one rank's partition, the checkpoint layout, the
// Hugging Face import and export and the parameter counts of `inspect` all derive from this table.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "config/architecture.h"
#include "config/layout.h"
#include "kernels/backend.h"
#include "kernels/communicator.h"

namespace fastllm {

// How a parameter is cut over tensor-parallel ranks (Megatron): column-parallel layers split their
// output rows, row-parallel ones their input columns, the vocabulary its rows; norms, the router
// and the biases added after a row-parallel sum are whole on every rank.
enum class TensorSplit : std::uint8_t { Replicated, Column, Row, KeyValue, Vocab };

// What a parameter is to the model, so that the model wires its blocks by role, not by name.
enum class Role : std::uint8_t {
  Embedding,
  Norm1,
  Norm1Bias,
  Q,
  QBias,
  K,
  KBias,
  V,
  VBias,
  O,
  OBias,
  Norm2,
  Norm2Bias,
  Router,
  Gate,
  GateBias,
  Up,
  UpBias,
  Down,
  DownBias,
  FinalNorm,
  FinalNormBias,
  LmHead,
};

struct ParameterSpec {
  std::string name;  // Hugging Face checkpoint name
  Role role;
  std::vector<std::int64_t> shape;  // whole, [out, in] for linear layers
  TensorSplit split = TensorSplit::Replicated;
  std::int64_t layer = -1;   // -1: the embedding, the final norm and the LM head
  std::int64_t expert = -1;  // MoE experts' MLP weights
  // In an HDF5 checkpoint: one dataset per kind of weight with a leading layer axis (and an expert
  // axis for MoE); row-parallel weights are stored transposed so that a tensor-parallel part of
  // them is a contiguous block of rows, like the column-parallel ones.
  std::string dataset;                      // "/model/layers/q"
  std::vector<std::int64_t> dataset_shape;  // whole: [L, (E,) rows, cols]
  std::vector<std::int64_t>
      dataset_index;        // this parameter's leading coordinates: {layer(, expert)}
  bool transposed = false;  // stored as the transpose of the Hugging Face [out, in]

  std::int64_t numel() const;
};

// The parameters of an architecture in the model's order (the order of the flat buffers and of the
// per-parameter initialisation seeds).
std::vector<ParameterSpec> parameter_table(const Architecture& arch);

struct ParameterCount {
  std::int64_t embedding = 0;
  std::int64_t lm_head = 0;  // 0 when tied
  std::int64_t per_layer = 0;
  std::int64_t final_norm = 0;
  std::int64_t total = 0;
};
ParameterCount count_parameters(const Architecture& arch);

// How the gradient of a parameter held by several ranks of one model replica is summed.
enum class GradientSync : std::uint8_t {
  None,
  KvReplicas,     // a key/value head replicated over tensor-parallel ranks
  TiedEmbedding,  // the tied embedding, on the first and the last pipeline stage
  // A norm's weight or bias under sequence parallelism: each tensor-parallel rank's gradient is
  // that of its share of the tokens.
  SequenceParallel,
};

// One rank's part of a parameter and its place in the rank's flat buffers.
struct Parameter {
  std::string name;  // Hugging Face checkpoint name
  Role role = Role::Embedding;
  std::int64_t layer = -1, expert = -1;
  std::size_t index = 0;            // its place in parameter_table(arch)
  std::vector<std::int64_t> shape;  // this rank's part, [out, in] for linear layers
  std::int64_t offset = 0;          // elements into the flat buffers
  std::int64_t numel = 0;
  bool decay = false;  // AdamW weight decay applies (2 or more dimensions)
  Tensor weight;       // compute dtype
  Tensor grad;         // F32
  // The whole tensor and where this rank's part sits in it: the entries
  // [split_begin, split_begin + shape[split_axis]) along split_axis (-1: all of it).
  std::vector<std::int64_t> global_shape;
  int split_axis = -1;
  std::int64_t split_begin = 0;
  // This copy is the one that counts in the gradient norm and is written to checkpoints; false
  // for tensor-parallel replicas after the first and for the tied embedding's copy on the last
  // stage.
  bool primary = true;
  GradientSync sync = GradientSync::None;
};

// Which part of the model one rank holds: the layers of its pipeline stage, split over its
// tensor-parallel group.
struct ModelPartition {
  Layout layout;                    // its tensor and pipeline sizes matter here
  Layout::Coordinates at;           // this rank's tensor and pipeline coordinates
  Communicator* tensor = nullptr;   // the tensor-parallel group; required when tensor_parallel > 1
  Communicator* data = nullptr;     // the data-parallel group, for global-batch MoE statistics
  std::int64_t flat_alignment = 1;  // flat buffers padded to a multiple of this (ZeRO shards)
  // ZeRO-2: no flat gradient buffer; gradients live in per-layer buckets (Model::GradientSink).
  bool gradient_buckets = false;

  bool first_stage() const { return at.pp == 0; }
  bool last_stage() const { return at.pp == layout.pipeline_parallel - 1; }
};

// The parameters one rank of a partition holds, in flat order with their offsets, without memory
// (weight and grad are empty).
std::vector<Parameter> partition_parameters(const Architecture& arch,
                                            const ModelPartition& partition);

// Parameters one rank of pipeline stage `stage` holds (tensor-parallel rank 0, whose vocabulary
// slice is the largest).
std::int64_t rank_parameters(const Architecture& arch, const Layout& layout, int stage);

// This rank's part of a whole tensor laid out as p.global_shape, and back.
std::vector<float> local_part(const Parameter& p, std::span<const float> whole);
void place_part(const Parameter& p, std::span<const float> part, std::span<float> whole);

}  // namespace fastllm
