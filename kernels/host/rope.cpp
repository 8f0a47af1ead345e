#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

// cos and sin of every (position, frequency) pair, [seq, dim / 2].
struct RopeTable {
  double theta = 0;
  std::int64_t seq = 0;
  std::int64_t dim = 0;
  std::vector<float> cos;
  std::vector<float> sin;
};

// Rounded the way transformers rounds, even for a float64 model: inv_freq, and the angle
// position * inv_freq, are float32; only cos and sin of that float32 angle are exact here (computed
// in double, then rounded). Computing the angle in double instead would drift from transformers by
// up to ~2e-4 radians at position 4096.
std::shared_ptr<const RopeTable> build_table(double theta, std::int64_t seq, std::int64_t dim) {
  auto table = std::make_shared<RopeTable>();
  table->theta = theta;
  table->seq = seq;
  table->dim = dim;
  const std::int64_t half = dim / 2;
  std::vector<float> inv_freq(static_cast<std::size_t>(half));
  const auto base = static_cast<double>(static_cast<float>(theta));
  for (std::int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const auto power = static_cast<float>(std::pow(base, static_cast<double>(exponent)));
    inv_freq[i] = 1.0f / power;
  }
  table->cos.resize(static_cast<std::size_t>(seq * half));
  table->sin.resize(static_cast<std::size_t>(seq * half));
  float* cos_out = table->cos.data();
  float* sin_out = table->sin.data();
#pragma omp parallel for schedule(static) if (seq * half > (1 << 12))
  for (std::int64_t s = 0; s < seq; ++s) {
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(s) * inv_freq[i];
      cos_out[s * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin_out[s * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
  return table;
}

// Every layer rotates q and k with the same table, forward and backward, so the last one is kept.
std::shared_ptr<const RopeTable> rope_table(double theta, std::int64_t seq, std::int64_t dim) {
  static std::mutex mutex;
  static std::shared_ptr<const RopeTable> cached;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (cached && cached->theta == theta && cached->seq == seq && cached->dim == dim) return cached;
  }
  auto table = build_table(theta, seq, dim);
  const std::lock_guard<std::mutex> lock(mutex);
  cached = table;
  return table;
}

}  // namespace

void HostBackend::rope(Tensor x, double theta, bool inverse) {
  host::require_dtype(x, DType::F32, "rope", "x");
  if (x.rank != 4)
    host::fail("rope", "x has rank " + std::to_string(x.rank) +
                           ", expected 4 [batch, seq, heads, head_dim]");
  const std::int64_t batch = x.size(0);
  const std::int64_t seq = x.size(1);
  const std::int64_t heads = x.size(2);
  const std::int64_t dim = x.size(3);
  if (dim % 2 != 0) host::fail("rope", "head_dim is " + std::to_string(dim) + ", expected even");
  if (!(theta > 0.0)) host::fail("rope", "theta is " + std::to_string(theta) + ", expected > 0");
  if (x.numel() == 0) return;

  const auto table = rope_table(theta, seq, dim);
  const std::int64_t half = dim / 2;
  // The inverse rotation is the transpose, i.e. the same rotation with sin negated.
  const float sign = inverse ? -1.0f : 1.0f;
  float* data = x.as<float>();
  const std::int64_t rows = batch * seq;
#pragma omp parallel for schedule(static) if (x.numel() > (1 << 14))
  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t s = row % seq;
    const float* c = table->cos.data() + s * half;
    const float* sn = table->sin.data() + s * half;
    for (std::int64_t h = 0; h < heads; ++h) {
      float* x1 = data + (row * heads + h) * dim;
      float* x2 = x1 + half;
#pragma omp simd
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = x1[i];
        const float b = x2[i];
        const float si = sign * sn[i];
        // transformers: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
        x1[i] = a * c[i] - b * si;
        x2[i] = b * c[i] + a * si;
      }
    }
  }
}

}  // namespace fastllm
