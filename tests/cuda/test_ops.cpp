// Every op of the CUDA backend against the host backend (itself tested against naive loops and
// finite differences in tests/kernels) on the same inputs, at odd sizes, in fp32 (1e-5 relative)
// and bf16 (2e-2) compute. Outputs start as NaN, so an element the kernel leaves unwritten fails.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>

#include "cuda_test_util.h"

namespace fastllm::test {
namespace {

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
    env_ = std::make_unique<CudaVsHost>(GetParam());
  }
  CudaVsHost& e() { return *env_; }
  DType dt() const { return GetParam(); }
  double tol() const { return env_->tolerance(); }
  // Random values as a tensor of the compute dtype holds them.
  std::vector<float> values(std::size_t n, unsigned seed, float scale = 1.0f) {
    return env_->representable(random_vector(n, seed, scale), dt());
  }
  void check_activations(std::int64_t n, Activation kind);

 private:
  std::unique_ptr<CudaVsHost> env_;
};

TEST_P(CudaOps, GemmEveryTranspositionAndOutputDtype) {
  struct Size {
    std::int64_t m, n, k;
  };
  unsigned seed = 1;
  for (Size s : {Size{1, 1, 1}, Size{7, 13, 5}, Size{37, 129, 65}, Size{257, 100, 300},
                 Size{64, 128, 256}}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        for (DType c_dtype : {dt(), DType::F32}) {
          SCOPED_TRACE(::testing::Message() << s.m << "x" << s.n << "x" << s.k << " ta " << ta
                                            << " tb " << tb << " c " << dtype_name(c_dtype));
          auto a = values(s.m * s.k, seed++);
          auto b = values(s.k * s.n, seed++);
          auto c0 = e().representable(random_vector(s.m * s.n, seed++), c_dtype);
          const std::vector<std::int64_t> a_shape =
              ta ? std::vector{s.k, s.m} : std::vector{s.m, s.k};
          const std::vector<std::int64_t> b_shape =
              tb ? std::vector{s.n, s.k} : std::vector{s.k, s.n};
          std::vector<float> want = c0;
          e().host().gemm(ta, tb, s.m, s.n, s.k, 0.7f, e().on_host(a, a_shape),
                          e().on_host(b, b_shape), 0.3f, e().on_host(want, {s.m, s.n}));
          Tensor c = e().device(c0, {s.m, s.n}, c_dtype);
          e().cuda().gemm(ta, tb, s.m, s.n, s.k, 0.7f, e().device(a, a_shape),
                          e().device(b, b_shape), 0.3f, c);
          EXPECT_LE(relative_error(e().read(c), want), tol());
        }
      }
    }
  }
}

TEST_P(CudaOps, GemmMixedOperandsAndEmptyProduct) {
  // An f32 operand against one of the compute dtype (the router's gradients in a bf16 model).
  const std::int64_t m = 33, n = 9, k = 70;
  auto a = values(m * k, 11);
  auto b = values(k * n, 12);
  std::vector<float> want(m * n, 0.0f);
  e().host().gemm(false, false, m, n, k, 1.0f, e().on_host(a, {m, k}), e().on_host(b, {k, n}), 0.0f,
                  e().on_host(want, {m, n}));
  Tensor c = e().device_poisoned({m, n}, dt());
  e().cuda().gemm(false, false, m, n, k, 1.0f, e().device(a, {m, k}, DType::F32),
                  e().device(b, {k, n}), 0.0f, c);
  EXPECT_LE(relative_error(e().read(c), want), tol());
  // k = 0 with beta = 0 writes zeros over whatever c held, NaN included, as BLAS does.
  Tensor empty = e().device_poisoned({m, n}, dt());
  e().cuda().gemm(false, false, m, n, 0, 1.0f, e().device(a, {m, k}), e().device(b, {k, n}), 0.0f,
                  empty);
  for (float v : e().read(empty))
    ASSERT_EQ(v, 0.0f);
}

TEST_P(CudaOps, AddScaleAndSumSquares) {
  // Whole 16-byte packs (4096), a tail (100003), and views one element off alignment.
  for (std::int64_t n : {1, 255, 4096, 100003}) {
    for (std::int64_t offset : {0, 1}) {
      SCOPED_TRACE(::testing::Message() << n << " offset " << offset);
      auto y0 = values(n + offset, 21);
      auto x0 = values(n + offset, 22);
      std::vector<float> want(y0.begin() + offset, y0.end());
      std::vector<float> x(x0.begin() + offset, x0.end());
      e().host().add(e().on_host(want, {n}), e().on_host(x, {n}), -0.6f);
      e().host().scale(e().on_host(want, {n}), 1.7f);
      Tensor y = e().device(y0, {n + offset}).rows(offset, n);
      e().cuda().add(y, e().device(x0, {n + offset}).rows(offset, n), -0.6f);
      e().cuda().scale(y, 1.7f);
      EXPECT_LE(relative_error(e().read(y), want), tol());
      const double host_sum = e().host().sum_squares(e().on_host(x, {n}));
      EXPECT_NEAR(e().cuda().sum_squares(e().device(x, {n})), host_sum, 1e-9 * host_sum);
    }
  }
}

TEST_P(CudaOps, BiasAndItsGradient) {
  for (auto [rows, width] : {std::pair<std::int64_t, std::int64_t>{1, 7}, {301, 129}, {4099, 33}}) {
    auto y0 = values(rows * width, 31);
    auto bias = values(width, 32);
    std::vector<float> want = y0;
    e().host().add_bias(e().on_host(want, {rows, width}), e().on_host(bias, {width}));
    Tensor y = e().device(y0, {rows, width});
    e().cuda().add_bias(y, e().device(bias, {width}));
    EXPECT_LE(relative_error(e().read(y), want), tol()) << rows;
    auto db0 = random_vector(width, 33);
    std::vector<float> db_want = db0;
    e().host().bias_backward(e().on_host(y0, {rows, width}), e().on_host(db_want, {width}));
    Tensor db = e().device(db0, {width}, DType::F32);
    e().cuda().bias_backward(e().device(y0, {rows, width}), db);
    EXPECT_LE(relative_error(e().read(db), db_want), 1e-5) << rows;
  }
}

TEST_P(CudaOps, EmbeddingForwardAndBackwardWithAVocabSlice) {
  const std::int64_t vocab = 37, dim = 129, offset = 20, tokens = 301;
  auto table = values(vocab * dim, 41);
  std::vector<std::int32_t> ids(tokens);
  std::mt19937 gen(42);
  for (auto& id : ids)
    id = static_cast<std::int32_t>(gen() % 70);  // repeats, and ids of other slices
  std::vector<float> want(tokens * dim);
  e().host().embedding_forward(e().on_host_ints(ids, {tokens}), e().on_host(table, {vocab, dim}),
                               offset, e().on_host(want, {tokens, dim}));
  Tensor out = e().device_poisoned({tokens, dim}, dt());
  e().cuda().embedding_forward(e().device_ints(ids, {tokens}), e().device(table, {vocab, dim}),
                               offset, out);
  EXPECT_EQ(relative_error(e().read(out), want), 0.0);

  auto dout = values(tokens * dim, 43);
  auto grad0 = random_vector(vocab * dim, 44);
  std::vector<float> grad_want = grad0;
  e().host().embedding_backward(e().on_host_ints(ids, {tokens}), e().on_host(dout, {tokens, dim}),
                                offset, e().on_host(grad_want, {vocab, dim}));
  Tensor grad = e().device(grad0, {vocab, dim}, DType::F32);
  e().cuda().embedding_backward(e().device_ints(ids, {tokens}), e().device(dout, {tokens, dim}),
                                offset, grad);
  // Both add each id's rows in token order in f32.
  EXPECT_LE(relative_error(e().read(grad), grad_want), 1e-6);
}

