#include "model/hf_weights.h"

#include "io/error.h"
#include "io/safetensors.h"

namespace fastllm {
namespace {

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

void load_hf_weights(Model& model, const std::string& folder) {
  const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(folder);
  std::vector<float> values;
  for (Parameter& p : model.parameters()) {
    if (!checkpoint.has(p.name))
      throw UserError(folder + ": tensor " + p.name + " " + shape_text(p.shape) +
                      " that the architecture needs is not in the checkpoint");
    const TensorInfo& info = checkpoint.info(p.name);
    if (info.shape != p.shape)
      throw UserError(folder + ": tensor " + p.name + " has shape " + shape_text(info.shape) +
                      ", the architecture expects " + shape_text(p.shape));
    values.resize(static_cast<std::size_t>(p.numel));
    checkpoint.read_f32_into(p.name, values);
    model.write_weight(p, values.data());
  }
}

}  // namespace fastllm
