#include <limits>

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

FASTLLM_INSTANTIATE_BACKENDS(MatmulTest);

}  // namespace
}  // namespace fastllm::test
