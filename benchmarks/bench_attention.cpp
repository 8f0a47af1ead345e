// Host attention and RoPE throughput at Mistral-like shapes (batch 1).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/host/host_backend.h"

namespace fastllm {
namespace {

Tensor random_tensor(HostBackend& backend, std::vector<Buffer>& keep,
                     std::initializer_list<std::int64_t> shape, unsigned seed) {
  std::int64_t n = 1;
  for (auto d : shape)
    n *= d;
  keep.push_back(backend.allocate(static_cast<std::size_t>(n) * sizeof(float)));
  Tensor t = keep.back().tensor(DType::F32, shape);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> values(static_cast<std::size_t>(n));
  for (auto& x : values)
    x = dist(gen);
  backend.copy_from_host(t, values.data());
  return t;
}

// Multiply-adds of QK^T and PV over the visible (query, key) pairs, times two.
double forward_flops(std::int64_t seq, std::int64_t heads, std::int64_t dim, std::int64_t window) {
  double pairs = 0;
  for (std::int64_t i = 0; i < seq; ++i)
    pairs += static_cast<double>(window > 0 ? std::min(i + 1, window) : i + 1);
  return 4.0 * pairs * static_cast<double>(heads * dim);
}

struct AttentionCase {
  std::int64_t seq, heads, kv_heads, dim, window;
  explicit AttentionCase(const benchmark::State& state)
      : seq(state.range(0)),
        heads(state.range(1)),
        kv_heads(state.range(2)),
        dim(state.range(3)),
        window(state.range(4)) {}
};

void BM_AttentionForward(benchmark::State& state) {
  const AttentionCase c(state);
  HostBackend backend;
  std::vector<Buffer> keep;
  Tensor q = random_tensor(backend, keep, {1, c.seq, c.heads, c.dim}, 1);
  Tensor k = random_tensor(backend, keep, {1, c.seq, c.kv_heads, c.dim}, 2);
  Tensor v = random_tensor(backend, keep, {1, c.seq, c.kv_heads, c.dim}, 3);
  Tensor out = random_tensor(backend, keep, {1, c.seq, c.heads, c.dim}, 4);
  Tensor lse = random_tensor(backend, keep, {1, c.heads, c.seq}, 5);
  for (auto _ : state) {
    backend.attention_forward(q, k, v, c.window, out, lse);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(forward_flops(c.seq, c.heads, c.dim, c.window),
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(c.seq), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_AttentionForwardBackward(benchmark::State& state) {
  const AttentionCase c(state);
  HostBackend backend;
  std::vector<Buffer> keep;
  Tensor q = random_tensor(backend, keep, {1, c.seq, c.heads, c.dim}, 1);
  Tensor k = random_tensor(backend, keep, {1, c.seq, c.kv_heads, c.dim}, 2);
  Tensor v = random_tensor(backend, keep, {1, c.seq, c.kv_heads, c.dim}, 3);
  Tensor out = random_tensor(backend, keep, {1, c.seq, c.heads, c.dim}, 4);
  Tensor lse = random_tensor(backend, keep, {1, c.heads, c.seq}, 5);
  Tensor dout = random_tensor(backend, keep, {1, c.seq, c.heads, c.dim}, 6);
  Tensor dq = random_tensor(backend, keep, {1, c.seq, c.heads, c.dim}, 7);
  Tensor dk = random_tensor(backend, keep, {1, c.seq, c.kv_heads, c.dim}, 8);
  Tensor dv = random_tensor(backend, keep, {1, c.seq, c.kv_heads, c.dim}, 9);
  for (auto _ : state) {
    backend.attention_forward(q, k, v, c.window, out, lse);
    backend.attention_backward(q, k, v, out, lse, dout, c.window, dq, dk, dv);
    benchmark::ClobberMemory();
  }
  // The backward's useful work is 2.5 forwards (five GEMMs against two).
  state.counters["FLOP/s"] =
      benchmark::Counter(3.5 * forward_flops(c.seq, c.heads, c.dim, c.window),
                         benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(c.seq), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Rope(benchmark::State& state) {
  const std::int64_t seq = state.range(0);
  const std::int64_t heads = state.range(1);
  const std::int64_t dim = state.range(2);
  HostBackend backend;
  std::vector<Buffer> keep;
  Tensor x = random_tensor(backend, keep, {1, seq, heads, dim}, 1);
  bool inverse = false;
  for (auto _ : state) {
    backend.rope(x, 1e6, inverse);
    inverse = !inverse;
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(x.bytes()));
}

// {seq, heads, kv_heads, head_dim, window}
void attention_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"seq", "heads", "kv", "dim", "window"});
  b->Args({512, 8, 4, 64, 0});
  b->Args({4096, 8, 4, 64, 0});
  b->Args({4096, 32, 8, 128, 4096});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_AttentionForward)->Apply(attention_shapes);
BENCHMARK(BM_AttentionForwardBackward)->Apply(attention_shapes);
BENCHMARK(BM_Rope)
    ->ArgNames({"seq", "heads", "dim"})
    ->Args({512, 8, 64})
    ->Args({4096, 32, 128})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace fastllm

BENCHMARK_MAIN();
