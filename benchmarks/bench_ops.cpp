// Host op throughput at the sizes a training step uses: the MLP GEMMs of a hidden-512 model over
// 512 tokens, and the memory-bound ops around them.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/host/host_backend.h"

namespace fastllm {
namespace {

// A host tensor of the given shape filled with N(0, scale) values.
struct HostTensor {
  Buffer buffer;
  Tensor tensor;
  HostTensor(HostBackend& be, std::initializer_list<std::int64_t> shape, float scale = 1.0f,
             DType dtype = DType::F32) {
    std::int64_t n = 1;
    for (auto d : shape)
      n *= d;
    buffer = be.allocate(static_cast<std::size_t>(n) * dtype_size(dtype));
    tensor = buffer.tensor(dtype, shape);
    if (dtype != DType::F32) {
      be.fill(tensor, 0.0f);
      return;
    }
    std::mt19937 gen(static_cast<unsigned>(n));
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> values(static_cast<std::size_t>(n));
    for (auto& v : values)
      v = dist(gen);
    be.copy_from_host(tensor, values.data());
  }
};

void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["FLOP/s"] =
      benchmark::Counter(flops_per_iteration * state.iterations(), benchmark::Counter::kIsRate);
}

void set_bytes(benchmark::State& state, double bytes_per_iteration) {
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes_per_iteration * state.iterations()));
}

// c[m,n] = a[m,k] b[k,n]; args: m, n, k, and which operand is stored transposed (0 none, 1 a,
// 2 b), covering the forward (x W^T) and the two backward products of a linear layer.
void BM_Gemm(benchmark::State& state) {
  HostBackend be;
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const bool ta = state.range(3) == 1, tb = state.range(3) == 2;
  HostTensor a(be, {m, k}), b(be, {k, n}), c(be, {m, n});
  for (auto _ : state) {
    be.gemm(ta, tb, m, n, k, 1.0f, a.tensor, b.tensor, 0.0f, c.tensor);
    benchmark::DoNotOptimize(c.tensor.data);
  }
  set_flops(state, 2.0 * static_cast<double>(m) * n * k);
}
BENCHMARK(BM_Gemm)
    ->Args({512, 1536, 512, 2})
    ->Args({512, 512, 1536, 0})
    ->Args({1536, 512, 512, 1})
    ->Args({512, 512, 512, 2})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_RmsNorm(benchmark::State& state) {
  HostBackend be;
  const std::int64_t rows = state.range(0), dim = state.range(1);
  const bool backward = state.range(2) != 0;
  HostTensor x(be, {rows, dim}), w(be, {dim}), y(be, {rows, dim}), rstd(be, {rows});
  HostTensor dy(be, {rows, dim}), dx(be, {rows, dim}), dw(be, {dim});
  be.rmsnorm_forward(x.tensor, w.tensor, 1e-5f, y.tensor, rstd.tensor);
  for (auto _ : state) {
    if (backward) {
      be.rmsnorm_backward(x.tensor, w.tensor, rstd.tensor, dy.tensor, dx.tensor, dw.tensor);
    } else {
      be.rmsnorm_forward(x.tensor, w.tensor, 1e-5f, y.tensor, rstd.tensor);
    }
  }
  set_bytes(state, (backward ? 3.0 : 2.0) * rows * dim * sizeof(float));
}
BENCHMARK(BM_RmsNorm)
    ->ArgsProduct({{512}, {512, 4096}, {0, 1}})
    ->ArgNames({"rows", "dim", "backward"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_SwiGlu(benchmark::State& state) {
  HostBackend be;
  const std::int64_t rows = state.range(0), dim = state.range(1);
  const bool backward = state.range(2) != 0;
  HostTensor gate(be, {rows, dim}), up(be, {rows, dim}), y(be, {rows, dim});
  HostTensor dgate(be, {rows, dim}), dup(be, {rows, dim});
  for (auto _ : state) {
    if (backward) {
      be.gated_backward(Activation::SiLU, gate.tensor, up.tensor, y.tensor, dgate.tensor,
                        dup.tensor);
    } else {
      be.gated_forward(Activation::SiLU, gate.tensor, up.tensor, y.tensor);
    }
  }
  set_bytes(state, (backward ? 5.0 : 3.0) * rows * dim * sizeof(float));
}
BENCHMARK(BM_SwiGlu)
    ->ArgsProduct({{512}, {1536, 14336}, {0, 1}})
    ->ArgNames({"rows", "dim", "backward"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// Statistics then the in-place backward, as one loss evaluation does.
void BM_CrossEntropy(benchmark::State& state) {
  HostBackend be;
  const std::int64_t rows = state.range(0), vocab = state.range(1);
  HostTensor logits(be, {rows, vocab}, 3.0f), targets(be, {rows}, 1.0f, DType::I32);
  HostTensor row_max(be, {rows}), sumexp(be, {rows}), target_logit(be, {rows});
  HostTensor grad(be, {rows, vocab});
  for (auto _ : state) {
    be.cross_entropy_stats(logits.tensor, targets.tensor, 0, row_max.tensor, sumexp.tensor,
                           target_logit.tensor);
    be.cross_entropy_backward(logits.tensor, targets.tensor, 0, row_max.tensor, sumexp.tensor,
                              1.0f / static_cast<float>(rows), grad.tensor);
  }
  set_bytes(state, 3.0 * rows * vocab * sizeof(float));
}
BENCHMARK(BM_CrossEntropy)->Args({512, 32000})->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_AdamW(benchmark::State& state) {
  HostBackend be;
  const std::int64_t n = state.range(0);
  HostTensor p(be, {n}), g(be, {n}, 0.01f), m(be, {n}, 0.001f), v(be, {n}, 0.0f);
  be.fill(v.tensor, 1e-6f);
  std::int64_t step = 1;
  for (auto _ : state) {
    be.adamw(p.tensor, g.tensor, m.tensor, v.tensor, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, step++, 1.0f);
  }
  set_bytes(state, 7.0 * n * sizeof(float));  // read p, g, m, v; write p, m, v
}
BENCHMARK(BM_AdamW)->Arg(30'000'000)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_ScatterAddRows(benchmark::State& state) {
  HostBackend be;
  const std::int64_t tokens = state.range(0), dim = state.range(1), k = 2;
  HostTensor src(be, {tokens * k, dim}), weight(be, {tokens * k}), dst(be, {tokens, dim});
  HostTensor index(be, {tokens * k}, 1.0f, DType::I32);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens * k));
  for (std::size_t i = 0; i < ids.size(); ++i)
    ids[i] = static_cast<std::int32_t>(i / k);
  be.copy_from_host(index.tensor, ids.data());
  for (auto _ : state)
    be.scatter_add_rows(src.tensor, index.tensor, weight.tensor, dst.tensor);
  set_bytes(state, (2.0 * k + 1.0) * tokens * dim * sizeof(float));
}
BENCHMARK(BM_ScatterAddRows)->Args({512, 512})->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace fastllm

BENCHMARK_MAIN();
