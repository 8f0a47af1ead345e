// Training-step throughput of fastllm for the three configurations of the GPU peer table
// (benchmarks/gpu/run.sh, ../shared/GPU.md): a full step (forward, backward, gradient norm,
// clipping, AdamW on fp32 master weights) on random tokens, timed after warm-up steps.
//
//   step_throughput [--model=mistral-7b|mistral-0.85b|mixtral-8e|all] [--steps=N] [--warmup=N]
//                   [--layers=N] [--recompute=none|selective|full] [fastllm flags ...]
//
// Every other flag is one of fastllm's own (--backend, --dtype, --attention_kernel, --peak_tflops,
// --recompute where fastllm declares it), parsed by the same table as `fastllm train`, so the
// benchmark runs the model exactly as a training run with those flags would. --backend defaults
// to cuda here.
//
// Prints one JSON object per configuration: tokens/s, model TFLOP/s (docs/DESIGN.md section 7
// FLOPs), MFU, peak device memory, and a time profile of one extra step with the device
// synchronised between its phases (forward, backward, gradient norm, optimizer). It measures;
// it never fails on time.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "config/architecture.h"
#include "config/flags.h"
#include "io/error.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/model.h"
#include "parallel/backend_setup.h"
#include "parallel/pipeline.h"
#include "train/optimizer.h"

namespace fastllm {
namespace {

// A benchmark configuration: fastllm model flags and the micro-batch, as in
// ../shared/anchors/hf_baseline.py.
struct Config {
  std::vector<std::string> model_flags;
  std::int64_t micro_batch = 1;
  std::int64_t seq = 4096;
};

std::vector<std::string> mistral_flags(int hidden, int ffn, int layers, int heads, int kv_heads) {
  return {"--hidden_size=" + std::to_string(hidden),
          "--ffn_hidden_size=" + std::to_string(ffn),
          "--num_layers=" + std::to_string(layers),
          "--num_attention_heads=" + std::to_string(heads),
          "--head_groups=" + std::to_string(kv_heads),
          "--kv_channels=128",
          "--vocab_size=32000",
          "--window_size=4096",
          "--norm_epsilon=1e-5"};
}

std::map<std::string, Config> configs() {
  std::map<std::string, Config> c;
  c["mistral-7b"] = {mistral_flags(4096, 14336, 32, 32, 8), 1, 4096};
  c["mistral-0.85b"] = {mistral_flags(2048, 5632, 16, 16, 4), 4, 4096};
  Config moe{mistral_flags(2048, 5632, 8, 16, 4), 2, 4096};
  moe.model_flags.push_back("--num_experts=8");
  moe.model_flags.push_back("--num_experts_per_token=2");
  c["mixtral-8e"] = moe;
  return c;
}

// The benchmark's own flags, taken out of the arguments; the rest are fastllm's.
struct OwnFlags {
  std::string model = "all";
  int steps = 5;
  int warmup = 2;
  std::string layers;
  std::string recompute;  // only while fastllm does not declare --recompute itself
  bool help = false;
  std::vector<std::string> rest;
};

// `arg` is --name=VALUE: VALUE into `value`.
bool take(const std::string& arg, const std::string& name, std::string& value) {
  const std::string prefix = "--" + name + "=";
  if (arg.rfind(prefix, 0) != 0) return false;
  value = arg.substr(prefix.size());
  return true;
}

OwnFlags split_flags(int argc, char** argv, bool fastllm_has_recompute) {
  OwnFlags own;
  std::string steps = "5", warmup = "2";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool mine = arg == "--help" || take(arg, "model", own.model) ||
                      take(arg, "layers", own.layers) || take(arg, "steps", steps) ||
                      take(arg, "warmup", warmup) ||
                      (!fastllm_has_recompute && take(arg, "recompute", own.recompute));
    if (arg == "--help") own.help = true;
    if (!mine) own.rest.push_back(arg);
  }
  own.steps = static_cast<int>(Options::parse_int("steps", steps));
  own.warmup = static_cast<int>(Options::parse_int("warmup", warmup));
  if (own.steps < 1 || own.warmup < 0)
    throw UserError("--steps must be at least 1 and --warmup at least 0");
  return own;
}

const std::vector<FlagGroup> kGroups = {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Train,
                                        FlagGroup::Backend};

// Random weights at the scale of an initialised model, written on the device from one random
// block repeated (a host generator would take minutes for billions of values).
void fill_weights(Backend& backend, Model& model) {
  const Tensor flat = model.flat_weights();
  const std::int64_t total = flat.numel();
  const std::int64_t block = std::min<std::int64_t>(total, std::int64_t{1} << 24);
  std::vector<float> values(static_cast<std::size_t>(block));
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& v : values)
    v = normal(gen);
  Buffer staging = backend.allocate(static_cast<std::size_t>(block) * sizeof(float));
  const Tensor source = staging.tensor(DType::F32, {block});
  backend.copy_from_host(source, values.data());
  for (std::int64_t offset = 0; offset < total; offset += block) {
    const std::int64_t n = std::min(block, total - offset);
    backend.copy(flat.view({total}).rows(offset, n), source.rows(0, n));
  }
}

