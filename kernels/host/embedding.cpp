#include <algorithm>
#include <cstring>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

void HostBackend::embedding_forward(Tensor ids, Tensor table, std::int64_t vocab_offset,
                                    Tensor out) {
  host::require_dtype(ids, DType::I32, "embedding_forward", "ids");
  host::require_dtype(table, DType::F32, "embedding_forward", "table");
  host::require_dtype(out, DType::F32, "embedding_forward", "out");
  const std::int64_t vocab = host::row_count(table);
  const std::int64_t dim = host::row_width(table);
  const std::int64_t tokens = ids.numel();
  host::require_numel(out, tokens * dim, "embedding_forward", "out");
  const std::int32_t* id = ids.as<std::int32_t>();
  const float* rows = table.as<float>();
  float* dst = out.as<float>();
#pragma omp parallel for schedule(static) if (tokens * dim > (1 << 15))
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t local = id[t] - vocab_offset;
    float* row = dst + t * dim;
    if (local >= 0 && local < vocab) {
      std::memcpy(row, rows + local * dim, static_cast<std::size_t>(dim) * sizeof(float));
    } else {
      std::fill_n(row, dim, 0.0f);
    }
  }
}

void HostBackend::embedding_backward(Tensor ids, Tensor dout, std::int64_t vocab_offset,
                                     Tensor dtable) {
  host::require_dtype(ids, DType::I32, "embedding_backward", "ids");
  host::require_dtype(dout, DType::F32, "embedding_backward", "dout");
  host::require_dtype(dtable, DType::F32, "embedding_backward", "dtable");
  const std::int64_t vocab = host::row_count(dtable);
  const std::int64_t dim = host::row_width(dtable);
  const std::int64_t tokens = ids.numel();
  host::require_numel(dout, tokens * dim, "embedding_backward", "dout");
  const std::int32_t* id = ids.as<std::int32_t>();
  const float* src = dout.as<float>();
  float* grad = dtable.as<float>();
  // A token id repeats, so threads split the columns rather than the tokens: each one adds its
  // columns of every token in token order, race-free and independent of the thread count.
  constexpr std::int64_t kBlock = 128;
  const std::int64_t blocks = (dim + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (tokens * dim > (1 << 15))
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t begin = blk * kBlock;
    const std::int64_t count = std::min(kBlock, dim - begin);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int64_t local = id[t] - vocab_offset;
      if (local < 0 || local >= vocab) continue;
      float* row = grad + local * dim + begin;
      const float* g = src + t * dim + begin;
#pragma omp simd
      for (std::int64_t j = 0; j < count; ++j)
        row[j] += g[j];
    }
  }
}

}  // namespace fastllm
