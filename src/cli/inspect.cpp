// `fastllm inspect`: what a run will be, before any GPU hour is spent.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "config/architecture.h"
#include "config/layout.h"
#include "io/error.h"
#include "model/hf_weights.h"
#include "model/memory_plan.h"
#include "model/parameters.h"

namespace fastllm {
namespace {

std::string grouped(std::int64_t v) {
  std::string digits = std::to_string(v), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

// Bytes per parameter of a mixed-precision run: bf16 weights, fp32 gradients, fp32 master
// weights and the two AdamW moments (sharded over data parallel with ZeRO-1, the gradients too
// with ZeRO-2).
constexpr double kWeightBytes = 2, kGradientBytes = 4, kOptimizerBytes = 12;
// The tokens per sample planned for when --sequence_length is not given.
constexpr std::int64_t kDefaultSequence = 4096;

// The micro-batch of the run being planned, from train's flags.
ActivationShape activation_shape(const Options& options) {
  ActivationShape shape;
  shape.micro_batch_size = options.get_int("micro_batch_size");
  shape.sequence_length =
      options.is_set("sequence_length") ? options.get_int("sequence_length") : kDefaultSequence;
  shape.recompute = parse_recompute(options.get_string("recompute"));
  shape.dtype_bytes = options.get_string("dtype") == "fp32" ? 4 : 2;
  for (const char* flag : {"micro_batch_size", "sequence_length"}) {
    const std::int64_t v = flag[0] == 'm' ? shape.micro_batch_size : shape.sequence_length;
    if (v < 1)
      throw UserError("--" + std::string(flag) + "=" + std::to_string(v) +
                      ": expected a positive integer");
  }
  return shape;
}

// The memory of one rank of each pipeline stage. per_step: micro-batches of one step per
// data-parallel rank.
nlohmann::ordered_json stage_memory(const Architecture& arch, const Layout& layout,
                                    ActivationShape shape, std::int64_t per_step,
                                    double device_bytes) {
  const double optimizer_shards = layout.zero_stage >= 1 ? layout.data_parallel : 1;
  // ZeRO-2 keeps the gradients of this rank's shard, and one bucket (a layer, or the embedding or
  // LM head slice) of the micro-batch being reduced.
  const bool zero2 = layout.zero_stage == 2 && layout.data_parallel > 1;
  const double bucket_bytes =
      kGradientBytes *
      std::max(static_cast<double>(count_parameters(arch).per_layer) / layout.tensor_parallel,
               static_cast<double>(layout.vocab_slice(arch.vocab_size, 0).rows * arch.hidden_size));
  nlohmann::ordered_json stages = nlohmann::ordered_json::array();
  for (int stage = 0; stage < layout.pipeline_parallel; ++stage) {
    const LayerRange layers = layout.stage_layers(arch.num_layers, stage);
    const double params = static_cast<double>(rank_parameters(arch, layout, stage));
    const double weights = params * kWeightBytes,
                 grads = zero2 ? params * kGradientBytes / layout.data_parallel + bucket_bytes
                               : params * kGradientBytes,
                 optimizer = params * kOptimizerBytes / optimizer_shards;
    shape.in_flight = std::min<std::int64_t>(layout.pipeline_parallel - stage, per_step);
    const ActivationMemory a = activation_memory(arch, layout, stage, shape);
    const double total = weights + grads + optimizer + a.total();
    stages.push_back({{"stage", stage},
                      {"layers", {layers.begin, layers.end}},
                      {"parameters_per_rank", static_cast<std::int64_t>(params)},
                      {"weight_bytes", weights},
                      {"gradient_bytes", grads},
                      {"optimizer_bytes", optimizer},
                      {"micro_batches_in_flight", shape.in_flight},
                      {"activation_bytes", a.activations},
                      {"logits_bytes", a.logits},
                      {"transient_bytes", a.transient},
                      {"total_bytes", total},
                      {"fits", total <= device_bytes}});
  }
  return stages;
}

std::string text_report(const ModelConfig& model, const Layout& layout,
                        const ActivationShape& shape, const nlohmann::ordered_json& report) {
  const ParameterCount count = count_parameters(model.arch);
  std::ostringstream out;
  out << "architecture"
      << (model.checkpoint_path.empty() ? "" : " (checkpoint " + model.checkpoint_path + ")")
      << "\n";
  for (const auto& [name, rv] : model.resolved) {
    char line[160];
    std::snprintf(line, sizeof line, "  %-26s %-22s %s\n", name.c_str(), rv.value.c_str(),
                  source_name(rv.source));
    out << line;
  }
  out << "  (rope theta " << model.arch.rope_theta() << ", window "
      << (model.run.window_size > 0 ? std::to_string(model.run.window_size) : "none") << ")\n\n";
  out << "parameters: " << grouped(count.total) << " (embedding " << grouped(count.embedding)
      << ", lm head " << (count.lm_head ? grouped(count.lm_head) : "tied") << ", per layer "
      << grouped(count.per_layer) << ", final norm " << grouped(count.final_norm) << ")\n\n";
  out << "layout: data " << layout.data_parallel << " x tensor " << layout.tensor_parallel
      << " x pipeline " << layout.pipeline_parallel << " = " << layout.world_size()
      << " ranks, ZeRO stage " << layout.zero_stage
      << (layout.sequence_parallel ? ", sequence parallel" : "") << "\n";
  out << "memory per rank (bf16 weights, fp32 gradients, fp32 master weights + AdamW moments; "
         "activations of micro-batches of "
      << shape.micro_batch_size << " x " << shape.sequence_length << " tokens, "
      << (shape.dtype_bytes == 2 ? "bf16" : "fp32")
      << ", --recompute=" << recompute_name(shape.recompute) << "):\n";
  const double device_bytes = report["activations"]["device_bytes"];
  for (const auto& s : report["stages"]) {
    const auto in_flight = s["micro_batches_in_flight"].get<std::int64_t>();
    out << "  stage " << s["stage"].get<int>() << " (layers " << s["layers"][0].get<std::int64_t>()
        << "-" << s["layers"][1].get<std::int64_t>() - 1
        << "): " << grouped(s["parameters_per_rank"].get<std::int64_t>()) << " parameters, weights "
        << gib(s["weight_bytes"]) << ", gradients " << gib(s["gradient_bytes"]) << ", optimizer "
        << gib(s["optimizer_bytes"]) << ", activations " << gib(s["activation_bytes"]) << " ("
        << in_flight << " micro-batch" << (in_flight > 1 ? "es" : "")
        << " in flight), logits and loss " << gib(s["logits_bytes"]) << ", largest transient "
        << gib(s["transient_bytes"]) << "; total " << gib(s["total_bytes"]) << " of "
        << gib(device_bytes) << (s["fits"].get<bool>() ? "" : ": DOES NOT FIT") << "\n";
  }
  return out.str();
}

}  // namespace

int run_inspect(const Args& args) {
  // The flags of the run it plans (train's), of which it reads the shape of a micro-batch.
  Options options("inspect", {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Inspect,
                              FlagGroup::Train, FlagGroup::Backend});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const ModelConfig model = resolve_model(options);
  check_pretrained_weights(model);
  Layout layout;
  layout.tensor_parallel = static_cast<int>(options.get_int("tensor_parallel"));
  layout.pipeline_parallel = static_cast<int>(options.get_int("pipeline_parallel"));
  layout.data_parallel = static_cast<int>(options.get_int("data_parallel"));
  layout.zero_stage = static_cast<int>(options.get_int("zero_stage"));
  layout.sequence_parallel = options.get_bool("sequence_parallel");
  layout.validate(model.arch);
  const ActivationShape shape = activation_shape(options);
  const std::int64_t per_step =
      options.is_set("batch_size")
          ? std::max<std::int64_t>(
                1, options.get_int("batch_size") / (layout.data_parallel * shape.micro_batch_size))
          : layout.pipeline_parallel;
  const double device_bytes = options.get_float("device_memory") * 1e9;
  const ParameterCount count = count_parameters(model.arch);

  nlohmann::ordered_json report;
  for (const auto& [name, rv] : model.resolved)
    report["architecture"][name] = {{"value", rv.value}, {"source", source_name(rv.source)}};
  report["checkpoint"] = model.checkpoint_path;
  report["rope_theta"] = model.arch.rope_theta();
  report["parameters"] = {{"total", count.total},
                          {"embedding", count.embedding},
                          {"lm_head", count.lm_head},
                          {"per_layer", count.per_layer},
                          {"final_norm", count.final_norm}};
  report["layout"] = {{"data_parallel", layout.data_parallel},
                      {"tensor_parallel", layout.tensor_parallel},
                      {"pipeline_parallel", layout.pipeline_parallel},
                      {"world_size", layout.world_size()},
                      {"zero_stage", layout.zero_stage},
                      {"sequence_parallel", layout.sequence_parallel}};
  report["activations"] = {{"micro_batch_size", shape.micro_batch_size},
                           {"sequence_length", shape.sequence_length},
                           {"recompute", recompute_name(shape.recompute)},
                           {"dtype_bytes", shape.dtype_bytes},
                           {"device_bytes", device_bytes}};
  report["stages"] = stage_memory(model.arch, layout, shape, per_step, device_bytes);
  std::cout << (options.get_string("format") == "json" ? report.dump(1) + "\n"
                                                       : text_report(model, layout, shape, report));
  return 0;
}

}  // namespace fastllm