struct Measurement {
  double step_s = 0;
  double loss = 0;
  std::size_t peak_bytes = 0;
  // One step with the device synchronised between phases.
  double forward_s = 0, backward_s = 0, norm_s = 0, optimizer_s = 0;
};

class Clock {
 public:
  explicit Clock(Backend& backend) : backend_(backend) { restart(); }
  void restart() {
    backend_.synchronize();
    start_ = std::chrono::steady_clock::now();
  }
  double lap() {
    backend_.synchronize();
    const auto now = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(now - start_).count();
    start_ = now;
    return s;
  }

 private:
  Backend& backend_;
  std::chrono::steady_clock::time_point start_;
};

Measurement measure(Backend& backend, const ModelConfig& config, Recompute recompute,
                    const Config& c, int warmup, int steps) {
  Model model(backend, config.arch, config.run, {}, recompute);
  fill_weights(backend, model);
  AdamWSettings settings;
  settings.beta2 = 0.95;
  settings.weight_decay = 0.1;
  AdamW optimizer(backend, model, settings);
  Pipeline pipeline(model, nullptr);
  MicroBatch mb;
  mb.batch = c.micro_batch;
  mb.seq = c.seq;
  std::mt19937 gen(2);
  for (std::int64_t i = 0; i < c.micro_batch * c.seq; ++i) {
    mb.input_ids.push_back(static_cast<std::int32_t>(gen() % config.arch.vocab_size));
    mb.targets.push_back(static_cast<std::int32_t>(gen() % config.arch.vocab_size));
  }
  const double ce_scale = 1.0 / static_cast<double>(c.micro_batch * c.seq);
  const double aux_scale = config.arch.is_moe() ? config.run.moe_aux_loss_coeff : 0.0;
  Measurement m;
  // The step of `fastllm train` on one rank: zeroed gradients, forward and backward, global norm,
  // clipping to 1 and AdamW.
  const auto step = [&](Clock* phases) {
    model.zero_grads();
    const PipelineTotals totals = pipeline.forward_backward({mb}, ce_scale, aux_scale);
    if (phases) m.backward_s = phases->lap();
    const double norm = std::sqrt(optimizer.grad_sum_squares());
    if (phases) m.norm_s = phases->lap();
    optimizer.step(1e-5, norm > 1.0 ? 1.0 / (norm + 1e-6) : 1.0);
    if (phases) m.optimizer_s = phases->lap();
    m.loss = totals.ce_sum / static_cast<double>(std::max<std::int64_t>(totals.predicted, 1));
  };
  std::vector<double> times;
  Clock clock(backend);
  for (int i = 0; i < warmup + steps; ++i) {
    clock.restart();
    step(nullptr);
    const double seconds = clock.lap();
    if (i >= warmup) times.push_back(seconds);
  }
  std::sort(times.begin(), times.end());
  m.step_s = times[times.size() / 2];
  // The profile: a forward pass alone, then a step whose forward+backward minus that is backward.
  clock.restart();
  pipeline.forward({mb});
  m.forward_s = clock.lap();
  step(&clock);
  m.backward_s = std::max(0.0, m.backward_s - m.forward_s);
  m.peak_bytes = cuda_memory_stats(backend).peak;
  return m;
}