TEST_P(CudaOps, RmsNormForwardAndBackward) {
  for (auto [rows, dim] : {std::pair<std::int64_t, std::int64_t>{1, 7}, {37, 129}, {300, 4096}}) {
    SCOPED_TRACE(::testing::Message() << rows << " x " << dim);
    auto x = values(rows * dim, 51);
    auto w = values(dim, 52);
    std::vector<float> y_want(rows * dim), rstd_want(rows);
    e().host().rmsnorm_forward(e().on_host(x, {rows, dim}), e().on_host(w, {dim}), 1e-5f,
                               e().on_host(y_want, {rows, dim}), e().on_host(rstd_want, {rows}));
    Tensor y = e().device_poisoned({rows, dim}, dt());
    Tensor rstd = e().device_poisoned({rows}, DType::F32);
    e().cuda().rmsnorm_forward(e().device(x, {rows, dim}), e().device(w, {dim}), 1e-5f, y, rstd);
    EXPECT_LE(relative_error(e().read(y), y_want), tol());
    EXPECT_LE(relative_error(e().read(rstd), rstd_want), 1e-6);

    auto dy = values(rows * dim, 53);
    auto dw0 = random_vector(dim, 54);
    std::vector<float> dx_want(rows * dim), dw_want = dw0;
    e().host().rmsnorm_backward(e().on_host(x, {rows, dim}), e().on_host(w, {dim}),
                                e().on_host(rstd_want, {rows}), e().on_host(dy, {rows, dim}),
                                e().on_host(dx_want, {rows, dim}), e().on_host(dw_want, {dim}));
    Tensor dx = e().device_poisoned({rows, dim}, dt());
    Tensor dw = e().device(dw0, {dim}, DType::F32);
    e().cuda().rmsnorm_backward(e().device(x, {rows, dim}), e().device(w, {dim}), rstd,
                                e().device(dy, {rows, dim}), dx, dw);
    EXPECT_LE(relative_error(e().read(dx), dx_want), tol());
    EXPECT_LE(relative_error(e().read(dw), dw_want), 1e-5);
  }
}

TEST_P(CudaOps, LayerNormForwardAndBackward) {
  for (auto [rows, dim] : {std::pair<std::int64_t, std::int64_t>{3, 5}, {129, 257}}) {
    SCOPED_TRACE(::testing::Message() << rows << " x " << dim);
    auto x = values(rows * dim, 61);
    auto w = values(dim, 62);
    auto b = values(dim, 63);
    std::vector<float> y_want(rows * dim), mean_want(rows), rstd_want(rows);
    e().host().layernorm_forward(e().on_host(x, {rows, dim}), e().on_host(w, {dim}),
                                 e().on_host(b, {dim}), 1e-5f, e().on_host(y_want, {rows, dim}),
                                 e().on_host(mean_want, {rows}), e().on_host(rstd_want, {rows}));
    Tensor y = e().device_poisoned({rows, dim}, dt());
    Tensor mean = e().device_poisoned({rows}, DType::F32);
    Tensor rstd = e().device_poisoned({rows}, DType::F32);
    e().cuda().layernorm_forward(e().device(x, {rows, dim}), e().device(w, {dim}),
                                 e().device(b, {dim}), 1e-5f, y, mean, rstd);
    EXPECT_LE(relative_error(e().read(y), y_want), tol());
    EXPECT_LE(relative_error(e().read(mean), mean_want), 1e-6);
    EXPECT_LE(relative_error(e().read(rstd), rstd_want), 1e-6);

    auto dy = values(rows * dim, 64);
    std::vector<float> dx_want(rows * dim), dw_want(dim, 0.5f), db_want(dim, -0.25f);
    e().host().layernorm_backward(e().on_host(x, {rows, dim}), e().on_host(w, {dim}),
                                  e().on_host(mean_want, {rows}), e().on_host(rstd_want, {rows}),
                                  e().on_host(dy, {rows, dim}), e().on_host(dx_want, {rows, dim}),
                                  e().on_host(dw_want, {dim}), e().on_host(db_want, {dim}));
    Tensor dx = e().device_poisoned({rows, dim}, dt());
    Tensor dw = e().device(std::vector<float>(dim, 0.5f), {dim}, DType::F32);
    Tensor db = e().device(std::vector<float>(dim, -0.25f), {dim}, DType::F32);
    e().cuda().layernorm_backward(e().device(x, {rows, dim}), e().device(w, {dim}), mean, rstd,
                                  e().device(dy, {rows, dim}), dx, dw, db);
    EXPECT_LE(relative_error(e().read(dx), dx_want), tol());
    EXPECT_LE(relative_error(e().read(dw), dw_want), 1e-5);
    EXPECT_LE(relative_error(e().read(db), db_want), 1e-5);
  }
}

TEST_P(CudaOps, RopeForwardAndInverse) {
  for (const std::vector<std::int64_t>& shape :
       {std::vector<std::int64_t>{2, 37, 3, 16}, std::vector<std::int64_t>{1, 1029, 2, 128}}) {
    for (bool inverse : {false, true}) {
      auto x = values(count(shape), 71);
      std::vector<float> want = x;
      e().host().rope(e().on_host(want, shape), 1e6, inverse);
      Tensor t = e().device(x, shape);
      e().cuda().rope(t, 1e6, inverse);
      EXPECT_LE(relative_error(e().read(t), want), tol()) << shape[1] << " inverse " << inverse;
    }
  }
}

struct AttentionCase {
  std::int64_t batch, seq, heads, kv_heads, dim, window;
  std::vector<std::int32_t> positions = {};  // packed documents ([batch, seq]), or none
};

// Positions of rows packed with documents of the given lengths, in turn, until each row is full.
std::vector<std::int32_t> packed_positions(std::int64_t batch, std::int64_t seq,
                                           const std::vector<std::int64_t>& lengths) {
  std::vector<std::int32_t> out;
  std::size_t next = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    std::int64_t position = 0, length = 0;
    for (std::int64_t i = 0; i < seq; ++i, ++position) {
      if (position == length) {
        length = lengths[next++ % lengths.size()];
        position = 0;
      }
      out.push_back(static_cast<std::int32_t>(position));
    }
  }
  return out;
}

TEST_P(CudaOps, RopeAtPositions) {
  const std::vector<std::int64_t> shape{2, 300, 3, 128};
  auto positions = packed_positions(2, 300, {1, 70, 3, 150});
  for (bool inverse : {false, true}) {
    auto x = values(count(shape), 73);
    std::vector<float> want = x;
    e().host().rope_positions(e().on_host(want, shape), e().on_host_ints(positions, {2, 300}), 1e6,
                              inverse);
    Tensor t = e().device(x, shape);
    e().cuda().rope_positions(t, e().device_ints(positions, {2, 300}), 1e6, inverse);
    EXPECT_LE(relative_error(e().read(t), want), tol()) << "inverse " << inverse;
  }
}

