// Incremental decoding with a key/value cache: rotary embedding at an absolute position and
// attention of new queries against the cache (inference only, no backward).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

void require_rank4(const Tensor& t, const char* op, const char* name, const char* shape) {
  if (t.rank != 4)
    host::fail(op,
               std::string(name) + " has rank " + std::to_string(t.rank) + ", expected 4 " + shape);
}

}  // namespace

void HostBackend::rope_at(Tensor x, double theta, std::int64_t offset) {
  host::require_dtype(x, DType::F32, "rope_at", "x");
  require_rank4(x, "rope_at", "x", "[batch, seq, heads, head_dim]");
  const std::int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), dim = x.size(3);
  if (dim % 2 != 0) host::fail("rope_at", "head_dim is " + std::to_string(dim) + ", expected even");
  if (!(theta > 0.0)) host::fail("rope_at", "theta is " + std::to_string(theta) + ", expected > 0");
  if (offset < 0) host::fail("rope_at", "offset is " + std::to_string(offset) + ", expected >= 0");
  if (x.numel() == 0) return;
  // cos and sin of [seq, half] with rope()'s roundings (float32 inv_freq and angle, as
  // transformers), so that a position rotates the same here as in the full forward.
  const std::int64_t half = dim / 2;
  const auto base = static_cast<double>(static_cast<float>(theta));
  std::vector<float> cos(static_cast<std::size_t>(seq * half)), sin(cos.size());
  for (std::int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const float inv_freq = 1.0f / static_cast<float>(std::pow(base, static_cast<double>(exponent)));
    for (std::int64_t s = 0; s < seq; ++s) {
      const float angle = static_cast<float>(offset + s) * inv_freq;
      cos[s * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[s * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
  float* data = x.as<float>();
#pragma omp parallel for schedule(static) if (x.numel() > (1 << 14))
  for (std::int64_t row = 0; row < batch * seq; ++row) {
    const float* c = cos.data() + (row % seq) * half;
    const float* sn = sin.data() + (row % seq) * half;
    for (std::int64_t h = 0; h < heads; ++h) {
      float* x1 = data + (row * heads + h) * dim;
      float* x2 = x1 + half;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = x1[i], b = x2[i];
        x1[i] = a * c[i] - b * sn[i];
        x2[i] = b * c[i] + a * sn[i];
      }
    }
  }
}

void HostBackend::attention_cached(Tensor q, Tensor k_cache, Tensor v_cache, std::int64_t offset,
                                   std::int64_t window, Tensor out) {
  const char* op = "attention_cached";
  for (const auto& [t, name] :
       {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&out, "out"}}) {
    host::require_dtype(*t, DType::F32, op, name);
    require_rank4(*t, op, name, "[batch, positions, heads, head_dim]");
  }
  const std::int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), dim = q.size(3);
  const std::int64_t capacity = k_cache.size(1), groups = k_cache.size(2);
  if (out.dims != q.dims) host::fail(op, "out has another shape than q");
  if (v_cache.dims != k_cache.dims) host::fail(op, "v_cache has another shape than k_cache");
  if (k_cache.size(0) != batch || k_cache.size(3) != dim)
    host::fail(op, "k_cache's batch or head_dim differs from q's");
  if (groups < 1 || heads % groups != 0)
    host::fail(op, std::to_string(heads) + " heads do not split into " + std::to_string(groups) +
                       " key/value heads");
  if (offset < 0 || window < 0) host::fail(op, "offset and window must be >= 0");
  if (offset + q_len > capacity)
    host::fail(op, "positions up to " + std::to_string(offset + q_len) + " do not fit a cache of " +
                       std::to_string(capacity));
  const std::int64_t per_group = heads / groups;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const float* qd = q.as<float>();
  const float* kd = k_cache.as<float>();
  const float* vd = v_cache.as<float>();
  float* od = out.as<float>();
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<std::size_t>(offset + q_len));
    std::vector<double> acc(static_cast<std::size_t>(dim));
#pragma omp for collapse(3) schedule(static)
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < q_len; ++i)
        for (std::int64_t h = 0; h < heads; ++h) {
          const std::int64_t pos = offset + i, g = h / per_group;
          const std::int64_t first = window > 0 ? std::max<std::int64_t>(0, pos - window + 1) : 0;
          const float* qrow = qd + ((b * q_len + i) * heads + h) * dim;
          float top = -std::numeric_limits<float>::infinity();
          for (std::int64_t j = first; j <= pos; ++j) {
            const float* krow = kd + ((b * capacity + j) * groups + g) * dim;
            float dot = 0;
            for (std::int64_t e = 0; e < dim; ++e)
              dot += qrow[e] * krow[e];
            scores[j] = dot * scale;
            top = std::max(top, scores[j]);
          }
          double total = 0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (std::int64_t j = first; j <= pos; ++j) {
            const double p = std::exp(static_cast<double>(scores[j] - top));
            total += p;
            const float* vrow = vd + ((b * capacity + j) * groups + g) * dim;
            for (std::int64_t e = 0; e < dim; ++e)
              acc[e] += p * vrow[e];
          }
          float* orow = od + ((b * q_len + i) * heads + h) * dim;
          for (std::int64_t e = 0; e < dim; ++e)
            orow[e] = static_cast<float>(acc[e] / total);
        }
  }
}

}  // namespace fastllm
