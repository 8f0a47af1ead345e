#include "model/hf_weights.h"

#include <cstring>
#include <filesystem>
#include <set>

#include "io/error.h"
#include "io/half.h"
#include "io/safetensors.h"

namespace fastllm {
namespace {

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Element i of a stored tensor as float (stored bytes carry no alignment promise).
float element(const std::byte* data, SafetensorsDtype dtype, std::int64_t i) {
  switch (dtype) {
    case SafetensorsDtype::F32: {
      float v;
      std::memcpy(&v, data + 4 * i, 4);
      return v;
    }
    case SafetensorsDtype::F64: {
      double v;
      std::memcpy(&v, data + 8 * i, 8);
      return static_cast<float>(v);
    }
    case SafetensorsDtype::BF16:
    case SafetensorsDtype::F16: {
      std::uint16_t v;
      std::memcpy(&v, data + 2 * i, 2);
      return dtype == SafetensorsDtype::BF16 ? bf16_to_f32(v) : f16_to_f32(v);
    }
    default:
      return 0.0f;
  }
}

// This rank's tensor-parallel part of a tensor, touching only its bytes of the mapped file.
void read_part(const SafetensorsCheckpoint& checkpoint, const Parameter& p, std::span<float> out) {
  const TensorInfo& info = checkpoint.info(p.name);
  if (info.dtype != SafetensorsDtype::F32 && info.dtype != SafetensorsDtype::F64 &&
      info.dtype != SafetensorsDtype::BF16 && info.dtype != SafetensorsDtype::F16)
    throw UserError(checkpoint.path() + ": tensor " + p.name + " has dtype " +
                    safetensors_dtype_name(info.dtype) + ", expected F32, BF16, F16 or F64");
  const std::byte* data = checkpoint.raw(p.name).data();
  const std::int64_t cols = p.global_shape.size() > 1 ? p.global_shape[1] : 1;
  const std::int64_t local_cols = p.shape.size() > 1 ? p.shape[1] : 1;
  const std::int64_t row0 = p.split_axis == 0 ? p.split_begin : 0;
  const std::int64_t col0 = p.split_axis == 1 ? p.split_begin : 0;
  for (std::int64_t r = 0; r < p.numel / local_cols; ++r) {
    for (std::int64_t c = 0; c < local_cols; ++c)
      out[r * local_cols + c] = element(data, info.dtype, (row0 + r) * cols + col0 + c);
  }
}

// Why a checkpoint tensor outside the architecture is there, as far as its name tells.
std::string unused_reason(const Architecture& arch, const std::string& name) {
  if (name == "lm_head.weight" && arch.tie_word_embeddings)
    return "the config ties the output layer to the embeddings (tie_word_embeddings true), "
           "so a separate lm_head.weight would be ignored";
  const std::string layers = "model.layers.";
  if (name.starts_with(layers)) {
    const std::string rest = name.substr(layers.size());
    const std::size_t dot = rest.find('.');
    std::int64_t layer = -1;
    try {
      layer = std::stoll(rest.substr(0, dot));
    } catch (const std::exception&) {
      layer = -1;
    }
    if (layer >= arch.num_layers)
      return "it belongs to layer " + std::to_string(layer) + " but the config has num_layers " +
             std::to_string(arch.num_layers);
  }
  return "the architecture has no such tensor";
}

void check_tensors(const Architecture& arch, const SafetensorsCheckpoint& checkpoint,
                   const std::string& folder) {
  std::set<std::string> used;
  for (const ParameterSpec& p : parameter_table(arch)) {
    if (!checkpoint.has(p.name))
      throw UserError(folder + ": tensor " + p.name + " " + shape_text(p.shape) +
                      " that the architecture needs is not in the checkpoint");
    const TensorInfo& info = checkpoint.info(p.name);
    if (info.shape != p.shape)
      throw UserError(folder + ": tensor " + p.name + " has shape " + shape_text(info.shape) +
                      ", the architecture expects " + shape_text(p.shape) +
                      " (from the config's sizes)");
    used.insert(p.name);
  }
  for (const std::string& name : checkpoint.names()) {
    // transformers recomputes the rotary frequencies some older checkpoints store.
    if (used.count(name) != 0 || name.ends_with(".rotary_emb.inv_freq")) continue;
    throw UserError(folder + ": tensor " + name + " " + shape_text(checkpoint.info(name).shape) +
                    " is not used by the architecture: " + unused_reason(arch, name) +
                    "; fix config.json or the checkpoint");
  }
}

}  // namespace

void check_hf_checkpoint(const Architecture& arch, const std::string& folder) {
  check_tensors(arch, SafetensorsCheckpoint::open(folder), folder);
}

void load_hf_weights(Model& model, const std::string& folder) {
  const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(folder);
  check_tensors(model.arch(), checkpoint, folder);
  std::vector<float> values;
  for (Parameter& p : model.parameters()) {
    values.resize(static_cast<std::size_t>(p.numel));
    if (p.split_axis < 0) {
      checkpoint.read_f32_into(p.name, values);
    } else {
      read_part(checkpoint, p, values);
    }
    model.write_weight(p, values.data());
  }
}

void check_pretrained_weights(const ModelConfig& config) {
  const std::filesystem::path folder(config.checkpoint_path);
  if (config.load_weights && (std::filesystem::exists(folder / "model.safetensors") ||
                              std::filesystem::exists(folder / "model.safetensors.index.json")))
    check_hf_checkpoint(config.arch, config.checkpoint_path);
}

}  // namespace fastllm
