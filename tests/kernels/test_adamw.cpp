#include "backends.h"

namespace fastllm::test {
namespace {

class AdamWTest : public BackendTest {
 protected:
  void check(std::int64_t n, float weight_decay, float grad_scale);
};

// The update as the PyTorch documentation writes it, in double.
struct Reference {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& grad, double lr, double b1, double b2, double eps, double wd,
            int t, double grad_scale) {
    for (std::size_t i = 0; i < p.size(); ++i) {
      const double g = grad[i] * grad_scale;
      p[i] *= 1 - lr * wd;
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double m_hat = m[i] / (1 - std::pow(b1, t));
      const double v_hat = v[i] / (1 - std::pow(b2, t));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

void AdamWTest::check(std::int64_t n, float weight_decay, float grad_scale) {
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  const auto p0 = random_vector(static_cast<std::size_t>(n), 1);
  Tensor p = upload(p0, {n});
  Tensor m = zeros({n});
  Tensor v = zeros({n});
  Reference ref{to_double(p0), std::vector<double>(p0.size()), std::vector<double>(p0.size())};
  for (int t = 1; t <= 6; ++t) {
    auto grad = random_vector(p0.size(), 100 + t, 0.1f);
    grad[t] = 0.0f;  // a parameter without gradient still decays and moves on momentum
    be().adamw(p, upload(grad, {n}), m, v, lr, b1, b2, eps, weight_decay, t, grad_scale);
    ref.step(grad, lr, b1, b2, eps, weight_decay, t, grad_scale);
    EXPECT_LE(relative_error(download(m), ref.m), 1e-6) << "step " << t;
    EXPECT_LE(relative_error(download(v), ref.v), 1e-6) << "step " << t;
    // The parameters move by ~lr per step: compare the change too, not only the much larger values
    // (each step rounds p to fp32, ~1e-5 of the change).
    std::vector<double> delta_ref(p0.size());
    std::vector<float> delta(p0.size());
    const auto pv = download(p);
    for (std::size_t i = 0; i < p0.size(); ++i) {
      delta_ref[i] = ref.p[i] - p0[i];
      delta[i] = static_cast<float>(static_cast<double>(pv[i]) - p0[i]);
    }
    EXPECT_LE(relative_error(delta, delta_ref), 1e-4) << "step " << t;
    EXPECT_LE(relative_error(pv, ref.p), 3e-7) << "step " << t;
  }
}

TEST_P(AdamWTest, SeveralStepsWithWeightDecayAndGradScale) {
  check(1003, 0.1f, 0.5f);
}

TEST_P(AdamWTest, NoWeightDecayNoScale) {
  check(1003, 0.0f, 1.0f);
}

TEST_P(AdamWTest, ManyParametersRunInParallel) {
  check(100003, 0.1f, 0.25f);
}

FASTLLM_INSTANTIATE_BACKENDS(AdamWTest);

}  // namespace
}  // namespace fastllm::test
