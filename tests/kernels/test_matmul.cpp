#include <limits>
#include <stdexcept>

#include "backends.h"

namespace fastllm::test {
namespace {

class MatmulTest : public BackendTest {};

// c = alpha op(a) op(b) + beta c with a stored [k,m] when trans_a and b stored [n,k] when trans_b.
std::vector<double> naive_gemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha,
                               const std::vector<float>& a, const std::vector<float>& b,
                               double beta, const std::vector<float>& c) {
  std::vector<double> out(static_cast<std::size_t>(m) * n);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double sum = 0;
      for (int p = 0; p < k; ++p) {
        const double av = trans_a ? a[p * m + i] : a[i * k + p];
        const double bv = trans_b ? b[j * k + p] : b[p * n + j];
        sum += av * bv;
      }
      out[i * n + j] = alpha * sum + beta * c[i * n + j];
    }
  }
  return out;
}

TEST_P(MatmulTest, GemmEveryTransposeAgainstNaiveLoop) {
  const int m = 7, n = 45, k = 13;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const auto a = random_vector(m * k, 1);
      const auto b = random_vector(k * n, 2);
      const auto c0 = random_vector(m * n, 3);
      Tensor c = upload(c0, {m, n});
      be().gemm(ta, tb, m, n, k, 0.7f, upload(a, {m * k}), upload(b, {k * n}), 0.3f, c);
      EXPECT_LE(relative_error(download(c), naive_gemm(ta, tb, m, n, k, 0.7, a, b, 0.3, c0)), 1e-6)
          << "trans_a " << ta << " trans_b " << tb;
    }
  }
}

TEST_P(MatmulTest, GemmLargerThanOneBlock) {
  const int m = 131, n = 257, k = 97;
  const auto a = random_vector(m * k, 4);
  const auto b = random_vector(n * k, 5);
  const std::vector<float> c0(m * n, std::numeric_limits<float>::quiet_NaN());
  Tensor c = upload(c0, {m, n});
  // beta = 0 must ignore what c held, NaN included.
  be().gemm(false, true, m, n, k, 1.0f, upload(a, {m, k}), upload(b, {n, k}), 0.0f, c);
  const std::vector<float> zero(m * n, 0.0f);
  EXPECT_LE(relative_error(download(c), naive_gemm(false, true, m, n, k, 1.0, a, b, 0.0, zero)),
            1e-6);
}

TEST_P(MatmulTest, GemmWithEmptyDimensions) {
  const auto c0 = random_vector(12, 6);
  Tensor c = upload(c0, {3, 4});
  Tensor a = zeros({3, 5});
  Tensor b = zeros({5, 4});
  // k = 0: the product is empty, so c = beta c.
  be().gemm(false, false, 3, 4, 0, 1.0f, a, b, 2.0f, c);
  std::vector<double> doubled(c0.size());
  for (std::size_t i = 0; i < c0.size(); ++i)
    doubled[i] = 2.0 * c0[i];
  EXPECT_LE(relative_error(download(c), doubled), 1e-7);
  be().gemm(false, false, 3, 4, 0, 1.0f, a, b, 0.0f, c);
  for (float v : download(c))
    EXPECT_EQ(v, 0.0f);
  // m = 0 or n = 0: nothing to write.
  Tensor untouched = upload(c0, {3, 4});
  be().gemm(false, false, 0, 4, 5, 1.0f, a, b, 0.0f, untouched);
  be().gemm(false, false, 3, 0, 5, 1.0f, a, b, 0.0f, untouched);
  EXPECT_EQ(download(untouched), c0);
}

TEST_P(MatmulTest, AddBiasAndItsBackward) {
  for (int rows : {7, 301}) {
    const int n = 45 * (rows > 100 ? 7 : 1);
    const auto y0 = random_vector(rows * n, 7);
    const auto bias = random_vector(n, 8);
    Tensor y = upload(y0, {rows, n});
    be().add_bias(y, upload(bias, {n}));
    std::vector<double> expected(y0.size());
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < n; ++j)
        expected[r * n + j] = y0[r * n + j] + static_cast<double>(bias[j]);
    EXPECT_LE(relative_error(download(y), expected), 1e-7);

    // d/dbias of sum(dy * (y + bias)) is the column sum of dy, added to what dbias held.
    const auto dy = random_vector(rows * n, 9);
    const auto db0 = random_vector(n, 10);
    Tensor db = upload(db0, {n});
    be().bias_backward(upload(dy, {rows, n}), db);
    std::vector<double> grad(n);
    for (int j = 0; j < n; ++j) {
      grad[j] = db0[j];
      for (int r = 0; r < rows; ++r)
        grad[j] += dy[r * n + j];
    }
    EXPECT_LE(relative_error(download(db), grad), 1e-6) << rows;
  }
}

