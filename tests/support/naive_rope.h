#pragma once
// The rotary embedding as transformers computes it, written out in double: the reference of the
// rope ops (training's rope and rope_positions, decoding's rope_at).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastllm::test {

struct RopeShape {
  std::int64_t batch, seq, heads, dim;
  std::size_t numel() const { return static_cast<std::size_t>(batch * seq * heads * dim); }
};

// transformers' rotary embedding written out in double, with its two float32 roundings
// (inv_freq = 1 / theta^(arange(0, d, 2) / d) and angle = position * inv_freq, both computed on
// float32 tensors); rotate_half pairs dim j with j + d/2. x[b, p] is at position p, or at
// positions[b, p] when given.
inline std::vector<double> naive_rope(const std::vector<float>& x, RopeShape s, double theta,
                                      bool inverse,
                                      const std::vector<std::int32_t>& positions = {}) {
  std::vector<double> y(x.size());
  const std::int64_t half = s.dim / 2;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t p = 0; p < s.seq; ++p)
      for (std::int64_t h = 0; h < s.heads; ++h)
        for (std::int64_t i = 0; i < half; ++i) {
          const float exponent = static_cast<float>(2 * i) / static_cast<float>(s.dim);
          const float power = std::pow(static_cast<float>(theta), exponent);
          const float inv_freq = 1.0f / power;
          const auto position =
              positions.empty() ? p : positions[static_cast<std::size_t>(b * s.seq + p)];
          const double angle = static_cast<float>(position) * inv_freq;
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

}  // namespace fastllm::test