// One attention case on `env`'s CUDA backend against the host, with q, k, v, out and the
// gradients of dtype dt (the compute dtype unless said), within tol.
void check_attention(CudaVsHost& env, const AttentionCase& c, unsigned seed, DType dt, double tol) {
  SCOPED_TRACE(::testing::Message()
               << "batch " << c.batch << " seq " << c.seq << " heads " << c.heads << "/"
               << c.kv_heads << " dim " << c.dim << " window " << c.window << " " << dtype_name(dt)
               << (c.positions.empty() ? "" : " packed documents"));
  const std::vector<std::int64_t> q_shape{c.batch, c.seq, c.heads, c.dim};
  const std::vector<std::int64_t> kv_shape{c.batch, c.seq, c.kv_heads, c.dim};
  const std::vector<std::int64_t> lse_shape{c.batch, c.heads, c.seq};
  auto q = env.representable(random_vector(count(q_shape), seed), dt);
  auto k = env.representable(random_vector(count(kv_shape), seed + 1), dt);
  auto v = env.representable(random_vector(count(kv_shape), seed + 2), dt);
  auto dout = env.representable(random_vector(count(q_shape), seed + 3), dt);
  std::vector<float> out_want(count(q_shape)), lse_want(count(lse_shape));
  std::vector<float> dq_want(count(q_shape)), dk_want(count(kv_shape)), dv_want(count(kv_shape));
  HostBackend& h = env.host();
  std::vector<std::int32_t> positions = c.positions;
  const Tensor host_positions =
      positions.empty() ? Tensor() : env.on_host_ints(positions, {c.batch, c.seq});
  const Tensor device_positions =
      positions.empty() ? Tensor() : env.device_ints(positions, {c.batch, c.seq});
  h.document_attention_forward(env.on_host(q, q_shape), env.on_host(k, kv_shape),
                               env.on_host(v, kv_shape), host_positions, c.window,
                               env.on_host(out_want, q_shape), env.on_host(lse_want, lse_shape));
  h.document_attention_backward(env.on_host(q, q_shape), env.on_host(k, kv_shape),
                                env.on_host(v, kv_shape), env.on_host(out_want, q_shape),
                                env.on_host(lse_want, lse_shape), env.on_host(dout, q_shape),
                                host_positions, c.window, env.on_host(dq_want, q_shape),
                                env.on_host(dk_want, kv_shape), env.on_host(dv_want, kv_shape));
  Tensor qd = env.device(q, q_shape, dt), kd = env.device(k, kv_shape, dt),
         vd = env.device(v, kv_shape, dt);
  Tensor out = env.device_poisoned(q_shape, dt);
  Tensor lse = env.device_poisoned(lse_shape, DType::F32);
  if (positions.empty()) {
    env.cuda().attention_forward(qd, kd, vd, c.window, out, lse);
  } else {
    env.cuda().document_attention_forward(qd, kd, vd, device_positions, c.window, out, lse);
  }
  EXPECT_LE(relative_error(env.read(out), out_want), tol);
  EXPECT_LE(relative_error(env.read(lse), lse_want), 1e-5);
  Tensor dq = env.device_poisoned(q_shape, dt);
  Tensor dk = env.device_poisoned(kv_shape, dt);
  Tensor dv = env.device_poisoned(kv_shape, dt);
  if (positions.empty()) {
    env.cuda().attention_backward(qd, kd, vd, out, lse, env.device(dout, q_shape, dt), c.window, dq,
                                  dk, dv);
  } else {
    env.cuda().document_attention_backward(qd, kd, vd, out, lse, env.device(dout, q_shape, dt),
                                           device_positions, c.window, dq, dk, dv);
  }
  // In bf16 or f16 the backward starts from the device's own rounded output: within the same
  // bound.
  EXPECT_LE(relative_error(env.read(dq), dq_want), tol);
  EXPECT_LE(relative_error(env.read(dk), dk_want), tol);
  EXPECT_LE(relative_error(env.read(dv), dv_want), tol);
}

void check_attention(CudaVsHost& env, const AttentionCase& c, unsigned seed) {
  check_attention(env, c, seed, env.dtype(), env.tolerance());
}

// Head dims 64 and 128 in bf16 take the tensor-core kernels, the others the portable ones.
const AttentionCase kAttentionCases[] = {
    {1, 1, 1, 1, 8, 0},     {2, 37, 4, 2, 16, 5},   {1, 77, 8, 2, 64, 0},   {1, 130, 4, 1, 128, 50},
    {2, 65, 2, 2, 96, 64},  {1, 33, 2, 1, 256, 0},  {1, 300, 4, 1, 128, 0}, {2, 200, 4, 4, 64, 64},
    {1, 129, 2, 1, 128, 3}, {1, 64, 2, 2, 128, 200}};

TEST_P(CudaOps, AttentionForwardAndBackward) {
  unsigned seed = 80;
  for (const AttentionCase& c : kAttentionCases)
    check_attention(e(), c, seed += 10);
}

// Packed documents: rows of one document, many short ones, documents of length 1, documents across
// the tiles of both kernels, with and without windows, head ratios 1, 2 and 4. Every
// --attention_kernel runs them on the own kernels (tensor cores for bf16 head_dim 64/128, else
// portable).
std::vector<AttentionCase> document_cases() {
  std::vector<AttentionCase> cases;
  const std::vector<std::vector<std::int64_t>> packings = {
      {1000}, {3, 5, 2, 7}, {1}, {1, 1, 4, 1, 9}, {150, 1, 40, 70, 33}};
  for (auto [heads, kv_heads] : {std::pair{4, 4}, std::pair{4, 2}, std::pair{8, 2}})
    for (std::int64_t window : {0, 20})
      for (std::int64_t dim : {16, 128})
        for (const auto& lengths : packings)
          cases.push_back(
              {2, 300, heads, kv_heads, dim, window, packed_positions(2, 300, lengths)});
  return cases;
}

TEST_P(CudaOps, DocumentAttentionAgainstHost) {
  for (const AttentionKernel kernel : {AttentionKernel::Cudnn, AttentionKernel::Own}) {
    SCOPED_TRACE(kernel == AttentionKernel::Cudnn ? "cudnn asked" : "own");
    CudaVsHost env(dt(), kernel);
    unsigned seed = 380;
    const std::vector<AttentionCase> cases = document_cases();
    for (const AttentionCase& c : cases)
      check_attention(env, c, seed += 10);
    const CudaKernelStats stats = cuda_kernel_stats(env.cuda());
    EXPECT_EQ(stats.cudnn_attention, 0);
    EXPECT_EQ(stats.own_attention, 2 * static_cast<std::int64_t>(cases.size()));
  }
  ::setenv("FASTLLM_CUDA_ATTENTION", "simt", 1);
  CudaVsHost portable(dt());
  ::unsetenv("FASTLLM_CUDA_ATTENTION");
  unsigned seed = 580;
  for (const AttentionCase& c : document_cases())
    check_attention(portable, c, seed += 10);
}

TEST_P(CudaOps, PortableAttentionForEveryCase) {
  // FASTLLM_CUDA_ATTENTION=simt keeps a backend off the tensor-core kernels.
  ::setenv("FASTLLM_CUDA_ATTENTION", "simt", 1);
  CudaVsHost portable(dt());
  ::unsetenv("FASTLLM_CUDA_ATTENTION");
  unsigned seed = 180;
  for (const AttentionCase& c : kAttentionCases)
    check_attention(portable, c, seed += 10);
}

// cuDNN's fused SDPA and the own kernel, each against the host: head ratios 1, 2 and 4, with and
// without a window. In bf16 cuDNN must take every case (and the own kernel none); in fp32 cuDNN
// has no kernel and the own one runs whatever was asked.
TEST_P(CudaOps, CudnnAndOwnAttentionAgainstHost) {
  const AttentionCase cases[] = {{2, 257, 8, 8, 128, 0}, {1, 300, 8, 4, 128, 64},
                                 {2, 130, 8, 2, 64, 0},  {1, 513, 4, 1, 128, 100},
                                 {1, 96, 4, 4, 64, 17},  {2, 200, 8, 2, 64, 200}};
  const std::int64_t calls = 2 * static_cast<std::int64_t>(std::size(cases));
  for (const AttentionKernel kernel : {AttentionKernel::Cudnn, AttentionKernel::Own}) {
    SCOPED_TRACE(kernel == AttentionKernel::Cudnn ? "cudnn" : "own");
    CudaVsHost env(dt(), kernel);
    unsigned seed = 280;
    for (const AttentionCase& c : cases)
      check_attention(env, c, seed += 10);
    const CudaKernelStats stats = cuda_kernel_stats(env.cuda());
    const bool cudnn = kernel == AttentionKernel::Cudnn && dt() == DType::BF16;
    EXPECT_EQ(stats.cudnn_attention, cudnn ? calls : 0);
    EXPECT_EQ(stats.own_attention, cudnn ? 0 : calls);
  }
}

