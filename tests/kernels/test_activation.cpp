#include "backends.h"

namespace fastllm::test {
namespace {

class ActivationTest : public BackendTest {
 protected:
  void check_plain(Activation kind, std::int64_t n);
  void check_gated(Activation kind, std::int64_t n);
};

// SiLU x sigmoid(x); GeLU the exact erf form, in double.
double act(Activation kind, double x) {
  if (kind == Activation::SiLU) return x / (1.0 + std::exp(-x));
  return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
}

double central(Activation kind, double x) {
  const double h = 1e-6;
  return (act(kind, x + h) - act(kind, x - h)) / (2 * h);
}

void ActivationTest::check_plain(Activation kind, std::int64_t n) {
  const auto x = random_vector(static_cast<std::size_t>(n), 1, 3.0f);
  const auto dy = random_vector(x.size(), 2);
  Tensor tx = upload(x, {n});
  Tensor y = zeros({n});
  be().activation_forward(kind, tx, y);
  std::vector<double> y_ref(x.size()), dx_ref(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    y_ref[i] = act(kind, x[i]);
    dx_ref[i] = dy[i] * central(kind, x[i]);
  }
  EXPECT_LE(relative_error(download(y), y_ref), 1e-6);
  Tensor dx = upload(random_vector(x.size(), 3), {n});
  be().activation_backward(kind, tx, upload(dy, {n}), dx);
  EXPECT_LE(relative_error(download(dx), dx_ref), 1e-6);
}

void ActivationTest::check_gated(Activation kind, std::int64_t n) {
  const auto gate = random_vector(static_cast<std::size_t>(n), 4, 3.0f);
  const auto up = random_vector(gate.size(), 5);
  const auto dy = random_vector(gate.size(), 6);
  Tensor tg = upload(gate, {n});
  Tensor tu = upload(up, {n});
  Tensor y = zeros({n});
  be().gated_forward(kind, tg, tu, y);
  std::vector<double> y_ref(gate.size()), dg_ref(gate.size()), du_ref(gate.size());
  const double h = 1e-6;
  for (std::size_t i = 0; i < gate.size(); ++i) {
    y_ref[i] = act(kind, gate[i]) * up[i];
    dg_ref[i] = dy[i] * central(kind, gate[i]) * up[i];
    du_ref[i] =
        dy[i] * (act(kind, gate[i]) * (up[i] + h) - act(kind, gate[i]) * (up[i] - h)) / (2 * h);
  }
  EXPECT_LE(relative_error(download(y), y_ref), 1e-6);
  Tensor dg = zeros({n});
  Tensor du = zeros({n});
  be().gated_backward(kind, tg, tu, upload(dy, {n}), dg, du);
  EXPECT_LE(relative_error(download(dg), dg_ref), 1e-6);
  EXPECT_LE(relative_error(download(du), du_ref), 1e-6);

  // In place, as a training step may do it: dgate over gate, dup over up.
  be().gated_backward(kind, tg, tu, upload(dy, {n}), tg, tu);
  EXPECT_EQ(download(tg), download(dg));
  EXPECT_EQ(download(tu), download(du));
}

TEST_P(ActivationTest, SiluAgainstDoubleReference) {
  check_plain(Activation::SiLU, 45 * 7);
  check_plain(Activation::SiLU, 40001);
}

TEST_P(ActivationTest, GeluIsTheExactErfForm) {
  check_plain(Activation::GeLU, 45 * 7);
  check_plain(Activation::GeLU, 40001);
  // The tanh estimate differs from erf by ~1e-4 near |x| = 2; the exact form matches to 1e-7.
  Tensor y = zeros({1});
  be().activation_forward(Activation::GeLU, upload({2.0f}, {1}), y);
  EXPECT_NEAR(download(y)[0], 1.9544997361036416, 1e-6);
}

TEST_P(ActivationTest, SwigluAndGegluAgainstDoubleReference) {
  for (Activation kind : {Activation::SiLU, Activation::GeLU}) {
    check_gated(kind, 45 * 7);
    check_gated(kind, 40001);
  }
}

TEST_P(ActivationTest, SiluSaturatesWithoutNan) {
  Tensor x = upload({-200.0f, -90.0f, 90.0f, 200.0f}, {4});
  Tensor y = zeros({4});
  Tensor dx = zeros({4});
  be().activation_forward(Activation::SiLU, x, y);
  be().activation_backward(Activation::SiLU, x, upload({1, 1, 1, 1}, {4}), dx);
  const auto yv = download(y);
  const auto dv = download(dx);
  EXPECT_NEAR(yv[0], 0.0f, 1e-30);
  EXPECT_NEAR(yv[3], 200.0f, 1e-4);
  EXPECT_NEAR(dv[0], 0.0f, 1e-30);
  EXPECT_NEAR(dv[3], 1.0f, 1e-6);
}

FASTLLM_INSTANTIATE_BACKENDS(ActivationTest);

}  // namespace
}  // namespace fastllm::test
