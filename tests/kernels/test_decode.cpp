// The decoding ops (rope_at, attention_cached) against naive double loops, on every backend. They
// are inference-only, so there is no backward to check.
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/backends.h"
#include "support/naive_rope.h"

namespace fastllm::test {
namespace {

// rope at positions offset + s.
std::vector<double> naive_rope_at(const std::vector<float>& x, RopeShape s, double theta,
                                  std::int64_t offset) {
  std::vector<std::int32_t> positions;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t p = 0; p < s.seq; ++p)
      positions.push_back(static_cast<std::int32_t>(offset + p));
  return naive_rope(x, s, theta, false, positions);
}

class RopeAt : public BackendTest {};

TEST_P(RopeAt, MatchesTransformersFormulaAtAnOffset) {
  unsigned seed = 1;
  for (const RopeShape s :
       {RopeShape{2, 5, 3, 16}, RopeShape{1, 1, 4, 128}, RopeShape{1, 3, 2, 8}}) {
    for (std::int64_t offset : {0, 1, 17, 4093}) {
      SCOPED_TRACE(::testing::Message()
                   << "dim " << s.dim << " seq " << s.seq << " offset " << offset);
      const auto x = random_vector(s.numel(), seed++);
      Tensor t = upload(x, {s.batch, s.seq, s.heads, s.dim});
      be().rope_at(t, 10000.0, offset);
      EXPECT_LE(relative_error(download(t), naive_rope_at(x, s, 10000.0, offset)), 3e-7);
    }
  }
}

// One position at a time rotates exactly as the whole sequence at once (the decoding steps
// against the prefill and the training forward).
TEST_P(RopeAt, EachPositionEqualsTheFullSequenceRope) {
  const RopeShape whole{1, 40, 2, 16};
  const auto x = random_vector(whole.numel(), 7);
  Tensor full = upload(x, {whole.batch, whole.seq, whole.heads, whole.dim});
  be().rope(full, 1e6, false);
  const auto want = download(full);
  const std::int64_t row = whole.heads * whole.dim;
  for (std::int64_t p : {0, 1, 15, 39}) {
    const std::vector<float> one(x.begin() + p * row, x.begin() + (p + 1) * row);
    Tensor t = upload(one, {1, 1, whole.heads, whole.dim});
    be().rope_at(t, 1e6, p);
    const auto got = download(t);
    for (std::int64_t e = 0; e < row; ++e)
      ASSERT_EQ(got[e], want[p * row + e]) << "position " << p << " element " << e;
  }
}

struct CacheCase {
  std::int64_t batch, q_len, heads, groups, dim, offset, capacity, window;
};

// Softmax(q k^T / sqrt(d)) v over the visible keys, in double.
std::vector<double> naive_attention(const std::vector<float>& q, const std::vector<float>& k,
                                    const std::vector<float>& v, const CacheCase& c) {
  std::vector<double> out(q.size());
  const std::int64_t per_group = c.heads / c.groups;
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t i = 0; i < c.q_len; ++i)
      for (std::int64_t h = 0; h < c.heads; ++h) {
        const std::int64_t pos = c.offset + i, g = h / per_group;
        std::vector<double> w(static_cast<std::size_t>(pos + 1), 0.0);
        double top = -1e300, total = 0;
        for (std::int64_t j = 0; j <= pos; ++j) {
          if (c.window > 0 && j <= pos - c.window) continue;
          double dot = 0;
          for (std::int64_t e = 0; e < c.dim; ++e)
            dot += static_cast<double>(q[((b * c.q_len + i) * c.heads + h) * c.dim + e]) *
                   k[((b * c.capacity + j) * c.groups + g) * c.dim + e];
          w[j] = dot / std::sqrt(static_cast<double>(c.dim));
          top = std::max(top, w[j]);
        }
        for (std::int64_t j = 0; j <= pos; ++j) {
          if (c.window > 0 && j <= pos - c.window) continue;
          w[j] = std::exp(w[j] - top);
          total += w[j];
        }
        for (std::int64_t e = 0; e < c.dim; ++e) {
          double acc = 0;
          for (std::int64_t j = 0; j <= pos; ++j) {
            if (c.window > 0 && j <= pos - c.window) continue;
            acc += w[j] * v[((b * c.capacity + j) * c.groups + g) * c.dim + e];
          }
          out[((b * c.q_len + i) * c.heads + h) * c.dim + e] = acc / total;
        }
      }
  return out;
}