// A second call of a shape reuses its graph and gives the same bits.
TEST_P(CudaOps, CudnnAttentionRepeatsOnACachedGraph) {
  const std::vector<std::int64_t> q_shape{1, 128, 4, 64}, kv_shape{1, 128, 2, 64};
  const auto q = values(count(q_shape), 301), k = values(count(kv_shape), 302),
             v = values(count(kv_shape), 303);
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    Tensor out = e().device_poisoned(q_shape, dt());
    Tensor lse = e().device_poisoned({1, 4, 128}, DType::F32);
    e().cuda().attention_forward(e().device(q, q_shape), e().device(k, kv_shape),
                                 e().device(v, kv_shape), 32, out, lse);
    auto got = e().read(out);
    if (run == 0) {
      first = got;
    } else {
      EXPECT_EQ(std::memcmp(got.data(), first.data(), got.size() * sizeof(float)), 0);
    }
  }
}

TEST_P(CudaOps, AttentionNaNStaysInItsQueryRow) {
  const AttentionCase c{1, 70, 2, 1, 64, 0};
  const std::vector<std::int64_t> q_shape{c.batch, c.seq, c.heads, c.dim};
  const std::vector<std::int64_t> kv_shape{c.batch, c.seq, c.kv_heads, c.dim};
  auto q = values(count(q_shape), 191);
  q[(7 * c.heads + 1) * c.dim + 3] = NAN;  // position 7, head 1
  Tensor out = e().device_poisoned(q_shape, dt());
  Tensor lse = e().device_poisoned({c.batch, c.heads, c.seq}, DType::F32);
  e().cuda().attention_forward(e().device(q, q_shape),
                               e().device(values(count(kv_shape), 192), kv_shape),
                               e().device(values(count(kv_shape), 193), kv_shape), 0, out, lse);
  const auto got = e().read(out);
  for (std::int64_t s = 0; s < c.seq; ++s)
    for (std::int64_t h = 0; h < c.heads; ++h)
      for (std::int64_t d = 0; d < c.dim; ++d)
        ASSERT_EQ(std::isnan(got[(s * c.heads + h) * c.dim + d]), s == 7 && h == 1)
            << "position " << s << " head " << h;
}

TEST_P(CudaOps, ActivationsAndGatedUnits) {
  for (std::int64_t n : {10007, 8192})
    for (Activation kind : {Activation::SiLU, Activation::GeLU})
      check_activations(n, kind);
}

void CudaOps::check_activations(std::int64_t n, Activation kind) {
  auto x = values(n, 91, 3.0f);
  auto u = values(n, 92);
  auto dy = values(n, 93);
  {
    SCOPED_TRACE(::testing::Message() << (kind == Activation::SiLU ? "silu " : "gelu ") << n);
    std::vector<float> y_want(n), dx_want(n), g_want(n), dg_want(n), du_want(n);
    HostBackend& h = e().host();
    h.activation_forward(kind, e().on_host(x, {n}), e().on_host(y_want, {n}));
    h.activation_backward(kind, e().on_host(x, {n}), e().on_host(dy, {n}),
                          e().on_host(dx_want, {n}));
    // The host rounds act(gate) to the dtype before the product only in bf16 models: emulate.
    std::vector<float> act = e().representable(y_want, dt());
    for (std::int64_t i = 0; i < n; ++i)
      g_want[i] = act[i] * u[i];
    h.gated_backward(kind, e().on_host(x, {n}), e().on_host(u, {n}), e().on_host(dy, {n}),
                     e().on_host(dg_want, {n}), e().on_host(du_want, {n}));
    Tensor xd = e().device(x, {n}), ud = e().device(u, {n}), dyd = e().device(dy, {n});
    Tensor y = e().device_poisoned({n}, dt()), dx = e().device_poisoned({n}, dt());
    e().cuda().activation_forward(kind, xd, y);
    e().cuda().activation_backward(kind, xd, dyd, dx);
    EXPECT_LE(relative_error(e().read(y), y_want), tol());
    EXPECT_LE(relative_error(e().read(dx), dx_want), tol());
    Tensor g = e().device_poisoned({n}, dt());
    e().cuda().gated_forward(kind, xd, ud, g);
    EXPECT_LE(relative_error(e().read(g), g_want), tol());
    // In place, as the model calls it: the gradients over gate and up.
    Tensor gate = e().device(x, {n}), up = e().device(u, {n});
    e().cuda().gated_backward(kind, gate, up, dyd, gate, up);
    EXPECT_LE(relative_error(e().read(gate), dg_want), tol());
    EXPECT_LE(relative_error(e().read(up), du_want), tol());
  }
}

TEST_P(CudaOps, CrossEntropyOnAVocabSliceInPlace) {
  for (auto [rows, vocab] : {std::pair<std::int64_t, std::int64_t>{5, 11}, {37, 32003}}) {
    SCOPED_TRACE(::testing::Message() << rows << " x " << vocab);
    const std::int64_t offset = vocab / 3;
    auto logits = values(rows * vocab, 101, 2.0f);
    std::vector<std::int32_t> targets(rows);
    std::mt19937 gen(102);
    for (auto& t : targets)
      t = static_cast<std::int32_t>(gen() % (2 * vocab));  // in and outside the slice
    targets[0] = -1;                                       // ignored
    std::vector<float> max_want(rows), sum_want(rows), target_want(rows);
    HostBackend& h = e().host();
    h.cross_entropy_stats(e().on_host(logits, {rows, vocab}), e().on_host_ints(targets, {rows}),
                          offset, e().on_host(max_want, {rows}), e().on_host(sum_want, {rows}),
                          e().on_host(target_want, {rows}));
    std::vector<float> grad_want(rows * vocab);
    h.cross_entropy_backward(e().on_host(logits, {rows, vocab}), e().on_host_ints(targets, {rows}),
                             offset, e().on_host(max_want, {rows}), e().on_host(sum_want, {rows}),
                             0.3f, e().on_host(grad_want, {rows, vocab}));
    Tensor l = e().device(logits, {rows, vocab});
    Tensor t = e().device_ints(targets, {rows});
    Tensor mx = e().device_poisoned({rows}, DType::F32);
    Tensor sum = e().device_poisoned({rows}, DType::F32);
    Tensor tl = e().device_poisoned({rows}, DType::F32);
    e().cuda().cross_entropy_stats(l, t, offset, mx, sum, tl);
    EXPECT_LE(relative_error(e().read(mx), max_want), 1e-6);
    EXPECT_LE(relative_error(e().read(sum), sum_want), 1e-5);
    EXPECT_LE(relative_error(e().read(tl), target_want), 1e-6);
    e().cuda().cross_entropy_backward(l, t, offset, mx, sum, 0.3f, l);
    EXPECT_LE(relative_error(e().read(l), grad_want), tol());
  }
}