// y = x W^T + b, and for it dW += dy^T x and db += the column sums of dy (what the bias epilogues
// fuse into one GEMM on CUDA), against double loops: with and without a bias, into gradients that
// already hold values, at sizes that are not powers of two and with x given as [batch, seq, in].
TEST_P(MatmulTest, LinearForwardAndWeightGradientAgainstNaiveLoops) {
  const int batch = 3, seq = 23, in = 37, out = 29, rows = batch * seq;
  for (bool with_bias : {false, true}) {
    SCOPED_TRACE(with_bias ? "bias" : "no bias");
    const auto x = random_vector(rows * in, 11);
    const auto w = random_vector(out * in, 12);
    const auto b = random_vector(out, 13);
    const auto dy = random_vector(rows * out, 14);
    const auto dw0 = random_vector(out * in, 15);
    const auto db0 = random_vector(out, 16);
    const std::vector<float> poison(rows * out, std::numeric_limits<float>::quiet_NaN());

    Tensor y = upload(poison, {rows, out});
    be().linear_forward(upload(x, {batch, seq, in}), upload(w, {out, in}),
                        with_bias ? upload(b, {out}) : Tensor(), y);
    std::vector<double> y_want(rows * out);
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) {
        double sum = with_bias ? b[o] : 0.0;
        for (int i = 0; i < in; ++i)
          sum += static_cast<double>(x[r * in + i]) * w[o * in + i];
        y_want[r * out + o] = sum;
      }
    EXPECT_LE(relative_error(download(y), y_want), 1e-6);

    Tensor dw = upload(dw0, {out, in});
    Tensor db = upload(db0, {out});
    be().linear_backward_weight(upload(x, {batch, seq, in}), upload(dy, {rows, out}), dw,
                                with_bias ? db : Tensor());
    std::vector<double> dw_want(out * in), db_want(out);
    for (int o = 0; o < out; ++o) {
      db_want[o] = db0[o];
      for (int r = 0; r < rows; ++r)
        db_want[o] += with_bias ? dy[r * out + o] : 0.0f;
      for (int i = 0; i < in; ++i) {
        double sum = dw0[o * in + i];
        for (int r = 0; r < rows; ++r)
          sum += static_cast<double>(dy[r * out + o]) * x[r * in + i];
        dw_want[o * in + i] = sum;
      }
    }
    EXPECT_LE(relative_error(download(dw), dw_want), 1e-6);
    // Without a bias, a gradient vector that exists is left alone.
    EXPECT_LE(relative_error(download(db), db_want), 1e-6);
  }
}

TEST_P(MatmulTest, LinearRejectsMismatchedShapes) {
  Tensor w = zeros({5, 4});
  Tensor x = zeros({3, 4});
  EXPECT_THROW(be().linear_forward(zeros({3, 5}), w, Tensor(), zeros({3, 5})),
               std::invalid_argument);  // x's rows are 5 wide, not 4
  EXPECT_THROW(be().linear_forward(x, w, Tensor(), zeros({3, 4})), std::invalid_argument);
  EXPECT_THROW(be().linear_forward(x, w, zeros({4}), zeros({3, 5})), std::invalid_argument);
  EXPECT_THROW(be().linear_forward(x, zeros({20}), Tensor(), zeros({3, 5})),
               std::invalid_argument);  // weight not [out, in]
  EXPECT_THROW(be().linear_backward_weight(x, zeros({3, 5}), w, zeros({4})), std::invalid_argument);
  EXPECT_THROW(be().linear_backward_weight(x, zeros({3, 5}), w, zeros({5}, DType::BF16)),
               std::invalid_argument);  // parameter gradients are f32
}

FASTLLM_INSTANTIATE_BACKENDS(MatmulTest);

}  // namespace
}  // namespace fastllm::test
