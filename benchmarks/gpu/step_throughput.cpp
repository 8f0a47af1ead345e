// Training-step throughput of fastllm on the CUDA backend for the three configurations of the GPU
// peer table (benchmarks/gpu/run.sh, ../shared/GPU.md): a full step (forward, backward, gradient
// norm, AdamW on fp32 master weights) on random tokens, timed after warm-up steps.
//
//   step_throughput [--config=mistral-7b|mistral-0.85b|mixtral-8e|all] [--steps=N] [--warmup=N]
//                   [--layers=N] [--dtype=bf16|fp32]
//
// Prints one JSON object per configuration: tokens/s, model TFLOP/s (DESIGN.md section 7 FLOPs),
// MFU against 989 TFLOP/s (H100/H200 SXM dense bf16), peak device memory. It measures; it never
// fails on time.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "config/architecture.h"
#include "kernels/backend_factory.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/model.h"
#include "train/optimizer.h"

namespace fastllm {
namespace {

constexpr double kPeakTflops = 989.0;

struct Config {
  Architecture arch;
  std::int64_t micro_batch = 1;
  std::int64_t seq = 4096;
  std::int64_t window = 4096;
};

Architecture mistral(std::int64_t hidden, std::int64_t ffn, std::int64_t layers, std::int64_t heads,
                     std::int64_t kv_heads) {
  Architecture a;
  a.num_layers = layers;
  a.hidden_size = hidden;
  a.vocab_size = 32000;
  a.num_attention_heads = heads;
  a.head_groups = kv_heads;
  a.kv_channels = 128;
  a.ffn_hidden_size = ffn;
  a.rotary_embedding_scale = -std::log(10000.0);
  a.norm_epsilon = 1e-5;
  return a;
}

// The configurations of ../shared/anchors/hf_baseline.py.
std::map<std::string, Config> configs() {
  std::map<std::string, Config> c;
  c["mistral-7b"] = {mistral(4096, 14336, 32, 32, 8), 1, 4096, 4096};
  c["mistral-0.85b"] = {mistral(2048, 5632, 16, 16, 4), 4, 4096, 4096};
  Config moe{mistral(2048, 5632, 8, 16, 4), 2, 4096, 4096};
  moe.arch.num_experts = 8;
  moe.arch.num_experts_per_token = 2;
  c["mixtral-8e"] = moe;
  return c;
}

std::string flag(int argc, char** argv, const std::string& name, const std::string& fallback) {
  const std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind(prefix, 0) == 0) return arg.substr(prefix.size());
  }
  return fallback;
}

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
};

Measurement measure(Backend& backend, const Config& c, int warmup, int steps) {
  RunSettings run;
  run.window_size = c.window;
  Model model(backend, c.arch, run);
  fill_weights(backend, model);
  AdamWSettings settings;
  settings.beta2 = 0.95;
  settings.weight_decay = 0.1;
  AdamW optimizer(backend, model, settings);
  MicroBatch mb;
  mb.batch = c.micro_batch;
  mb.seq = c.seq;
  std::mt19937 gen(2);
  for (std::int64_t i = 0; i < c.micro_batch * c.seq; ++i) {
    mb.input_ids.push_back(static_cast<std::int32_t>(gen() % c.arch.vocab_size));
    mb.targets.push_back(static_cast<std::int32_t>(gen() % c.arch.vocab_size));
  }
  Measurement m;
  std::vector<double> times;
  for (int step = 0; step < warmup + steps; ++step) {
    backend.synchronize();
    const auto start = std::chrono::steady_clock::now();
    model.zero_grads();
    MicroBatchResult result;
    auto state = model.forward(mb, result);
    model.backward(std::move(state), 1.0 / static_cast<double>(result.predicted), 0.0);
    const double norm = std::sqrt(backend.sum_squares(model.flat_grads()));
    optimizer.step(1e-5, norm > 1.0 ? 1.0 / (norm + 1e-6) : 1.0);
    backend.synchronize();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step >= warmup) times.push_back(seconds);
    m.loss = result.ce_sum / static_cast<double>(result.predicted);
  }
  std::sort(times.begin(), times.end());
  m.step_s = times[times.size() / 2];
  m.peak_bytes = cuda_memory_stats(backend).peak;
  return m;
}

int run(int argc, char** argv) {
  const std::string which = flag(argc, argv, "config", "all");
  const int steps = std::stoi(flag(argc, argv, "steps", "5"));
  const int warmup = std::stoi(flag(argc, argv, "warmup", "2"));
  const std::string layers = flag(argc, argv, "layers", "");
  const DType dtype = parse_compute_dtype(flag(argc, argv, "dtype", "bf16"));
  const auto all = configs();
  if (which != "all" && !all.count(which)) {
    std::cerr << "--config: '" << which
              << "', expected mistral-7b, mistral-0.85b, mixtral-8e or all\n";
    return 2;
  }
  for (const auto& [name, base] : all) {
    if (which != "all" && which != name) continue;
    Config c = base;
    // --layers applies to the 7B model only (16 of its 32 layers fit an 80 GB H100 with fp32
    // master weights and moments).
    if (!layers.empty() && name == "mistral-7b") c.arch.num_layers = std::stoll(layers);
    std::printf(
        "{\"model\": \"%s\", \"layers\": %lld, \"dtype\": \"%s\", \"micro_batch\": %lld, "
        "\"seq\": %lld",
        name.c_str(), static_cast<long long>(c.arch.num_layers), dtype_name(dtype),
        static_cast<long long>(c.micro_batch), static_cast<long long>(c.seq));
    try {
      auto backend = make_backend("cuda", dtype);
      const Measurement m = measure(*backend, c, warmup, steps);
      const double tokens = static_cast<double>(c.micro_batch * c.seq);
      const double tps = tokens / m.step_s;
      const double tflops = tps * model_flops_per_token(c.arch, c.seq, c.window) / 1e12;
      std::printf(
          ", \"step_s\": %.4f, \"tokens_per_s\": %.1f, \"model_tflops\": %.1f, "
          "\"mfu_vs_989\": %.4f, \"peak_gib\": %.2f, \"loss\": %.4f}\n",
          m.step_s, tps, tflops, tflops / kPeakTflops,
          static_cast<double>(m.peak_bytes) / (1u << 30), m.loss);
    } catch (const std::exception& e) {
      std::string what = e.what();
      for (auto& ch : what)
        if (ch == '"' || ch == '\\' || ch == '\n') ch = ' ';
      std::printf(", \"error\": \"%s\"}\n", what.c_str());
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
  } catch (const std::exception& e) {
    std::cerr << "step_throughput: " << e.what() << "\n";
    return 2;
  }
}