TEST_P(CudaOps, RouterForwardBackwardAndStatistics) {
  const std::int64_t tokens = 301, experts = 8, k = 2;
  auto logits = random_vector(tokens * experts, 111, 2.0f);
  std::vector<float> probs_want(tokens * experts), weight_want(tokens * k);
  std::vector<std::int32_t> index_want(tokens * k);
  HostBackend& h = e().host();
  h.router_forward(
      e().on_host(logits, {tokens, experts}), k, e().on_host(probs_want, {tokens, experts}),
      e().on_host_ints(index_want, {tokens, k}), e().on_host(weight_want, {tokens, k}));
  Tensor probs = e().device_poisoned({tokens, experts}, DType::F32);
  Tensor index = e().device_poisoned({tokens, k}, DType::I32);
  Tensor weight = e().device_poisoned({tokens, k}, DType::F32);
  e().cuda().router_forward(e().device(logits, {tokens, experts}, DType::F32), k, probs, index,
                            weight);
  EXPECT_LE(relative_error(e().read(probs), probs_want), 1e-6);
  EXPECT_EQ(e().read_ints(index), index_want);
  EXPECT_LE(relative_error(e().read(weight), weight_want), 1e-6);

  auto dweight = random_vector(tokens * k, 112);
  auto dprob = random_vector(experts, 113);
  std::vector<float> dlogits_want(tokens * experts);
  h.router_backward(e().on_host(probs_want, {tokens, experts}),
                    e().on_host_ints(index_want, {tokens, k}), e().on_host(dweight, {tokens, k}),
                    e().on_host(dprob, {experts}), e().on_host(dlogits_want, {tokens, experts}));
  Tensor dlogits = e().device_poisoned({tokens, experts}, DType::F32);
  e().cuda().router_backward(probs, index, e().device(dweight, {tokens, k}, DType::F32),
                             e().device(dprob, {experts}, DType::F32), dlogits);
  EXPECT_LE(relative_error(e().read(dlogits), dlogits_want), 1e-6);

  std::vector<float> counts_want(experts, 1.0f), sums_want(experts, 2.0f);
  h.router_statistics(e().on_host(probs_want, {tokens, experts}),
                      e().on_host_ints(index_want, {tokens, k}),
                      e().on_host(counts_want, {experts}), e().on_host(sums_want, {experts}));
  Tensor counts = e().device(std::vector<float>(experts, 1.0f), {experts}, DType::F32);
  Tensor sums = e().device(std::vector<float>(experts, 2.0f), {experts}, DType::F32);
  e().cuda().router_statistics(probs, index, counts, sums);
  EXPECT_EQ(e().read(counts), counts_want);
  EXPECT_LE(relative_error(e().read(sums), sums_want), 1e-6);
}

TEST_P(CudaOps, PermuteGatherScatterScaleAndDot) {
  const std::int64_t tokens = 203, k = 2, experts = 5, width = 67;
  std::vector<std::int32_t> top(tokens * k);
  std::mt19937 gen(121);
  for (auto& t : top)
    t = static_cast<std::int32_t>(gen() % experts);
  std::vector<std::int32_t> token_want(tokens * k), slot_want(tokens * k),
      offsets_want(experts + 1);
  e().host().moe_permute_offsets(
      e().on_host_ints(top, {tokens, k}), experts, e().on_host_ints(token_want, {tokens * k}),
      e().on_host_ints(slot_want, {tokens * k}), e().on_host_ints(offsets_want, {experts + 1}));
  Tensor sorted_token = e().device_poisoned({tokens * k}, DType::I32);
  Tensor sorted_slot = e().device_poisoned({tokens * k}, DType::I32);
  Tensor offsets = e().device_poisoned({experts + 1}, DType::I32);
  e().cuda().moe_permute_offsets(e().device_ints(top, {tokens, k}), experts, sorted_token,
                                 sorted_slot, offsets);
  EXPECT_EQ(e().read_ints(offsets), offsets_want);
  EXPECT_EQ(e().read_ints(sorted_token), token_want);
  EXPECT_EQ(e().read_ints(sorted_slot), slot_want);

  const std::int64_t slots = tokens * k;
  auto x = values(tokens * width, 122);
  std::vector<float> gathered_want(slots * width);
  e().host().gather_rows(e().on_host(x, {tokens, width}), e().on_host_ints(token_want, {slots}),
                         e().on_host(gathered_want, {slots, width}));
  Tensor gathered = e().device_poisoned({slots, width}, dt());
  e().cuda().gather_rows(e().device(x, {tokens, width}), sorted_token, gathered);
  EXPECT_EQ(relative_error(e().read(gathered), gathered_want), 0.0);

  auto w = random_vector(slots, 123);
  std::vector<float> scaled_want = gathered_want;
  e().host().scale_rows(e().on_host(scaled_want, {slots, width}), e().on_host(w, {slots}));
  Tensor wd = e().device(w, {slots}, DType::F32);
  e().cuda().scale_rows(gathered, wd);
  EXPECT_LE(relative_error(e().read(gathered), scaled_want), tol());

  for (bool weighted : {true, false}) {
    auto dst0 = values(tokens * width, 124);
    std::vector<float> dst_want = dst0;
    e().host().scatter_add_rows(
        e().on_host(scaled_want, {slots, width}), e().on_host_ints(token_want, {slots}),
        weighted ? e().on_host(w, {slots}) : Tensor(), e().on_host(dst_want, {tokens, width}));
    Tensor dst = e().device(dst0, {tokens, width});
    e().cuda().scatter_add_rows(gathered, sorted_token, weighted ? wd : Tensor(), dst);
    EXPECT_LE(relative_error(e().read(dst), dst_want), tol()) << "weighted " << weighted;
  }

  auto b = values(tokens * width, 125);
  std::vector<float> dot_want(slots);
  e().host().dot_rows_gathered(
      e().on_host(scaled_want, {slots, width}), e().on_host(b, {tokens, width}),
      e().on_host_ints(token_want, {slots}), e().on_host(dot_want, {slots}));
  Tensor dots = e().device_poisoned({slots}, DType::F32);
  e().cuda().dot_rows_gathered(gathered, e().device(b, {tokens, width}), sorted_token, dots);
  EXPECT_LE(relative_error(e().read(dots), dot_want), tol());
}