class AttentionCached : public BackendTest {};

TEST_P(AttentionCached, MatchesNaiveAttentionOverTheCache) {
  const CacheCase cases[] = {
      {2, 1, 4, 2, 16, 20, 24, 0},     // one decoding step, full causal
      {2, 1, 4, 2, 16, 20, 21, 8},     // one step, the window cuts in
      {1, 5, 4, 1, 8, 11, 30, 4},      // several new queries, one key/value head
      {1, 6, 2, 2, 32, 0, 6, 0},       // the prefill itself
      {1, 3, 6, 3, 16, 300, 310, 16},  // long cache, window
  };
  unsigned seed = 11;
  for (const CacheCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "q_len " << c.q_len << " offset " << c.offset << " window "
                                      << c.window << " groups " << c.groups);
    const auto q =
        random_vector(static_cast<std::size_t>(c.batch * c.q_len * c.heads * c.dim), seed++);
    const std::size_t cache = static_cast<std::size_t>(c.batch * c.capacity * c.groups * c.dim);
    auto k = random_vector(cache, seed++, 2.0f);
    auto v = random_vector(cache, seed++);
    // Rows past offset + q_len, and those before the window, must not be read: NaN there would
    // show in the output.
    std::vector<float> k_nan = k, v_nan = v;
    const std::int64_t row = c.groups * c.dim;
    for (std::int64_t b = 0; b < c.batch; ++b)
      for (std::int64_t j = 0; j < c.capacity; ++j) {
        const bool after = j >= c.offset + c.q_len;
        const bool before = c.window > 0 && j + c.window <= c.offset;
        if (!after && !before) continue;
        for (std::int64_t e = 0; e < row; ++e) {
          k_nan[(b * c.capacity + j) * row + e] = std::numeric_limits<float>::quiet_NaN();
          v_nan[(b * c.capacity + j) * row + e] = std::numeric_limits<float>::quiet_NaN();
        }
      }
    Tensor tq = upload(q, {c.batch, c.q_len, c.heads, c.dim});
    Tensor tk = upload(k_nan, {c.batch, c.capacity, c.groups, c.dim});
    Tensor tv = upload(v_nan, {c.batch, c.capacity, c.groups, c.dim});
    Tensor out = zeros({c.batch, c.q_len, c.heads, c.dim});
    be().attention_cached(tq, tk, tv, c.offset, c.window, out);
    EXPECT_LE(relative_error(download(out), naive_attention(q, k, v, c)), 1e-5);
  }
}

// With the whole sequence in the cache at offset 0, the same as the training attention.
TEST_P(AttentionCached, AtOffsetZeroEqualsTheTrainingAttention) {
  const std::int64_t seq = 19, heads = 4, groups = 2, dim = 16;
  for (std::int64_t window : {0, 5}) {
    const auto q = random_vector(static_cast<std::size_t>(seq * heads * dim), 3);
    const auto k = random_vector(static_cast<std::size_t>(seq * groups * dim), 4);
    const auto v = random_vector(static_cast<std::size_t>(seq * groups * dim), 5);
    Tensor tq = upload(q, {1, seq, heads, dim});
    Tensor tk = upload(k, {1, seq, groups, dim});
    Tensor tv = upload(v, {1, seq, groups, dim});
    Tensor want = zeros({1, seq, heads, dim});
    Tensor lse = zeros({1, heads, seq});
    be().attention_forward(tq, tk, tv, window, want, lse);
    Tensor got = zeros({1, seq, heads, dim});
    be().attention_cached(tq, tk, tv, 0, window, got);
    EXPECT_LE(relative_error(download(got), to_double(download(want))), 1e-6)
        << "window " << window;
  }
}

TEST_P(AttentionCached, RejectsACacheTooShort) {
  Tensor q = zeros({1, 2, 2, 8});
  Tensor k = zeros({1, 4, 1, 8});
  Tensor out = zeros({1, 2, 2, 8});
  EXPECT_THROW(be().attention_cached(q, k, k, 3, 0, out), std::invalid_argument);
}

FASTLLM_INSTANTIATE_BACKENDS(RopeAt);
FASTLLM_INSTANTIATE_BACKENDS(AttentionCached);

}  // namespace
}  // namespace fastllm::test