std::string json_escaped(std::string s) {
  for (auto& ch : s)
    if (ch == '"' || ch == '\\' || ch == '\n' || ch == '\t') ch = ' ';
  return s;
}

int run(int argc, char** argv) {
  const bool fastllm_has_recompute = Options("step_throughput", kGroups).has_spec("recompute");
  const OwnFlags own = split_flags(argc, argv, fastllm_has_recompute);
  if (own.help) {
    std::cout << "usage: step_throughput [--model=mistral-7b|mistral-0.85b|mixtral-8e|all] "
                 "[--steps=N] [--warmup=N] [--layers=N (mistral-7b only)]"
              << (fastllm_has_recompute ? "" : " [--recompute=none|selective|full]")
              << " [fastllm flags]\n\n"
              << Options("step_throughput", kGroups).help_text();
    return 0;
  }
  const auto all = configs();
  if (own.model != "all" && !all.count(own.model))
    throw UserError("--model=" + own.model +
                    ": expected mistral-7b, mistral-0.85b, mixtral-8e or all");
  for (const auto& [name, c] : all) {
    if (own.model != "all" && own.model != name) continue;
    std::vector<std::string> args = {"--backend=cuda"};
    args.insert(args.end(), c.model_flags.begin(), c.model_flags.end());
    // --layers applies to the 7B model only (16 of its 32 layers fit an 80 GB H100 with fp32
    // master weights and moments).
    if (!own.layers.empty() && name == "mistral-7b") args.push_back("--num_layers=" + own.layers);
    args.insert(args.end(), own.rest.begin(), own.rest.end());
    Options options("step_throughput", kGroups);
    options.parse(args);
    const ModelConfig config = resolve_model(options);
    const std::string recompute_text = fastllm_has_recompute
                                           ? options.get_string("recompute")
                                           : (own.recompute.empty() ? "none" : own.recompute);
    const Recompute recompute = parse_recompute(recompute_text);
    const std::string attention =
        options.has_spec("attention_kernel") ? options.get_string("attention_kernel") : "";
    std::printf(
        "{\"model\": \"%s\", \"layers\": %lld, \"dtype\": \"%s\", \"recompute\": \"%s\", "
        "\"attention_kernel\": \"%s\", \"micro_batch\": %lld, \"seq\": %lld",
        name.c_str(), static_cast<long long>(config.arch.num_layers),
        options.get_string("dtype").c_str(), recompute_name(recompute), attention.c_str(),
        static_cast<long long>(c.micro_batch), static_cast<long long>(c.seq));
    std::fflush(stdout);
    try {
      const auto backend = backend_from_flags(options);
      const Measurement m = measure(*backend, config, recompute, c, own.warmup, own.steps);
      const double tokens = static_cast<double>(c.micro_batch * c.seq);
      const double tps = tokens / m.step_s;
      const double tflops =
          tps * model_flops_per_token(config.arch, c.seq, config.run.window_size) / 1e12;
      const double peak = peak_tflops(options, *backend);
      std::printf(
          ", \"step_s\": %.4f, \"tokens_per_s\": %.1f, \"model_tflops\": %.1f, \"mfu\": %.4f, "
          "\"peak_gib\": %.2f, \"loss\": %.4f, \"profile_s\": {\"forward\": %.4f, "
          "\"backward\": %.4f, \"grad_norm\": %.4f, \"optimizer\": %.4f}}\n",
          m.step_s, tps, tflops, peak > 0 ? tflops / peak : 0.0,
          static_cast<double>(m.peak_bytes) / (1u << 30), m.loss, m.forward_s, m.backward_s,
          m.norm_s, m.optimizer_s);
    } catch (const std::exception& e) {
      std::printf(", \"error\": \"%s\"}\n", json_escaped(e.what()).c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace fastllm

int main(int argc, char** argv) {
  try {
    return fastllm::run(argc, argv);
  } catch (const fastllm::UserError& e) {
    std::cerr << "step_throughput: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "step_throughput: " << e.what() << "\n";
    return 1;
  }
}
