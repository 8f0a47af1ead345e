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

// x[b, s] rotated to position positions[b * seq + s], or to s without positions.
void rotate(const char* op, Tensor x, const std::int32_t* positions, double theta, bool inverse) {
  host::require_dtype(x, DType::F32, op, "x");
  if (x.rank != 4)
    host::fail(
        op, "x has rank " + std::to_string(x.rank) + ", expected 4 [batch, seq, heads, head_dim]");
  const std::int64_t batch = x.size(0);
  const std::int64_t seq = x.size(1);
  const std::int64_t heads = x.size(2);
  const std::int64_t dim = x.size(3);
  if (dim % 2 != 0) host::fail(op, "head_dim is " + std::to_string(dim) + ", expected even");
  if (!(theta > 0.0)) host::fail(op, "theta is " + std::to_string(theta) + ", expected > 0");
  if (x.numel() == 0) return;
  // A position is at most its index in the row, so the table of seq rows serves.
  for (std::int64_t i = 0; positions && i < batch * seq; ++i) {
    if (positions[i] < 0 || positions[i] > i % seq)
      host::fail(op, "positions[" + std::to_string(i / seq) + ", " + std::to_string(i % seq) +
                         "] is " + std::to_string(positions[i]) + ", expected 0 to " +
                         std::to_string(i % seq));
  }

  const auto table = rope_table(theta, seq, dim);
  const std::int64_t half = dim / 2;
  // The inverse rotation is the transpose, i.e. the same rotation with sin negated.
  const float sign = inverse ? -1.0f : 1.0f;
  float* data = x.as<float>();
  const std::int64_t rows = batch * seq;
#pragma omp parallel for schedule(static) if (x.numel() > (1 << 14))
  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t s = positions ? positions[row] : row % seq;
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

}  // namespace

void HostBackend::rope(Tensor x, double theta, bool inverse) {
  rotate("rope", x, nullptr, theta, inverse);
}

void HostBackend::rope_positions(Tensor x, Tensor positions, double theta, bool inverse) {
  host::require_dtype(positions, DType::I32, "rope_positions", "positions");
  if (positions.rank != 2 || x.rank != 4 || positions.dims[0] != x.dims[0] ||
      positions.dims[1] != x.dims[1])
    host::fail("rope_positions", "positions has " + std::to_string(positions.numel()) +
                                     " elements in rank " + std::to_string(positions.rank) +
                                     ", expected [batch, seq] of x");
  rotate("rope_positions", x, positions.as<std::int32_t>(), theta, inverse);
}

}  // namespace fastllm