// The experts' grouped GEMMs with the offsets moe_permute_offsets leaves on the device, at sizes
// that cut the tiles unevenly (an empty expert, partial row, column and depth tiles), and with
// one expert taking every row.
TEST_P(CudaOps, GroupedLinearAgainstHost) {
  const std::int64_t tokens = 203, k = 2, experts = 6, n = 200, depth = 136;
  const std::int64_t slots = tokens * k;
  std::vector<std::int32_t> top(slots);
  std::mt19937 gen(141);
  for (auto& t : top)
    t = static_cast<std::int32_t>(gen() % (experts - 1));  // the last expert gets nothing
  std::vector<std::int32_t> one_expert(slots, 2);
  unsigned seed = 142;
  for (auto* choice : {&top, &one_expert}) {
    std::vector<std::int32_t> token_want(slots), slot_want(slots), offsets_want(experts + 1);
    e().host().moe_permute_offsets(
        e().on_host_ints(*choice, {tokens, k}), experts, e().on_host_ints(token_want, {slots}),
        e().on_host_ints(slot_want, {slots}), e().on_host_ints(offsets_want, {experts + 1}));
    Tensor offsets = e().device_poisoned({experts + 1}, DType::I32);
    Tensor sorted_token = e().device_poisoned({slots}, DType::I32);
    Tensor sorted_slot = e().device_poisoned({slots}, DType::I32);
    e().cuda().moe_permute_offsets(e().device_ints(*choice, {tokens, k}), experts, sorted_token,
                                   sorted_slot, offsets);
    EXPECT_EQ(e().read_ints(offsets), offsets_want);
    EXPECT_EQ(e().read_ints(sorted_token), token_want);
    EXPECT_EQ(e().read_ints(sorted_slot), slot_want);

    std::vector<std::vector<float>> w, bias, dw, db;
    std::vector<Tensor> w_host, w_dev, bias_host, bias_dev, dw_host, dw_dev, db_host, db_dev;
    for (std::int64_t x = 0; x < experts; ++x) {
      w.push_back(values(n * depth, seed++, 0.3f));
      bias.push_back(values(n, seed++));
      dw.push_back(random_vector(n * depth, seed++));
      db.push_back(random_vector(n, seed++));
    }
    for (std::int64_t x = 0; x < experts; ++x) {
      w_host.push_back(e().on_host(w[x], {n, depth}));
      w_dev.push_back(e().device(w[x], {n, depth}));
      bias_host.push_back(e().on_host(bias[x], {n}));
      bias_dev.push_back(e().device(bias[x], {n}));
      dw_dev.push_back(e().device(dw[x], {n, depth}, DType::F32));
      db_dev.push_back(e().device(db[x], {n}, DType::F32));
    }
    for (std::int64_t x = 0; x < experts; ++x) {
      dw_host.push_back(e().on_host(dw[x], {n, depth}));
      db_host.push_back(e().on_host(db[x], {n}));
    }
    const Tensor offsets_host = e().on_host_ints(offsets_want, {experts + 1});

    auto in = values(slots * depth, seed++);
    std::vector<float> y_want(slots * n);
    e().host().grouped_linear_forward(e().on_host(in, {slots, depth}), w_host, bias_host,
                                      offsets_host, e().on_host(y_want, {slots, n}));
    Tensor y = e().device_poisoned({slots, n}, dt());
    e().cuda().grouped_linear_forward(e().device(in, {slots, depth}), w_dev, bias_dev, offsets, y);
    EXPECT_LE(relative_error(e().read(y), y_want), tol());

    auto dy = values(slots * n, seed++);
    auto dx0 = values(slots * depth, seed++);
    std::vector<float> dx_want = dx0;
    e().host().grouped_linear_backward_data(e().on_host(dy, {slots, n}), w_host, offsets_host, 1.0f,
                                            e().on_host(dx_want, {slots, depth}));
    Tensor dx = e().device(dx0, {slots, depth});
    e().cuda().grouped_linear_backward_data(e().device(dy, {slots, n}), w_dev, offsets, 1.0f, dx);
    EXPECT_LE(relative_error(e().read(dx), dx_want), tol());

    e().host().grouped_linear_backward_weight(e().on_host(in, {slots, depth}),
                                              e().on_host(dy, {slots, n}), offsets_host, dw_host,
                                              db_host);
    e().cuda().grouped_linear_backward_weight(e().device(in, {slots, depth}),
                                              e().device(dy, {slots, n}), offsets, dw_dev, db_dev);
    for (std::int64_t x = 0; x < experts; ++x) {
      EXPECT_LE(relative_error(e().read(dw_dev[x]), dw[x]), tol()) << "expert " << x;
      EXPECT_LE(relative_error(e().read(db_dev[x]), db[x]), tol()) << "expert " << x;
    }
  }
}

// Index checks are read at the next host wait (synchronize, copy_to_host), not after each op.
TEST_P(CudaOps, OutOfRangeIndicesThrow) {
  Tensor src = e().device(values(3 * 4, 131), {3, 4});
  Backend& cuda = e().cuda();
  EXPECT_THROW(
      {
        cuda.gather_rows(src, e().device_ints({0, 3}, {2}), e().device_poisoned({2, 4}, dt()));
        cuda.synchronize();
      },
      std::invalid_argument);
  EXPECT_THROW(
      {
        cuda.scatter_add_rows(e().device(values(8, 132), {2, 4}), e().device_ints({-1, 1}, {2}),
                              Tensor(), src);
        cuda.synchronize();
      },
      std::invalid_argument);
  EXPECT_THROW(
      {
        cuda.moe_permute_offsets(
            e().device_ints({0, 5}, {1, 2}), 4, e().device_poisoned({2}, DType::I32),
            e().device_poisoned({2}, DType::I32), e().device_poisoned({5}, DType::I32));
        cuda.synchronize();
      },
      std::invalid_argument);
  // The backend stays usable after an error.
  Tensor ok = e().device_poisoned({1, 4}, dt());
  e().cuda().gather_rows(src, e().device_ints({2}, {1}), ok);
  EXPECT_EQ(e().read(ok),
            std::vector<float>(values(3 * 4, 131).begin() + 8, values(3 * 4, 131).end()));
}

TEST_P(CudaOps, AdamWOnF32MasterWeights) {
  const std::int64_t n = 100003;
  auto p0 = random_vector(n, 141);
  std::vector<float> p_want = p0, m_want(n, 0.0f), v_want(n, 0.0f);
  Tensor p = e().device(p0, {n}, DType::F32);
  Tensor m = e().device(std::vector<float>(n, 0.0f), {n}, DType::F32);
  Tensor v = e().device(std::vector<float>(n, 0.0f), {n}, DType::F32);
  for (std::int64_t step = 1; step <= 3; ++step) {
    // Gradients stored in the compute dtype are allowed; the host sees the same values.
    auto g = values(n, 142 + static_cast<unsigned>(step));
    e().host().adamw(e().on_host(p_want, {n}), e().on_host(g, {n}), e().on_host(m_want, {n}),
                     e().on_host(v_want, {n}), 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, 0.5f);
    e().cuda().adamw(p, e().device(g, {n}), m, v, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, 0.5f);
  }
  EXPECT_LE(relative_error(e().read(m), m_want), 1e-6);
  EXPECT_LE(relative_error(e().read(v), v_want), 1e-6);
  std::vector<float> delta(n), delta_want(n);
  const auto got = e().read(p);
  for (std::int64_t i = 0; i < n; ++i) {
    delta[i] = got[i] - p0[i];
    delta_want[i] = p_want[i] - p0[i];
  }
  EXPECT_LE(relative_error(delta, delta_want), 1e-4);
}

// The fused optimizer pass against the host's: the f32 state, the compute-dtype weights written
// in the same pass (bf16: the rounding of the f32 master), the gradients cleared.
TEST_P(CudaOps, FusedAdamWRangesAgainstHost) {
  const std::int64_t n = 300007;
  const std::vector<AdamWRange> ranges{
      {0, 100000, 0.1f}, {100000, 5, 0.0f}, {100010, 150000, 0.1f}, {250010, 49997, 0.0f}};
  auto p0 = random_vector(n, 341);
  std::vector<float> p_want = p0, m_want(n, 0.0f), v_want(n, 0.0f);
  Tensor p = e().device(p0, {n}, DType::F32);
  Tensor m = e().device(std::vector<float>(n, 0.0f), {n}, DType::F32);
  Tensor v = e().device(std::vector<float>(n, 0.0f), {n}, DType::F32);
  Tensor weights = e().device(std::vector<float>(n, 0.0f), {n}, dt());
  AdamWStepScalars s;
  s.lr = 1e-3f;
  s.beta2 = 0.95f;
  s.grad_scale = 0.5f;
  std::vector<float> g;
  Tensor gd;
  for (std::int64_t step = 1; step <= 3; ++step) {
    s.step = step;
    g = random_vector(n, 342 + static_cast<unsigned>(step));
    std::vector<float> g_host = g;
    e().host().adamw_ranges(e().on_host(p_want, {n}), e().on_host(g_host, {n}),
                            e().on_host(m_want, {n}), e().on_host(v_want, {n}), Tensor(), ranges, s,
                            false);
    gd = e().device(g, {n}, DType::F32);
    e().cuda().adamw_ranges(p, gd, m, v, weights, ranges, s, /*zero_grad=*/true);
  }
  EXPECT_LE(relative_error(e().read(m), m_want), 1e-6);
  EXPECT_LE(relative_error(e().read(v), v_want), 1e-6);
  const auto got = e().read(p);
  std::vector<float> delta(n), delta_want(n);
  for (std::int64_t i = 0; i < n; ++i) {
    delta[i] = got[i] - p0[i];
    delta_want[i] = p_want[i] - p0[i];
  }
  EXPECT_LE(relative_error(delta, delta_want), 1e-4);
  const auto w = e().read(weights);
  const auto got_rounded = e().representable(got, dt());
  const auto grads = e().read(gd);
  for (const AdamWRange& r : ranges)
    for (std::int64_t i = r.begin; i < r.begin + r.count; ++i) {
      ASSERT_EQ(w[i], got_rounded[i]) << i;
      ASSERT_EQ(grads[i], 0.0f) << i;
    }
  // Between the ranges: nothing written.
  EXPECT_EQ(w[100007], 0.0f);
  EXPECT_EQ(got[100007], p0[100007]);
  EXPECT_EQ(grads[100007], g[100007]);
}

