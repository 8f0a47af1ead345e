// `fastllm probe`: one forward and backward pass on given tokens, written out for comparison with
// another implementation (the fixtures made by Hugging Face transformers, or another layout).
#include <cstring>
#include <iostream>

#include "cli/commands.h"
#include "config/architecture.h"
#include "io/error.h"
#include "io/safetensors.h"
#include "kernels/host/host_backend.h"
#include "model/hf_weights.h"
#include "model/model.h"

namespace fastllm {
namespace {

std::span<const std::byte> bytes_of(const void* data, std::size_t size) {
  return {static_cast<const std::byte*>(data), size};
}

// input_ids [batch, seq] from the probe input, checked against the model.
MicroBatch read_input(const std::string& path, const ModelConfig& model) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const TensorInfo* info = file.find("input_ids");
  if (!info) throw UserError(path + ": no tensor named input_ids");
  if (info->dtype != SafetensorsDtype::I64 && info->dtype != SafetensorsDtype::I32)
    throw UserError(path + ": input_ids has dtype " +
                    safetensors_dtype_name(info->dtype) + ", expected I64 (or I32)");
  if (info->shape.size() != 2)
    throw UserError(path + ": input_ids has " + std::to_string(info->shape.size()) +
                    " dimensions, expected 2 [batch, seq]");
  MicroBatch mb;
  mb.batch = info->shape[0];
  mb.seq = info->shape[1];
  if (mb.batch < 1 || mb.seq < 2)
    throw UserError(path + ": input_ids is [" + std::to_string(mb.batch) + ", " +
                    std::to_string(mb.seq) + "], expected at least one sequence of 2 tokens");
  const std::int64_t max_seq = model.run.max_sequence_length;
  if (max_seq > 0 && mb.seq > max_seq)
    throw UserError(path + ": input_ids has sequences of " + std::to_string(mb.seq) +
                    " tokens, longer than the model's " + std::to_string(max_seq) +
                    " (--max_sequence_length)");
  const std::vector<std::int64_t> ids = file.read_i64("input_ids");
  const std::int64_t vocab = model.arch.vocab_size;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      throw UserError(path + ": input_ids[" + std::to_string(i / mb.seq) + ", " +
                      std::to_string(i % mb.seq) + "] = " + std::to_string(ids[i]) +
                      " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  mb.input_ids.assign(ids.begin(), ids.end());
  // Labels are the inputs shifted by one; the last position of each sequence predicts nothing.
  mb.targets.assign(ids.size(), -1);
  for (std::int64_t b = 0; b < mb.batch; ++b) {
    for (std::int64_t s = 0; s + 1 < mb.seq; ++s)
      mb.targets[b * mb.seq + s] = static_cast<std::int32_t>(ids[b * mb.seq + s + 1]);
  }
  return mb;
}

}  // namespace

int run_probe(const Args& args) {
  Options options("probe", {FlagGroup::Model, FlagGroup::Probe});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const ModelConfig config = resolve_model(options);
  const std::string input = options.get_string("input"), output = options.get_string("output");
  if (input.empty()) throw UserError("--input is required: a safetensors file with input_ids");
  if (output.empty()) throw UserError("--output is required: where to write the results");
  const MicroBatch mb = read_input(input, config);

  HostBackend backend;
  Model model(backend, config.arch, config.run);
  if (config.load_weights) {
    load_hf_weights(model, config.checkpoint_path);
  } else {
    model.initialize(static_cast<std::uint64_t>(options.get_int("seed")));
  }
  const std::int64_t tokens = mb.batch * mb.seq, vocab = config.arch.vocab_size;
  std::vector<float> logits(static_cast<std::size_t>(tokens * vocab));
  const std::int64_t predicted = mb.batch * (mb.seq - 1);
  const double coeff = config.arch.is_moe() ? config.run.moe_aux_loss_coeff : 0.0;
  MicroBatchResult r;
  model.backward(model.forward(mb, r, logits.data()), 1.0 / static_cast<double>(predicted), coeff);
  const double loss = r.ce_sum / static_cast<double>(r.predicted) + coeff * r.aux_loss;

  std::vector<std::vector<float>> grads;
  for (const Parameter& p : model.parameters()) grads.push_back(model.read_grad(p));
  std::vector<SafetensorsTensor> out;
  out.push_back({"logits", SafetensorsDtype::F32, {mb.batch, mb.seq, vocab},
                 bytes_of(logits.data(), logits.size() * sizeof(float))});
  out.push_back({"loss", SafetensorsDtype::F64, {1}, bytes_of(&loss, sizeof loss)});
  if (config.arch.is_moe())
    out.push_back({"aux_loss", SafetensorsDtype::F64, {1}, bytes_of(&r.aux_loss, sizeof r.aux_loss)});
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const Parameter& p = model.parameters()[i];
    out.push_back({"grad." + p.name, SafetensorsDtype::F32, p.shape,
                   bytes_of(grads[i].data(), grads[i].size() * sizeof(float))});
  }
  write_safetensors(output, out);
  std::cout << "loss " << loss << (config.arch.is_moe() ? " aux_loss " + std::to_string(r.aux_loss) : "")
            << " -> " << output << "\n";
  return 0;
}

}  // namespace fastllm
