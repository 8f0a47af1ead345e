#include "model/stage_weights.h"

#include <algorithm>
#include <stdexcept>

namespace fastllm {
namespace {

// Where the block that uses p keeps it, by p's role in the parameter table.
const Parameter*& slot(StageWeights& w, const Parameter& p, std::int64_t first_layer) {
  switch (p.role) {
    case Role::Embedding:  // or, on a later last stage, the tied embedding's copy
      return w.embedding;
    case Role::FinalNorm:
      return w.final_norm;
    case Role::FinalNormBias:
      return w.final_norm_bias;
    case Role::LmHead:
      return w.lm_head;
    default:
      break;
  }
  LayerWeights& layer = w.layers[static_cast<std::size_t>(p.layer - first_layer)];
  MlpWeights& mlp = layer.mlps[static_cast<std::size_t>(std::max<std::int64_t>(p.expert, 0))];
  switch (p.role) {
    case Role::Norm1:
      return layer.norm1;
    case Role::Norm1Bias:
      return layer.norm1_bias;
    case Role::Q:
      return layer.q;
    case Role::QBias:
      return layer.q_bias;
    case Role::K:
      return layer.k;
    case Role::KBias:
      return layer.k_bias;
    case Role::V:
      return layer.v;
    case Role::VBias:
      return layer.v_bias;
    case Role::O:
      return layer.o;
    case Role::OBias:
      return layer.o_bias;
    case Role::Norm2:
      return layer.norm2;
    case Role::Norm2Bias:
      return layer.norm2_bias;
    case Role::Router:
      return layer.router;
    case Role::Gate:
      return mlp.gate;
    case Role::GateBias:
      return mlp.gate_bias;
    case Role::Up:
      return mlp.up;
    case Role::UpBias:
      return mlp.up_bias;
    case Role::Down:
      return mlp.down;
    case Role::DownBias:
      return mlp.down_bias;
    default:
      throw std::logic_error("wire_stage: " + p.name + " has no place in a layer");
  }
}

}  // namespace

StageWeights wire_stage(const Architecture& arch, const ModelPartition& partition,
                        const std::vector<Parameter>& parameters) {
  const LayerRange stage = partition.layout.stage_layers(arch.num_layers, partition.at.pp);
  StageWeights w;
  w.layers.resize(static_cast<std::size_t>(stage.end - stage.begin));
  for (LayerWeights& layer : w.layers)
    layer.mlps.resize(arch.is_moe() ? static_cast<std::size_t>(arch.num_experts) : 1);
  for (const Parameter& p : parameters)
    slot(w, p, stage.begin) = &p;
  // A tied LM head is the embedding, or on a later last stage its copy.
  if (partition.last_stage() && !w.lm_head) w.lm_head = w.embedding;
  if (!partition.first_stage()) w.embedding = nullptr;
  return w;
}

}  // namespace fastllm
