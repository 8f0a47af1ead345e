#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/backends.h"

namespace fastllm::test {
namespace {

struct RopeShape {
  std::int64_t batch, seq, heads, dim;
  std::size_t numel() const { return static_cast<std::size_t>(batch * seq * heads * dim); }
};

// transformers' rotary embedding written out in double, with its two float32 roundings
// (inv_freq = 1 / theta^(arange(0, d, 2) / d) and angle = position * inv_freq, both computed on
// float32 tensors); rotate_half pairs dim j with j + d/2.
std::vector<double> naive_rope(const std::vector<float>& x, RopeShape s, double theta,
                               bool inverse) {
  std::vector<double> y(x.size());
  const std::int64_t half = s.dim / 2;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t p = 0; p < s.seq; ++p)
      for (std::int64_t h = 0; h < s.heads; ++h)
        for (std::int64_t i = 0; i < half; ++i) {
          const float exponent = static_cast<float>(2 * i) / static_cast<float>(s.dim);
          const float power = std::pow(static_cast<float>(theta), exponent);
          const float inv_freq = 1.0f / power;
          const double angle = static_cast<float>(p) * inv_freq;
          const double c = std::cos(angle);
          const double sn = inverse ? -std::sin(angle) : std::sin(angle);
          const std::size_t at = static_cast<std::size_t>(((b * s.seq + p) * s.heads + h) * s.dim);
          const double x1 = x[at + i];
          const double x2 = x[at + i + half];
          y[at + i] = x1 * c - x2 * sn;
          y[at + i + half] = x2 * c + x1 * sn;
        }
  return y;
}

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
