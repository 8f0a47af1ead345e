#pragma once
// Moving a model's weights between Hugging Face safetensors and the backend.
#include <string>

#include "config/architecture.h"
#include "model/model.h"

namespace fastllm {

// Compares every tensor of the checkpoint folder's safetensors headers with the architecture
// before anything is allocated: a tensor the architecture needs that is missing or has another
// shape, or a checkpoint tensor the architecture does not use (more layers, an lm_head beside tied
// embeddings), is a UserError naming the tensor, the checkpoint and both shapes. Reads headers
// only.
void check_hf_checkpoint(const Architecture& arch, const std::string& folder);
// The same for the pretrained weights a resolved model will load, if any: every command runs it
// right after resolve_model. A folder holding only config.json (enough for `inspect`) has no
// headers to compare.
void check_pretrained_weights(const ModelConfig& config);

// Reads every parameter of `model` from the checkpoint folder, converting F32/BF16/F16 to the
// compute dtype; a rank holding a tensor-parallel part reads only that part's bytes. A tensor the
// architecture needs but the checkpoint lacks, or one with another (whole) shape, is a UserError
// naming it, the checkpoint and both shapes; so is a checkpoint tensor the model does not use.
void load_hf_weights(Model& model, const std::string& folder);

}  // namespace fastllm
