#pragma once
// The parameters of one pipeline stage as the decoder's blocks use them, wired by each parameter's
// role in the parameter table (model/parameters.h). The training Model and the Generator share it.
#include <vector>

#include "config/architecture.h"
#include "model/parameters.h"

namespace fastllm {

// A dense MLP, or one expert of an MoE layer. gate is null when the MLP is not gated.
struct MlpWeights {
  const Parameter *gate = nullptr, *up = nullptr, *down = nullptr;
  const Parameter *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
};

struct LayerWeights {
  const Parameter *norm1 = nullptr, *norm1_bias = nullptr, *norm2 = nullptr, *norm2_bias = nullptr;
  const Parameter *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  const Parameter *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
  const Parameter* router = nullptr;  // MoE only
  std::vector<MlpWeights> mlps;       // one for a dense layer, one per expert for MoE
};

struct StageWeights {
  std::vector<LayerWeights> layers;       // the stage's layers
  const Parameter* embedding = nullptr;   // first stage
  const Parameter* final_norm = nullptr;  // last stage
  const Parameter* final_norm_bias = nullptr;
  const Parameter* lm_head = nullptr;  // last stage; the embedding (or its tied copy) when tied
};

// `parameters`: what partition_parameters(arch, partition) gives this rank; the result points
// into it.
StageWeights wire_stage(const Architecture& arch, const ModelPartition& partition,
                        const std::vector<Parameter>& parameters);

}  // namespace fastllm
