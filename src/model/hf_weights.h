#pragma once
// Moving a model's weights between Hugging Face safetensors and the backend.
#include <string>

#include "model/model.h"

namespace fastllm {

// Reads every parameter of `model` from the checkpoint folder, converting F32/BF16/F16 to the
// compute dtype; a rank holding a tensor-parallel part reads only that part's bytes. A tensor the
// architecture needs but the checkpoint lacks, or one with another (whole) shape, is a UserError
// naming it, the checkpoint and both shapes.
void load_hf_weights(Model& model, const std::string& folder);

}  // namespace fastllm
