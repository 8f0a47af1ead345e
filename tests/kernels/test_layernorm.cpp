#include "backends.h"

namespace fastllm::test {
namespace {

class LayerNormTest : public BackendTest {
 protected:
  void check(int rows, int dim);
};

constexpr double kEps = 1e-5;

// y = (x - mean) / sqrt(var + eps) w + b, all in double.
std::vector<double> reference(const std::vector<double>& x, const std::vector<double>& w,
                              const std::vector<double>& b, int rows, int dim,
                              std::vector<double>* mean = nullptr,
                              std::vector<double>* rstd = nullptr) {
  std::vector<double> y(x.size());
  for (int r = 0; r < rows; ++r) {
    double mu = 0;
    for (int j = 0; j < dim; ++j)
      mu += x[r * dim + j];
    mu /= dim;
    double var = 0;
    for (int j = 0; j < dim; ++j)
      var += (x[r * dim + j] - mu) * (x[r * dim + j] - mu);
    const double inv = 1.0 / std::sqrt(var / dim + kEps);
    if (mean) mean->push_back(mu);
    if (rstd) rstd->push_back(inv);
    for (int j = 0; j < dim; ++j)
      y[r * dim + j] = (x[r * dim + j] - mu) * inv * w[j] + b[j];
  }
  return y;
}

void LayerNormTest::check(int rows, int dim) {
  auto x = random_vector(static_cast<std::size_t>(rows) * dim, 1, 2.0f);
  for (auto& v : x)
    v += 3.0f;  // an offset mean, which a one-pass variance handles badly
  auto w = random_vector(dim, 2);
  const auto b = random_vector(dim, 3);
  Tensor tx = upload(x, {rows, dim});
  Tensor tw = upload(w, {dim});
  Tensor tb = upload(b, {dim});
  Tensor y = zeros({rows, dim});
  Tensor mean = zeros({rows});
  Tensor rstd = zeros({rows});
  be().layernorm_forward(tx, tw, tb, static_cast<float>(kEps), y, mean, rstd);
  const auto xd = to_double(x);
  const auto wd = to_double(w);
  const auto bd = to_double(b);
  std::vector<double> mean_ref, rstd_ref;
  EXPECT_LE(relative_error(download(y), reference(xd, wd, bd, rows, dim, &mean_ref, &rstd_ref)),
            1e-6);
  EXPECT_LE(relative_error(download(mean), mean_ref), 1e-6);
  EXPECT_LE(relative_error(download(rstd), rstd_ref), 1e-6);

  const auto dy = to_double(random_vector(x.size(), 4));
  std::vector<float> dy_f(dy.begin(), dy.end());
  const auto dw0 = random_vector(dim, 5);
  const auto db0 = random_vector(dim, 6);
  Tensor dx = zeros({rows, dim});
  Tensor dw = upload(dw0, {dim});
  Tensor db = upload(db0, {dim});
  be().layernorm_backward(tx, tw, mean, rstd, upload(dy_f, {rows, dim}), dx, dw, db);
  const auto dx_ref = central_difference(
      [&](const std::vector<double>& v) { return dot(dy, reference(v, wd, bd, rows, dim)); }, xd);
  auto dw_ref = central_difference(
      [&](const std::vector<double>& v) { return dot(dy, reference(xd, v, bd, rows, dim)); }, wd);
  auto db_ref = central_difference(
      [&](const std::vector<double>& v) { return dot(dy, reference(xd, wd, v, rows, dim)); }, bd);
  for (int j = 0; j < dim; ++j) {
    dw_ref[j] += dw0[j];
    db_ref[j] += db0[j];
  }
  EXPECT_LE(relative_error(download(dx), dx_ref), 1e-6);
  EXPECT_LE(relative_error(download(dw), dw_ref), 1e-6);
  EXPECT_LE(relative_error(download(db), db_ref), 1e-6);
}

TEST_P(LayerNormTest, SmallRowsAgainstDoubleReference) {
  check(7, 45);
}

TEST_P(LayerNormTest, ManyRowsRunInParallel) {
  check(37, 515);
}

FASTLLM_INSTANTIATE_BACKENDS(LayerNormTest);

}  // namespace
}  // namespace fastllm::test
