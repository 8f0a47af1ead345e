#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/backends.h"
#include "support/naive_rope.h"

namespace fastllm::test {
namespace {

class Rope : public BackendTest {};

TEST_P(Rope, MatchesTransformersFormula) {
  const RopeShape shapes[] = {{2, 37, 3, 12}, {2, 37, 3, 16}, {1, 300, 2, 128}, {1, 4096, 1, 8}};
  unsigned seed = 1;
  for (double theta : {10000.0, 1e6}) {
    for (const RopeShape& s : shapes) {
      for (bool inverse : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "theta " << theta << " seq " << s.seq << " dim "
                                          << s.dim << " inverse " << inverse);
        const auto x = random_vector(s.numel(), seed++);
        Tensor t = upload(x, {s.batch, s.seq, s.heads, s.dim});
        be().rope(t, theta, inverse);
        EXPECT_LE(relative_error(download(t), naive_rope(x, s, theta, inverse)), 3e-7);
      }
    }
  }
}

// Positions restarting at 0 in each packed document, documents of length 1 included.
TEST_P(Rope, GivenPositionsMatchTransformersFormula) {
  const RopeShape s{2, 37, 3, 16};
  std::vector<std::int32_t> positions;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const std::int64_t starts[] = {0, 5, 6, 7, 20};
    for (std::int64_t p = 0; p < s.seq; ++p) {
      std::int64_t start = 0;
      for (std::int64_t st : starts)
        if (st <= p) start = st;
      positions.push_back(static_cast<std::int32_t>(b == 0 ? p - start : p / 2));
    }
  }
  unsigned seed = 51;
  for (bool inverse : {false, true}) {
    const auto x = random_vector(s.numel(), seed++);
    Tensor t = upload(x, {s.batch, s.seq, s.heads, s.dim});
    be().rope_positions(t, upload_ints(positions, {s.batch, s.seq}), 1e6, inverse);
    EXPECT_LE(relative_error(download(t), naive_rope(x, s, 1e6, inverse, positions)), 3e-7);
  }
  // Positions 0..seq-1 are rope() exactly.
  std::vector<std::int32_t> plain;
  for (std::int64_t i = 0; i < s.batch * s.seq; ++i)
    plain.push_back(static_cast<std::int32_t>(i % s.seq));
  const auto x = random_vector(s.numel(), 60);
  Tensor a = upload(x, {s.batch, s.seq, s.heads, s.dim});
  Tensor b = upload(x, {s.batch, s.seq, s.heads, s.dim});
  be().rope(a, 10000.0, false);
  be().rope_positions(b, upload_ints(plain, {s.batch, s.seq}), 10000.0, false);
  EXPECT_EQ(download(a), download(b));
}

TEST_P(Rope, RejectsBadPositions) {
  Tensor t = zeros({1, 4, 2, 8});
  EXPECT_THROW(be().rope_positions(t, upload_ints({0, 1, 2}, {1, 3}), 1e4, false),
               std::invalid_argument);
  if (be().name() == "host") {
    EXPECT_THROW(be().rope_positions(t, upload_ints({0, 1, -2, 0}, {1, 4}), 1e4, false),
                 std::invalid_argument);
    EXPECT_THROW(be().rope_positions(t, upload_ints({0, 2, 0, 1}, {1, 4}), 1e4, false),
                 std::invalid_argument);
  }
}

TEST_P(Rope, PositionZeroIsIdentity) {
  const RopeShape s{3, 1, 4, 16};
  const auto x = random_vector(s.numel(), 7);
  Tensor t = upload(x, {s.batch, s.seq, s.heads, s.dim});
  be().rope(t, 10000.0, false);
  EXPECT_EQ(download(t), x);
}

TEST_P(Rope, InverseRestoresInput) {
  const RopeShape s{2, 257, 5, 64};
  const auto x = random_vector(s.numel(), 11);
  Tensor t = upload(x, {s.batch, s.seq, s.heads, s.dim});
  be().rope(t, 1e6, false);
  be().rope(t, 1e6, true);
  std::vector<double> expected(x.begin(), x.end());
  EXPECT_LE(relative_error(download(t), expected), 2e-7);
}

// The backward of y = R x is R^T dy: <R x, g> must equal <x, R^T g> for any g.
TEST_P(Rope, InverseIsTheAdjoint) {
  const RopeShape s{2, 45, 3, 24};
  const auto x = random_vector(s.numel(), 21);
  const auto g = random_vector(s.numel(), 22);
  Tensor tx = upload(x, {s.batch, s.seq, s.heads, s.dim});
  Tensor tg = upload(g, {s.batch, s.seq, s.heads, s.dim});
  be().rope(tx, 10000.0, false);
  be().rope(tg, 10000.0, true);
  const auto rx = download(tx);
  const auto rg = download(tg);
  double forward = 0, adjoint = 0, scale = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    forward += static_cast<double>(rx[i]) * g[i];
    adjoint += static_cast<double>(x[i]) * rg[i];
    scale += std::abs(static_cast<double>(x[i]) * g[i]);
  }
  EXPECT_LE(std::abs(forward - adjoint), 1e-6 * scale);
}

TEST_P(Rope, RejectsOddHeadDim) {
  Tensor t = zeros({1, 4, 2, 7});
  EXPECT_THROW(be().rope(t, 10000.0, false), std::invalid_argument);
}

TEST_P(Rope, RejectsWrongRank) {
  Tensor t = zeros({4, 16});
  EXPECT_THROW(be().rope(t, 10000.0, false), std::invalid_argument);
}

FASTLLM_INSTANTIATE_BACKENDS(Rope);

}  // namespace
}  // namespace fastllm::test
