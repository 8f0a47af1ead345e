#pragma once
// The numbers the tests share: reproducible random inputs, and the relative error that every
// comparison with a reference (a naive double loop, Hugging Face, the single-rank run, the host
// backend) is bounded by.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

namespace fastllm::test {

// n values from N(0, scale^2), the same for the same seed.
inline std::vector<float> random_vector(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v)
    x = dist(gen);
  return v;
}

// ||got - want|| / ||want|| in double, against a float or double reference. Vectors of different
// sizes, or a NaN in got where want has none, give infinity so that the bound the caller checks
// fails; a NaN in both (an output neither side writes) is agreement.
template <typename T>
double relative_error(const std::vector<float>& got, const std::vector<T>& want) {
  EXPECT_EQ(got.size(), want.size()) << "relative_error of vectors of different sizes";
  if (got.size() != want.size()) return INFINITY;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) return INFINITY;
    if (std::isnan(want[i])) continue;
    const double d = static_cast<double>(got[i]) - static_cast<double>(want[i]);
    num += d * d;
    den += static_cast<double>(want[i]) * static_cast<double>(want[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    s += a[i] * b[i];
  return s;
}

}  // namespace fastllm::test
