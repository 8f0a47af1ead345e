// One training step of a small Mistral-architecture model on the host backend: zero the
// gradients, forward, backward (and, with optimizer:1, the AdamW update), in tokens per second.
// benchmarks/step/run.sh sets it next to transformers' MistralForCausalLM on PyTorch's CPU build.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "config/architecture.h"
#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"
#include "model/model.h"
#include "parallel/pipeline.h"
#include "train/optimizer.h"

namespace fastllm {
namespace {

// hidden 512, 8 layers, 8 heads over 4 KV heads of 64, SwiGLU FFN 1536, vocab 32000, untied
// embeddings: transformers' MistralConfig defaults elsewhere (rope_theta 10000, eps 1e-5).
Architecture step_architecture() {
  Architecture a;
  a.num_layers = 8;
  a.hidden_size = 512;
  a.vocab_size = 32000;
  a.num_attention_heads = 8;
  a.head_groups = 4;
  a.kv_channels = 64;
  a.ffn_hidden_size = 1536;
  a.gated = true;
  a.activation = Activation::SiLU;
  a.normalization = NormType::RMSNorm;
  a.norm_epsilon = 1e-5;
  a.rotary_embedding_scale = -std::log(10000.0);
  a.tie_word_embeddings = false;
  return a;
}

// Uniform random tokens; targets are the next token, the last position predicts nothing, as
// transformers' shifted labels.
MicroBatch random_batch(std::int64_t batch, std::int64_t seq, std::int64_t vocab) {
  MicroBatch mb;
  mb.batch = batch;
  mb.seq = seq;
  std::mt19937 gen(1234);
  std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(vocab - 1));
  mb.input_ids.resize(static_cast<std::size_t>(batch * seq));
  for (auto& id : mb.input_ids)
    id = token(gen);
  mb.targets.resize(mb.input_ids.size());
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t s = 0; s < seq; ++s) {
      const auto i = static_cast<std::size_t>(b * seq + s);
      mb.targets[i] = s + 1 < seq ? mb.input_ids[i + 1] : -1;
    }
  }
  return mb;
}

// Args: batch, seq, window (0 = full causal), optimizer (1 = AdamW step after backward).
void BM_Step(benchmark::State& state) {
  const std::int64_t batch = state.range(0), seq = state.range(1);
  const bool with_optimizer = state.range(3) != 0;
  HostBackend backend;
  const Architecture arch = step_architecture();
  RunSettings run;
  run.window_size = state.range(2);
  Model model(backend, arch, run);
  model.initialize(42);
  AdamW optimizer(backend, model, AdamWSettings{});
  const MicroBatch mb = random_batch(batch, seq, arch.vocab_size);
  Pipeline pipeline(model);
  const auto predicted = static_cast<double>(batch * (seq - 1));
  double loss = 0;
  auto step = [&] {
    model.zero_grads();
    const PipelineTotals totals = pipeline.forward_backward({mb}, 1.0 / predicted, 0.0);
    if (with_optimizer) optimizer.step(1e-4, 1.0);
    loss = totals.ce_sum / predicted;
  };
  step();  // warm-up: first-touch of every buffer, the RoPE table, the thread pool
  for (auto _ : state)
    step();
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch * seq),
                                                  benchmark::Counter::kIsIterationInvariantRate);
  state.counters["params"] = static_cast<double>(model.parameter_count());
  state.counters["threads"] = omp_get_max_threads();
  state.counters["loss"] = loss;
}
BENCHMARK(BM_Step)
    ->ArgNames({"batch", "seq", "window", "optimizer"})
    ->ArgsProduct({{1, 4}, {512}, {0}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace fastllm

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("blas", fastllm::host::blas_description());
  benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
