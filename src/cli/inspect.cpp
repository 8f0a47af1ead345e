// `fastllm inspect`: what a run will be, before any GPU hour is spent.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "config/architecture.h"
#include "parallel/layout.h"

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
// weights and the two AdamW moments (sharded over data parallel with ZeRO-1).
constexpr double kWeightBytes = 2, kGradientBytes = 4, kOptimizerBytes = 12;

}  // namespace

int run_inspect(const Args& args) {
  Options options("inspect", {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Inspect});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const ModelConfig model = resolve_model(options);
  Layout layout;
  layout.tensor_parallel = static_cast<int>(options.get_int("tensor_parallel"));
  layout.pipeline_parallel = static_cast<int>(options.get_int("pipeline_parallel"));
  layout.data_parallel = static_cast<int>(options.get_int("data_parallel"));
  layout.zero_stage = static_cast<int>(options.get_int("zero_stage"));
  validate_layout(layout, model.arch);
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
                      {"zero_stage", layout.zero_stage}};
  const double optimizer_shards = layout.zero_stage == 1 ? layout.data_parallel : 1;
  for (int stage = 0; stage < layout.pipeline_parallel; ++stage) {
    const LayerRange layers = stage_layers(model.arch.num_layers, layout.pipeline_parallel, stage);
    const double params = static_cast<double>(rank_parameters(model.arch, layout, stage));
    const double weights = params * kWeightBytes, grads = params * kGradientBytes,
                 optimizer = params * kOptimizerBytes / optimizer_shards;
    report["stages"].push_back({{"stage", stage},
                                {"layers", {layers.begin, layers.end}},
                                {"parameters_per_rank", static_cast<std::int64_t>(params)},
                                {"weight_bytes", weights},
                                {"gradient_bytes", grads},
                                {"optimizer_bytes", optimizer},
                                {"total_bytes", weights + grads + optimizer}});
  }

  if (options.get_string("format") == "json") {
    std::cout << report.dump(1) << "\n";
    return 0;
  }
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
      << " ranks, ZeRO-1 " << (layout.zero_stage == 1 ? "on" : "off") << "\n";
  out << "memory per rank (bf16 weights, fp32 gradients, fp32 master weights + AdamW moments; "
         "activations not included):\n";
  for (const auto& s : report["stages"]) {
    out << "  stage " << s["stage"].get<int>() << " (layers " << s["layers"][0].get<std::int64_t>()
        << "-" << s["layers"][1].get<std::int64_t>() - 1
        << "): " << grouped(s["parameters_per_rank"].get<std::int64_t>()) << " parameters, weights "
        << gib(s["weight_bytes"]) << ", gradients " << gib(s["gradient_bytes"]) << ", optimizer "
        << gib(s["optimizer_bytes"]) << ", total " << gib(s["total_bytes"]) << "\n";
  }
  std::cout << out.str();
  return 0;
}

}  // namespace fastllm