TEST_P(CudaOps, SumSquaresOverRangesAgainstHost) {
  const std::int64_t n = 1000003;
  auto x = values(n, 351);
  const std::vector<FlatRange> ranges{{0, 1}, {5, 400000}, {400005, 0}, {500000, 500003}};
  const double want = e().host().sum_squares_ranges(e().on_host(x, {n}), ranges);
  EXPECT_NEAR(e().cuda().sum_squares_ranges(e().device(x, {n}), ranges), want, 1e-9 * want);
  EXPECT_EQ(e().cuda().sum_squares_ranges(e().device(x, {n}), {}), 0.0);
}

// Under MoE the GEMMs' row counts change every step: the plan cache stays bounded (evicting) and
// every product stays right; aligned shapes never take the fallback kernel.
TEST_P(CudaOps, GemmWithChangingRowCounts) {
  const std::int64_t n = 64, k = 128;
  const auto b = values(k * n, 361);
  for (std::int64_t m = 1; m <= 600; m += 1) {
    const auto a = values(m * k, 362);
    if (m % 97 != 0 && m > 8) {
      // Exercise the cache; check the product on a sample of the shapes.
      Tensor c = e().device_poisoned({m, n}, dt());
      e().cuda().gemm(false, false, m, n, k, 1.0f, e().device(a, {m, k}), e().device(b, {k, n}),
                      0.0f, c);
      continue;
    }
    std::vector<float> want(m * n);
    std::vector<float> a_host = a, b_host = b;
    e().host().gemm(false, false, m, n, k, 1.0f, e().on_host(a_host, {m, k}),
                    e().on_host(b_host, {k, n}), 0.0f, e().on_host(want, {m, n}));
    Tensor c = e().device_poisoned({m, n}, dt());
    e().cuda().gemm(false, false, m, n, k, 1.0f, e().device(a, {m, k}), e().device(b, {k, n}), 0.0f,
                    c);
    EXPECT_LE(relative_error(e().read(c), want), tol()) << m;
  }
  EXPECT_EQ(cuda_kernel_stats(e().cuda()).gemm_fallbacks, 0);
}

TEST_P(CudaOps, ReductionsRepeatBitForBit) {
  const std::int64_t tokens = 4099, width = 129, rows = 50;
  std::vector<std::int32_t> index(tokens);
  std::mt19937 gen(151);
  for (auto& i : index)
    i = static_cast<std::int32_t>(gen() % rows);
  auto src = values(tokens * width, 152);
  auto dst0 = values(rows * width, 153);
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    Tensor dst = e().device(dst0, {rows, width});
    e().cuda().scatter_add_rows(e().device(src, {tokens, width}), e().device_ints(index, {tokens}),
                                Tensor(), dst);
    Tensor grad = e().device(std::vector<float>(rows * width, 0.0f), {rows, width}, DType::F32);
    e().cuda().embedding_backward(e().device_ints(index, {tokens}),
                                  e().device(src, {tokens, width}), 0, grad);
    Tensor db = e().device(std::vector<float>(width, 0.0f), {width}, DType::F32);
    e().cuda().bias_backward(e().device(src, {tokens, width}), db);
    auto got = e().read(dst);
    auto g = e().read(grad);
    auto d = e().read(db);
    got.insert(got.end(), g.begin(), g.end());
    got.insert(got.end(), d.begin(), d.end());
    if (run == 0) {
      first = got;
    } else {
      ASSERT_EQ(std::memcmp(got.data(), first.data(), got.size() * sizeof(float)), 0) << run;
    }
  }
}

// The linear layer with its bias fused into the GEMM (CUBLASLT_EPILOGUE_BIAS) and its bias
// gradient fused into the weight-gradient GEMM (CUBLASLT_EPILOGUE_BGRADB), against the host's
// GEMM and bias loops: with and without a bias, parameter gradients that already hold values
// (the epilogue writes, the op must add), x given as [batch, seq, in], odd and aligned sizes. In
// bf16 (the training dtype) the aligned shapes must take the epilogues, not the counted fallback.
TEST_P(CudaOps, LinearWithBiasEpiloguesAgainstHost) {
  struct Size {
    std::int64_t batch, seq, in, out;
    bool aligned;
  };
  unsigned seed = 400;
  for (Size s : {Size{1, 1, 1, 1, false}, Size{3, 7, 13, 5, false}, Size{1, 301, 65, 129, false},
                 Size{2, 128, 256, 64, true}, Size{1, 512, 128, 384, true}}) {
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(::testing::Message() << s.batch << "x" << s.seq << " in " << s.in << " out "
                                        << s.out << (with_bias ? " bias" : " no bias"));
      const std::int64_t rows = s.batch * s.seq;
      auto x = values(rows * s.in, seed++);
      auto w = values(s.out * s.in, seed++);
      auto b = values(s.out, seed++);
      auto dy = values(rows * s.out, seed++);
      auto dw0 = random_vector(s.out * s.in, seed++);
      auto db0 = random_vector(s.out, seed++);
      const std::int64_t fallbacks_before = cuda_kernel_stats(e().cuda()).epilogue_fallbacks;

      std::vector<float> y_want(rows * s.out), dw_want = dw0, db_want = db0;
      e().host().linear_forward(
          e().on_host(x, {s.batch, s.seq, s.in}), e().on_host(w, {s.out, s.in}),
          with_bias ? e().on_host(b, {s.out}) : Tensor(), e().on_host(y_want, {rows, s.out}));
      e().host().linear_backward_weight(e().on_host(x, {s.batch, s.seq, s.in}),
                                        e().on_host(dy, {rows, s.out}),
                                        e().on_host(dw_want, {s.out, s.in}),
                                        with_bias ? e().on_host(db_want, {s.out}) : Tensor());

      Tensor y = e().device_poisoned({rows, s.out}, dt());
      e().cuda().linear_forward(e().device(x, {s.batch, s.seq, s.in}), e().device(w, {s.out, s.in}),
                                with_bias ? e().device(b, {s.out}) : Tensor(), y);
      EXPECT_LE(relative_error(e().read(y), y_want), tol());
      Tensor dw = e().device(dw0, {s.out, s.in}, DType::F32);
      Tensor db = e().device(db0, {s.out}, DType::F32);
      e().cuda().linear_backward_weight(e().device(x, {s.batch, s.seq, s.in}),
                                        e().device(dy, {rows, s.out}), dw,
                                        with_bias ? db : Tensor());
      EXPECT_LE(relative_error(e().read(dw), dw_want), tol());
      // Without a bias, an existing gradient vector is left alone (db_want is db0 then).
      EXPECT_LE(relative_error(e().read(db), db_want), 1e-5);
      const std::int64_t fallbacks = cuda_kernel_stats(e().cuda()).epilogue_fallbacks;
      if (!with_bias || (dt() == DType::BF16 && s.aligned)) {
        // Without a bias there is nothing to fuse, so nothing to fall back from.
        EXPECT_EQ(fallbacks, fallbacks_before);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::F32, DType::BF16),
                         dtype_test_name);

// ---- f16: an input dtype of cuDNN's fused attention, and of copy to make such inputs ----

class CudaF16 : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
    env_ = std::make_unique<CudaVsHost>(DType::BF16);
  }
  CudaVsHost& e() { return *env_; }

 private:
  std::unique_ptr<CudaVsHost> env_;
};

