#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kernels/backends.h"

namespace fastllm::test {
namespace {

struct Case {
  std::int64_t batch, seq, heads, kv_heads, dim, window;
  // Packed documents: each token's position in its document ([batch, seq]); empty = one document
  // per row.
  std::vector<std::int32_t> positions = {};
  std::size_t q_numel() const { return static_cast<std::size_t>(batch * seq * heads * dim); }
  std::size_t kv_numel() const { return static_cast<std::size_t>(batch * seq * kv_heads * dim); }
  std::size_t q_at(std::int64_t b, std::int64_t s, std::int64_t h) const {
    return static_cast<std::size_t>(((b * seq + s) * heads + h) * dim);
  }
  std::size_t kv_at(std::int64_t b, std::int64_t s, std::int64_t h) const {
    return static_cast<std::size_t>(((b * seq + s) * kv_heads + h) * dim);
  }
  bool sees(std::int64_t b, std::int64_t i, std::int64_t j) const {
    const bool same_document =
        positions.empty() || j >= i - positions[static_cast<std::size_t>(b * seq + i)];
    return j <= i && (window == 0 || j > i - window) && same_document;
  }
};

::testing::Message describe(const Case& c) {
  return ::testing::Message() << "batch " << c.batch << " seq " << c.seq << " heads " << c.heads
                              << "/" << c.kv_heads << " dim " << c.dim << " window " << c.window
                              << (c.positions.empty() ? "" : " packed documents");
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

// The textbook definition in double with the whole score matrix: softmax over the visible keys of
// scale * q.k, KV head h / (heads / kv_heads); then the gradients of sum(out * dout).
Reference naive_attention(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                          const std::vector<double>& v, const std::vector<double>& dout) {
  Reference r;
  r.out.assign(c.q_numel(), 0.0);
  r.lse.assign(static_cast<std::size_t>(c.batch * c.heads * c.seq), 0.0);
  r.dq.assign(c.q_numel(), 0.0);
  r.dk.assign(c.kv_numel(), 0.0);
  r.dv.assign(c.kv_numel(), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  std::vector<double> p(static_cast<std::size_t>(c.seq)), dp(p.size());
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t h = 0; h < c.heads; ++h) {
      const std::int64_t kvh = h / (c.heads / c.kv_heads);
      for (std::int64_t i = 0; i < c.seq; ++i) {
        const double* qi = &q[c.q_at(b, i, h)];
        double m = -INFINITY;
        for (std::int64_t j = 0; j < c.seq; ++j) {
          if (!c.sees(b, i, j)) continue;
          double dot = 0;
          for (std::int64_t d = 0; d < c.dim; ++d)
            dot += qi[d] * k[c.kv_at(b, j, kvh) + d];
          p[j] = scale * dot;
          m = std::max(m, p[j]);
        }
        double sum = 0;
        for (std::int64_t j = 0; j < c.seq; ++j)
          if (c.sees(b, i, j)) sum += std::exp(p[j] - m);
        r.lse[static_cast<std::size_t>((b * c.heads + h) * c.seq + i)] = m + std::log(sum);
        double* oi = &r.out[c.q_at(b, i, h)];
        const double* gi = &dout[c.q_at(b, i, h)];
        double p_dot_dp = 0;
        for (std::int64_t j = 0; j < c.seq; ++j) {
          if (!c.sees(b, i, j)) continue;
          p[j] = std::exp(p[j] - m) / sum;
          dp[j] = 0;
          for (std::int64_t d = 0; d < c.dim; ++d) {
            oi[d] += p[j] * v[c.kv_at(b, j, kvh) + d];
            dp[j] += gi[d] * v[c.kv_at(b, j, kvh) + d];
          }
          p_dot_dp += p[j] * dp[j];
        }
        for (std::int64_t j = 0; j < c.seq; ++j) {
          if (!c.sees(b, i, j)) continue;
          const double ds = p[j] * (dp[j] - p_dot_dp) * scale;
          for (std::int64_t d = 0; d < c.dim; ++d) {
            r.dv[c.kv_at(b, j, kvh) + d] += p[j] * gi[d];
            r.dq[c.q_at(b, i, h) + d] += ds * k[c.kv_at(b, j, kvh) + d];
            r.dk[c.kv_at(b, j, kvh) + d] += ds * qi[d];
          }
        }
      }
    }
  return r;
}

std::vector<double> widen(const std::vector<float>& x) {
  return {x.begin(), x.end()};
}

struct Inputs {
  std::vector<float> q, k, v, dout;
};

Inputs random_inputs(const Case& c, unsigned seed) {
  // Scores of a few units, so the softmax is neither flat nor one-hot.
  return {random_vector(c.q_numel(), seed, 1.5f), random_vector(c.kv_numel(), seed + 1, 1.5f),
          random_vector(c.kv_numel(), seed + 2), random_vector(c.q_numel(), seed + 3)};
}

std::vector<Case> small_cases() {
  std::vector<Case> cases;
  for (std::int64_t dim : {12, 16})
    for (auto [heads, kv_heads] : {std::pair{4, 4}, std::pair{4, 2}, std::pair{8, 2}})
      for (std::int64_t window : {0, 5, 16})
        cases.push_back({2, 37, heads, kv_heads, dim, window});
  return cases;
}

// Longer than the kernel's tiles and key blocks, with windows that do not divide them.
std::vector<Case> long_cases() {
  return {{1, 300, 8, 2, 16, 0},
          {1, 300, 8, 2, 16, 100},
          {2, 281, 4, 4, 64, 0},
          {1, 300, 4, 1, 32, 257},
          {1, 300, 2, 1, 8, 4096}};
}

// Positions of rows packed with documents of the given lengths, in turn, until each row is full.
std::vector<std::int32_t> packed_positions(std::int64_t batch, std::int64_t seq,
                                           const std::vector<std::int64_t>& lengths) {
  std::vector<std::int32_t> out;
  std::size_t next = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    std::int64_t left = 0;
    for (std::int64_t i = 0; i < seq; ++i) {
      if (left == 0) left = lengths[next++ % lengths.size()];
      out.push_back(static_cast<std::int32_t>(lengths[(next - 1) % lengths.size()] - left));
      --left;
    }
  }
  return out;
}

// Rows of one document, many short documents, documents of length 1, and documents that cross
// the kernel's tiles and key blocks, with and without windows, head ratios 1, 2 and 4.
std::vector<Case> document_cases() {
  std::vector<Case> cases;
  const std::vector<std::vector<std::int64_t>> packings = {
      {1000}, {3, 5, 2, 7}, {1}, {1, 1, 4, 1, 9}, {150, 1, 40, 200}};
  for (auto [heads, kv_heads] : {std::pair{4, 4}, std::pair{4, 2}, std::pair{8, 2}})
    for (std::int64_t window : {0, 4})
      for (const auto& lengths : packings) {
        const std::int64_t seq = lengths.size() == 4 && lengths[0] == 150 ? 300 : 37;
        cases.push_back({2, seq, heads, kv_heads, 8, window, packed_positions(2, seq, lengths)});
      }
  cases.push_back({1, 300, 8, 2, 16, 100, packed_positions(1, 300, {130, 20, 150})});
  return cases;
}

class Attention : public BackendTest {
 protected:
  struct Result {
    std::vector<float> out, lse, dq, dk, dv;
  };

