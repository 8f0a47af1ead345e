#include "backends.h"

namespace fastllm::test {
namespace {

class RmsNormTest : public BackendTest {
 protected:
  void check(int rows, int dim);
};

constexpr double kEps = 1e-5;

// y = w x / sqrt(mean(x^2) + eps), all in double.
std::vector<double> reference(const std::vector<double>& x, const std::vector<double>& w, int rows,
                              int dim, std::vector<double>* rstd = nullptr) {
  std::vector<double> y(x.size());
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int j = 0; j < dim; ++j)
      ss += x[r * dim + j] * x[r * dim + j];
    const double inv = 1.0 / std::sqrt(ss / dim + kEps);
    if (rstd) rstd->push_back(inv);
    for (int j = 0; j < dim; ++j)
      y[r * dim + j] = w[j] * x[r * dim + j] * inv;
  }
  return y;
}

void RmsNormTest::check(int rows, int dim) {
  const auto x = random_vector(static_cast<std::size_t>(rows) * dim, 1, 2.0f);
  auto w = random_vector(dim, 2);
  for (auto& v : w)
    v += 1.0f;
  Tensor tx = upload(x, {rows, dim});
  Tensor tw = upload(w, {dim});
  Tensor y = zeros({rows, dim});
  Tensor rstd = zeros({rows});
  be().rmsnorm_forward(tx, tw, static_cast<float>(kEps), y, rstd);
  std::vector<double> rstd_ref;
  const auto xd = to_double(x);
  const auto wd = to_double(w);
  EXPECT_LE(relative_error(download(y), reference(xd, wd, rows, dim, &rstd_ref)), 1e-6);
  EXPECT_LE(relative_error(download(rstd), rstd_ref), 1e-6);

  // Backward of L = sum(dy * y): dx is overwritten, dweight accumulates.
  const auto dy = to_double(random_vector(x.size(), 3));
  const auto dw0 = random_vector(dim, 4);
  Tensor dx = upload(random_vector(x.size(), 5), {rows, dim});
  Tensor dw = upload(dw0, {dim});
  std::vector<float> dy_f(dy.begin(), dy.end());
  be().rmsnorm_backward(tx, tw, rstd, upload(dy_f, {rows, dim}), dx, dw);
  const auto dx_ref = central_difference(
      [&](const std::vector<double>& xv) { return dot(dy, reference(xv, wd, rows, dim)); }, xd);
  auto dw_ref = central_difference(
      [&](const std::vector<double>& wv) { return dot(dy, reference(xd, wv, rows, dim)); }, wd);
  for (int j = 0; j < dim; ++j)
    dw_ref[j] += dw0[j];
  EXPECT_LE(relative_error(download(dx), dx_ref), 1e-6);
  EXPECT_LE(relative_error(download(dw), dw_ref), 1e-6);
}

TEST_P(RmsNormTest, SmallRowsAgainstDoubleReference) {
  check(7, 45);
}

TEST_P(RmsNormTest, ManyRowsRunInParallel) {
  check(37, 515);
}

FASTLLM_INSTANTIATE_BACKENDS(RmsNormTest);

}  // namespace
}  // namespace fastllm::test