// f32 -> f16 -> f32 on the device against the host compiler's _Float16 rounding (to nearest even,
// overflow to infinity, subnormals, NaN), bit for bit; and bf16 <-> f16, each one rounding of the
// exact value, against the host's bf16 rounding and _Float16.
TEST_F(CudaF16, CopyRoundTripsAgainstHostRounding) {
  std::vector<float> v = random_vector(100003, 501, 3.0f);
  const std::vector<float> special = {0.0f,
                                      -0.0f,
                                      1.0f,
                                      65504.0f,
                                      65520.0f,
                                      70000.0f,
                                      -1e6f,
                                      1e-5f,
                                      6e-8f,
                                      2.9e-8f,
                                      1e-9f,
                                      0.1f,
                                      NAN,
                                      INFINITY,
                                      -INFINITY,
                                      1.0f + 1.0f / 2048.0f,
                                      1.0f + 3.0f / 2048.0f};
  v.insert(v.begin(), special.begin(), special.end());
  const auto n = static_cast<std::int64_t>(v.size());
  const std::vector<float> want = e().representable(v, DType::F16);
  Tensor half = e().device(v, {n}, DType::F16);  // f32 staging copied to f16 on the device
  const std::vector<float> back = e().read(half);
  ASSERT_EQ(back.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) {
      ASSERT_TRUE(std::isnan(back[i])) << i;
    } else {
      ASSERT_EQ(back[i], want[i]) << i << ": " << v[i];
    }
  }
  // Odd offsets: the conversion's unpacked path as well as its packed one.
  Tensor tail = e().device(v, {n}, DType::F32).rows(3, n - 3);
  Tensor half_tail = e().device(std::vector<float>(n - 3, 0.0f), {n - 3}, DType::F16);
  e().cuda().copy(half_tail, tail);
  EXPECT_EQ(relative_error(e().read(half_tail), std::vector<float>(want.begin() + 3, want.end())),
            0.0);

  // bf16 -> f16: a bf16 value is exact in f32, then rounded once to f16.
  const std::vector<float> in_bf16 =
      e().representable(random_vector(4099, 502, 100.0f), DType::BF16);
  const auto m = static_cast<std::int64_t>(in_bf16.size());
  Tensor from_bf16 = e().device(std::vector<float>(m, 0.0f), {m}, DType::F16);
  e().cuda().copy(from_bf16, e().device(in_bf16, {m}, DType::BF16));
  EXPECT_EQ(relative_error(e().read(from_bf16), e().representable(in_bf16, DType::F16)), 0.0);
  // f16 -> bf16: an f16 value is exact in f32, then rounded once to bf16.
  const std::vector<float> in_f16 = e().representable(random_vector(4099, 503, 100.0f), DType::F16);
  Tensor to_bf16 = e().device(std::vector<float>(m, 0.0f), {m}, DType::BF16);
  e().cuda().copy(to_bf16, e().device(in_f16, {m}, DType::F16));
  EXPECT_EQ(relative_error(e().read(to_bf16), e().representable(in_f16, DType::BF16)), 0.0);
}

// f16 q, k, v through cuDNN's fused SDPA, forward and backward, against the host in f32: causal,
// sliding windows, grouped KV heads (ratios 1, 2, 4), head dims 64 and 128, odd lengths. The
// bound is 5e-3 relative (norm-wise): ten times f16's unit roundoff 2^-11, the margin bf16's 2e-2
// has over its 2^-8; the inputs are exact in f16, so what is left is cuDNN's f16 rounding of the
// output, of the probabilities in the P V product and of the backward's intermediates.
TEST_F(CudaF16, CudnnAttentionForwardAndBackwardAgainstHost) {
  const AttentionCase cases[] = {{2, 257, 8, 8, 128, 0}, {1, 300, 8, 4, 128, 64},
                                 {2, 130, 8, 2, 64, 0},  {1, 513, 4, 1, 128, 100},
                                 {1, 96, 4, 4, 64, 17},  {2, 200, 8, 2, 64, 200}};
  unsigned seed = 600;
  for (const AttentionCase& c : cases)
    check_attention(e(), c, seed += 10, DType::F16, 5e-3);
  const CudaKernelStats stats = cuda_kernel_stats(e().cuda());
  EXPECT_EQ(stats.cudnn_attention, 2 * static_cast<std::int64_t>(std::size(cases)));
  EXPECT_EQ(stats.own_attention, 0);
}

// Every op but copy and cuDNN's attention refuses f16 with the op and the dtype in its message,
// also attention asked of the own kernel and the packed-document variants (which run on it).
TEST_F(CudaF16, OtherOpsRejectF16) {
  const auto message = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  const auto names = [](const std::string& text, const char* op) {
    return text.find(op) != std::string::npos && text.find("f16") != std::string::npos;
  };
  Tensor h = e().device(e().representable(random_vector(64, 700), DType::F16), {8, 8}, DType::F16);
  Tensor f = e().device(std::vector<float>(64, 1.0f), {8, 8}, DType::F32);
  std::string text = message([&] { e().cuda().gemm(false, false, 8, 8, 8, 1.0f, h, f, 0.0f, f); });
  EXPECT_TRUE(names(text, "gemm")) << text;
  text = message([&] { e().cuda().add(f, h, 1.0f); });
  EXPECT_TRUE(names(text, "add")) << text;
  text = message([&] { e().cuda().fill(h, 0.0f); });
  EXPECT_TRUE(names(text, "fill")) << text;
  text = message([&] { e().cuda().linear_forward(h, h, Tensor(), f); });
  EXPECT_TRUE(names(text, "gemm")) << text;
  text = message([&] { e().cuda().scale(h, 2.0f); });
  EXPECT_TRUE(names(text, "scale")) << text;

  const std::vector<std::int64_t> shape{1, 64, 2, 64};
  std::vector<float> qv = e().representable(random_vector(count(shape), 701), DType::F16);
  Tensor q = e().device(qv, shape, DType::F16);
  Tensor out = e().device_poisoned(shape, DType::F16);
  Tensor lse = e().device_poisoned({1, 2, 64}, DType::F32);
  CudaVsHost own(DType::BF16, AttentionKernel::Own);
  Tensor q_own = own.device(qv, shape, DType::F16);
  Tensor out_own = own.device_poisoned(shape, DType::F16);
  Tensor lse_own = own.device_poisoned({1, 2, 64}, DType::F32);
  text = message([&] { own.cuda().attention_forward(q_own, q_own, q_own, 0, out_own, lse_own); });
  EXPECT_TRUE(names(text, "attention_forward")) << text;
  std::vector<std::int32_t> positions(64);
  std::iota(positions.begin(), positions.end(), 0);
  text = message([&] {
    e().cuda().document_attention_forward(q, q, q, e().device_ints(positions, {1, 64}), 0, out,
                                          lse);
  });
  EXPECT_TRUE(names(text, "document_attention_forward")) << text;
  // Mixed f16 and bf16 inputs are not cuDNN's case either.
  Tensor k_bf16 = e().device(qv, shape, DType::BF16);
  text = message([&] { e().cuda().attention_forward(q, k_bf16, k_bf16, 0, out, lse); });
  EXPECT_TRUE(names(text, "attention_forward")) << text;
}

}  // namespace
}  // namespace fastllm::test