  Result run(const Case& c, const Inputs& in) {
    Tensor q = upload(in.q, {c.batch, c.seq, c.heads, c.dim});
    Tensor k = upload(in.k, {c.batch, c.seq, c.kv_heads, c.dim});
    Tensor v = upload(in.v, {c.batch, c.seq, c.kv_heads, c.dim});
    Tensor dout = upload(in.dout, {c.batch, c.seq, c.heads, c.dim});
    Tensor out = zeros({c.batch, c.seq, c.heads, c.dim});
    Tensor lse = zeros({c.batch, c.heads, c.seq});
    // Stale values in the gradients must be overwritten, not accumulated into.
    Tensor dq = upload(random_vector(c.q_numel(), 99), {c.batch, c.seq, c.heads, c.dim});
    Tensor dk = upload(random_vector(c.kv_numel(), 98), {c.batch, c.seq, c.kv_heads, c.dim});
    Tensor dv = upload(random_vector(c.kv_numel(), 97), {c.batch, c.seq, c.kv_heads, c.dim});
    if (c.positions.empty()) {
      be().attention_forward(q, k, v, c.window, out, lse);
      be().attention_backward(q, k, v, out, lse, dout, c.window, dq, dk, dv);
    } else {
      Tensor positions = upload_ints(c.positions, {c.batch, c.seq});
      be().document_attention_forward(q, k, v, positions, c.window, out, lse);
      be().document_attention_backward(q, k, v, out, lse, dout, positions, c.window, dq, dk, dv);
    }
    return {download(out), download(lse), download(dq), download(dk), download(dv)};
  }

  void check(const Case& c, unsigned seed) {
    SCOPED_TRACE(describe(c));
    const Inputs in = random_inputs(c, seed);
    const Reference ref = naive_attention(c, widen(in.q), widen(in.k), widen(in.v), widen(in.dout));
    const Result got = run(c, in);
    // float32 rounding lands near 5e-7 on all of them.
    EXPECT_LE(relative_error(got.out, ref.out), 3e-6);
    EXPECT_LE(relative_error(got.lse, ref.lse), 5e-7);
    expect_gradient(got.dq, ref.dq);
    expect_gradient(got.dk, ref.dk);
    EXPECT_LE(relative_error(got.dv, ref.dv), 3e-6);
  }

