#include <cblas.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {

void HostBackend::gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                       float alpha, Tensor a, Tensor b, float beta, Tensor c) {
  host::require_dtype(a, DType::F32, "gemm", "a");
  host::require_dtype(b, DType::F32, "gemm", "b");
  host::require_dtype(c, DType::F32, "gemm", "c");
  host::require(m >= 0 && n >= 0 && k >= 0, "gemm", "negative size");
  constexpr std::int64_t kBlasMax = std::numeric_limits<blasint>::max();
  host::require(m <= kBlasMax && n <= kBlasMax && k <= kBlasMax, "gemm",
                "a size exceeds the BLAS integer range");
  host::require(a.numel() >= m * k, "gemm", "a is smaller than m x k");
  host::require(b.numel() >= k * n, "gemm", "b is smaller than k x n");
  host::require(c.numel() >= m * n, "gemm", "c is smaller than m x n");
  if (m == 0 || n == 0) return;
  float* out = c.as<float>();
  if (k == 0) {
    // An empty product: BLAS semantics, where beta = 0 ignores whatever c held (even NaN).
    const std::int64_t count = m * n;
    if (beta == 0.0f) {
      std::fill_n(out, count, 0.0f);
    } else {
      for (std::int64_t i = 0; i < count; ++i)
        out[i] *= beta;
    }
    return;
  }
  const auto lda = static_cast<blasint>(trans_a ? m : k);
  const auto ldb = static_cast<blasint>(trans_b ? k : n);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m), static_cast<blasint>(n),
              static_cast<blasint>(k), alpha, a.as<float>(), lda, b.as<float>(), ldb, beta, out,
              static_cast<blasint>(n));
}

void HostBackend::add_bias(Tensor y, Tensor bias) {
  host::require_dtype(y, DType::F32, "add_bias", "y");
  host::require_dtype(bias, DType::F32, "add_bias", "bias");
  const std::int64_t width = host::row_width(y);
  const std::int64_t rows = host::row_count(y);
  host::require_numel(bias, width, "add_bias", "bias");
  float* out = y.as<float>();
  const float* b = bias.as<float>();
#pragma omp parallel for schedule(static) if (rows * width > (1 << 15))
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = out + r * width;
#pragma omp simd
    for (std::int64_t j = 0; j < width; ++j)
      row[j] += b[j];
  }
}

void HostBackend::bias_backward(Tensor dy, Tensor dbias) {
  host::require_dtype(dy, DType::F32, "bias_backward", "dy");
  host::require_dtype(dbias, DType::F32, "bias_backward", "dbias");
  const std::int64_t width = host::row_width(dy);
  const std::int64_t rows = host::row_count(dy);
  host::require_numel(dbias, width, "bias_backward", "dbias");
  const float* in = dy.as<float>();
  float* out = dbias.as<float>();
  // Each thread owns a block of columns and sums it over all rows in order: no races, and the
  // result does not depend on the thread count.
  constexpr std::int64_t kBlock = 256;
  const std::int64_t blocks = (width + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (rows * width > (1 << 15))
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t begin = blk * kBlock;
    const std::int64_t count = std::min(kBlock, width - begin);
    double acc[kBlock] = {};
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* row = in + r * width + begin;
#pragma omp simd
      for (std::int64_t j = 0; j < count; ++j)
        acc[j] += row[j];
    }
    for (std::int64_t j = 0; j < count; ++j)
      out[begin + j] += static_cast<float>(acc[j]);
  }
}

namespace {

// The rows of a linear layer's input x for weight [out, in], checked against y (or dy) [rows, out].
std::int64_t linear_rows(const Tensor& x, const Tensor& weight, const Tensor& y, const char* op,
                         const char* y_name) {
  host::require(weight.rank == 2, op, "weight is not [out, in]");
  const std::int64_t out = weight.size(0), in = weight.size(1);
  host::require(in > 0 ? x.numel() % in == 0 : x.numel() == 0, op,
                "x's elements are not a whole number of rows of weight's width");
  const std::int64_t rows = in > 0 ? x.numel() / in : 0;
  host::require_numel(y, rows * out, op, y_name);
  return rows;
}

}  // namespace

void HostBackend::linear_forward(Tensor x, Tensor weight, Tensor bias, Tensor y) {
  const std::int64_t rows = linear_rows(x, weight, y, "linear_forward", "y");
  const std::int64_t out = weight.size(0);
  if (!host::is_empty(bias)) {
    // Checked before y is written, as add_bias would check them after.
    host::require_dtype(bias, DType::F32, "linear_forward", "bias");
    host::require_numel(bias, out, "linear_forward", "bias");
  }
  gemm(false, true, rows, out, weight.size(1), 1.0f, x, weight, 0.0f, y);
  if (!host::is_empty(bias)) add_bias(y.view({rows, out}), bias);
}

void HostBackend::linear_backward_weight(Tensor x, Tensor dy, Tensor dweight, Tensor dbias) {
  const std::int64_t rows = linear_rows(x, dweight, dy, "linear_backward_weight", "dy");
  const std::int64_t out = dweight.size(0);
  if (!host::is_empty(dbias)) {
    // Checked before dweight is added to, as bias_backward would check them after.
    host::require_dtype(dbias, DType::F32, "linear_backward_weight", "dbias");
    host::require_numel(dbias, out, "linear_backward_weight", "dbias");
  }
  gemm(true, false, out, dweight.size(1), rows, 1.0f, dy, x, 1.0f, dweight);
  if (!host::is_empty(dbias)) bias_backward(dy.view({rows, out}), dbias);
}

}  // namespace fastllm