  // Where every document has one token the softmax is constant and dq, dk are exactly 0: only an
  // absolute bound means anything there: float32 rounding of dP - delta (terms of a few units)
  // times q or k, summed over the heads of a group.
  static void expect_gradient(const std::vector<float>& got, const std::vector<double>& want) {
    if (std::all_of(want.begin(), want.end(), [](double x) { return x == 0.0; })) {
      for (float x : got)
        EXPECT_LE(std::fabs(x), 1e-5);
    } else {
      EXPECT_LE(relative_error(got, want), 3e-6);
    }
  }
};

TEST_P(Attention, MatchesNaiveLoopOnSmallShapes) {
  unsigned seed = 100;
  for (const Case& c : small_cases())
    check(c, seed += 10);
}

TEST_P(Attention, MatchesNaiveLoopBeyondOneBlock) {
  unsigned seed = 500;
  for (const Case& c : long_cases())
    check(c, seed += 10);
}

TEST_P(Attention, DocumentsMatchNaiveLoop) {
  unsigned seed = 700;
  for (const Case& c : document_cases())
    check(c, seed += 10);
}

// A packed row computes what each of its documents computes alone, bit for bit up to the order of
// the same sums.
TEST_P(Attention, PackedRowEqualsDocumentsAlone) {
  const std::vector<std::int64_t> lengths = {9, 1, 20, 7};
  const Case packed{1, 37, 4, 2, 8, 5, packed_positions(1, 37, lengths)};
  const Inputs in = random_inputs(packed, 41);
  const Result whole = run(packed, in);
  std::int64_t start = 0;
  for (std::int64_t length : lengths) {
    SCOPED_TRACE(::testing::Message() << "document at " << start << " of " << length);
    const Case alone{1, length, 4, 2, 8, 5};
    auto slice = [&](const std::vector<float>& x, std::int64_t width) {
      return std::vector<float>(x.begin() + start * width, x.begin() + (start + length) * width);
    };
    const std::int64_t qw = 4 * 8, kw = 2 * 8;
    const Inputs part{slice(in.q, qw), slice(in.k, kw), slice(in.v, kw), slice(in.dout, qw)};
    const Result got = run(alone, part);
    EXPECT_LE(relative_error(slice(whole.out, qw), widen(got.out)), 1e-6);
    EXPECT_LE(relative_error(slice(whole.dq, qw), widen(got.dq)), 1e-6);
    EXPECT_LE(relative_error(slice(whole.dk, kw), widen(got.dk)), 1e-6);
    EXPECT_LE(relative_error(slice(whole.dv, kw), widen(got.dv)), 1e-6);
    start += length;
  }
}

// The backward splits its work differently when (batch, KV head) pairs are few against the
// threads; every split must give the same gradients.
TEST_P(Attention, BackwardIndependentOfThreadCount) {
  const int saved = omp_get_max_threads();
  unsigned seed = 900;
  for (int threads : {1, 3, 8}) {
    omp_set_num_threads(threads);
    for (const Case& c :
         {Case{2, 37, 8, 2, 16, 5}, Case{1, 300, 4, 2, 16, 0}, Case{1, 300, 8, 1, 16, 150},
          Case{1, 300, 4, 2, 16, 0, packed_positions(1, 300, {140, 1, 3, 156})}}) {
      SCOPED_TRACE(::testing::Message() << threads << " threads");
      check(c, seed += 10);
    }
  }
  omp_set_num_threads(saved);
}

// The reference gradients themselves, against central differences of the reference forward on
// L = sum(out * dout).
TEST_P(Attention, NaiveGradientsMatchFiniteDifferences) {
  for (const Case& c : {Case{1, 9, 4, 2, 6, 0}, Case{2, 11, 4, 1, 4, 3},
                        Case{2, 11, 4, 2, 4, 0, packed_positions(2, 11, {3, 1, 5})},
                        Case{1, 12, 4, 4, 4, 2, packed_positions(1, 12, {1, 6, 5})}}) {
    SCOPED_TRACE(describe(c));
    const Inputs in = random_inputs(c, 31);
    std::vector<double> x[3] = {widen(in.q), widen(in.k), widen(in.v)};
    const std::vector<double> r = widen(in.dout);
    const Reference ref = naive_attention(c, x[0], x[1], x[2], r);
    const std::vector<double>* analytic[3] = {&ref.dq, &ref.dk, &ref.dv};
    auto loss = [&] {
      const auto out = naive_attention(c, x[0], x[1], x[2], r).out;
      double l = 0;
      for (std::size_t i = 0; i < out.size(); ++i)
        l += out[i] * r[i];
      return l;
    };
    constexpr double kStep = 1e-5;
    for (int t = 0; t < 3; ++t) {
      std::vector<double> numeric(x[t].size());
      for (std::size_t i = 0; i < x[t].size(); ++i) {
        const double saved = x[t][i];
        x[t][i] = saved + kStep;
        const double up = loss();
        x[t][i] = saved - kStep;
        const double down = loss();
        x[t][i] = saved;
        numeric[i] = (up - down) / (2 * kStep);
      }
      double num = 0, den = 0;
      for (std::size_t i = 0; i < numeric.size(); ++i) {
        num += ((*analytic[t])[i] - numeric[i]) * ((*analytic[t])[i] - numeric[i]);
        den += numeric[i] * numeric[i];
      }
      EXPECT_LE(std::sqrt(num / den), 1e-8) << "tensor " << t;
    }
  }
}

TEST_P(Attention, WindowCoveringTheSequenceEqualsNoWindow) {
  Case full{1, 40, 4, 2, 8, 0};
  Case wide = full;
  wide.window = 40;
  const Inputs in = random_inputs(full, 3);
  const Result a = run(full, in);
  const Result b = run(wide, in);
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.dq, b.dq);
  EXPECT_EQ(a.dk, b.dk);
}

// As in PyTorch, a NaN in a query makes that query's output NaN and leaves the others alone,
// whichever its sign bit (x86 arithmetic makes negative NaNs).
TEST_P(Attention, PropagatesNaN) {
  const Case c{1, 20, 2, 1, 8, 0};
  for (float nan :
       {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN()}) {
    Inputs in = random_inputs(c, 5);
    in.q[c.q_at(0, 7, 1) + 3] = nan;
    const Result got = run(c, in);
    for (std::int64_t s = 0; s < c.seq; ++s)
      for (std::int64_t h = 0; h < c.heads; ++h)
        for (std::int64_t d = 0; d < c.dim; ++d)
          EXPECT_EQ(std::isnan(got.out[c.q_at(0, s, h) + d]), s == 7 && h == 1)
              << "position " << s << " head " << h << " nan " << nan;
  }
}

TEST_P(Attention, RejectsInconsistentShapes) {
  Tensor q = zeros({1, 8, 6, 4});
  Tensor k = zeros({1, 8, 4, 4});
  Tensor out = zeros({1, 8, 6, 4});
  Tensor lse = zeros({1, 6, 8});
  // 6 query heads cannot share 4 KV heads.
  EXPECT_THROW(be().attention_forward(q, k, k, 0, out, lse), std::invalid_argument);
  Tensor k3 = zeros({1, 8, 3, 4});
  Tensor short_lse = zeros({1, 6, 7});
  EXPECT_THROW(be().attention_forward(q, k3, k3, 0, out, short_lse), std::invalid_argument);
  Tensor k_other_dim = zeros({1, 8, 3, 5});
  EXPECT_THROW(be().attention_forward(q, k_other_dim, k_other_dim, 0, out, lse),
               std::invalid_argument);
  EXPECT_THROW(be().attention_forward(q, k3, k3, -1, out, lse), std::invalid_argument);
  Tensor dk_wrong = zeros({1, 8, 6, 4});
  EXPECT_THROW(be().attention_backward(q, k3, k3, out, lse, out, 0, out, dk_wrong, dk_wrong),
               std::invalid_argument);
}

// Positions that do not describe contiguous documents, or of another shape, are refused where the
// backend checks them (the host; a device trusts the caller, which checked them on the host).
TEST_P(Attention, RejectsInvalidPositions) {
  if (be().name() != "host") GTEST_SKIP() << "positions are checked by the host backend";
  Tensor q = zeros({1, 4, 2, 4});
  Tensor out = zeros({1, 4, 2, 4});
  Tensor lse = zeros({1, 2, 4});
  for (const std::vector<std::int32_t>& bad :
       {std::vector<std::int32_t>{1, 2, 3, 4}, {0, 1, 3, 4}, {0, 1, -1, 0}, {0, 0, 2, 3}}) {
    Tensor positions = upload_ints(bad, {1, 4});
    EXPECT_THROW(be().document_attention_forward(q, q, q, positions, 0, out, lse),
                 std::invalid_argument);
  }
  Tensor wrong_shape = upload_ints({0, 1, 2}, {1, 3});
  EXPECT_THROW(be().document_attention_forward(q, q, q, wrong_shape, 0, out, lse),
               std::invalid_argument);
}

FASTLLM_INSTANTIATE_BACKENDS(Attention);

}  // namespace
}  // namespace fastllm::test
