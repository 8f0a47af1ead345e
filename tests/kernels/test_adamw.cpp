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

// The fused pass over ranges: every range against the naive double update with its own weight
// decay, the elements between ranges untouched, the weights copy and the cleared gradients.
TEST_P(AdamWTest, RangesFusedWithWeightsCopyAndGradientClearing) {
  const std::int64_t n = 70001;
  const std::vector<AdamWRange> ranges{{0, 1000, 0.1f},
                                       {1000, 0, 0.1f},
                                       {1500, 40000, 0.0f},
                                       {41500, 28000, 0.1f},
                                       {69999, 2, 0.0f}};
  AdamWStepScalars s;
  s.lr = 3e-3f;
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.grad_scale = 0.5f;
  const auto p0 = random_vector(static_cast<std::size_t>(n), 7);
  Tensor p = upload(p0, {n});
  Tensor m = zeros({n});
  Tensor v = zeros({n});
  Tensor weights = zeros({n});
  std::vector<Reference> refs;
  for (const AdamWRange& r : ranges) {
    const auto first = p0.begin() + r.begin;
    refs.push_back({std::vector<double>(first, first + r.count),
                    std::vector<double>(static_cast<std::size_t>(r.count)),
                    std::vector<double>(static_cast<std::size_t>(r.count))});
  }
  for (int t = 1; t <= 4; ++t) {
    const auto grad = random_vector(p0.size(), 200 + t, 0.1f);
    Tensor g = upload(grad, {n});
    s.step = t;
    be().adamw_ranges(p, g, m, v, weights, ranges, s, /*zero_grad=*/t % 2 == 0);
    const auto pv = download(p), mv = download(m), gv = download(g), wv = download(weights);
    std::vector<bool> covered(p0.size(), false);
    for (std::size_t i = 0; i < ranges.size(); ++i) {
      const AdamWRange& r = ranges[i];
      const std::vector<float> gr(grad.begin() + r.begin, grad.begin() + r.begin + r.count);
      refs[i].step(gr, s.lr, s.beta1, s.beta2, s.eps, r.weight_decay, t, s.grad_scale);
      const std::vector<float> got(pv.begin() + r.begin, pv.begin() + r.begin + r.count);
      const std::vector<float> got_m(mv.begin() + r.begin, mv.begin() + r.begin + r.count);
      EXPECT_LE(relative_error(got, refs[i].p), 3e-7) << "range " << i << " step " << t;
      EXPECT_LE(relative_error(got_m, refs[i].m), 1e-6) << "range " << i << " step " << t;
      for (std::int64_t j = r.begin; j < r.begin + r.count; ++j)
        covered[static_cast<std::size_t>(j)] = true;
    }
    for (std::size_t j = 0; j < p0.size(); ++j) {
      if (covered[j]) {
        ASSERT_EQ(wv[j], pv[j]) << j;
        ASSERT_EQ(gv[j], t % 2 == 0 ? 0.0f : grad[j]) << j;
      } else {
        ASSERT_EQ(pv[j], p0[j]) << j;
        ASSERT_EQ(mv[j], 0.0f) << j;
        ASSERT_EQ(wv[j], 0.0f) << j;
        ASSERT_EQ(gv[j], grad[j]) << j;
      }
    }
  }
}

// Ranges in one pass give the same bits as one call per range over its rows alone (adamw).
TEST_P(AdamWTest, RangesMatchPerRangeCallsBitForBit) {
  const std::int64_t n = 50000;
  const std::vector<AdamWRange> ranges{{0, 30000, 0.1f}, {30000, 20000, 0.0f}};
  const auto p0 = random_vector(static_cast<std::size_t>(n), 11);
  const auto grad = random_vector(p0.size(), 12, 0.1f);
  Tensor pa = upload(p0, {n}), ma = zeros({n}), va = zeros({n});
  Tensor pb = upload(p0, {n}), mb = zeros({n}), vb = zeros({n});
  Tensor g = upload(grad, {n});
  AdamWStepScalars s;
  s.lr = 1e-3f;
  s.grad_scale = 0.75f;
  for (int t = 1; t <= 3; ++t) {
    s.step = t;
    be().adamw_ranges(pa, g, ma, va, Tensor(), ranges, s, false);
    for (const AdamWRange& r : ranges)
      be().adamw(pb.rows(r.begin, r.count), g.rows(r.begin, r.count), mb.rows(r.begin, r.count),
                 vb.rows(r.begin, r.count), s.lr, s.beta1, s.beta2, s.eps, r.weight_decay, t,
                 s.grad_scale);
  }
  EXPECT_EQ(download(pa), download(pb));
  EXPECT_EQ(download(ma), download(mb));
  EXPECT_EQ(download(va), download(vb));
}

TEST_P(AdamWTest, RangesOutsideTheBuffersThrow) {
  Tensor t = zeros({10});
  AdamWStepScalars s;
  EXPECT_THROW(be().adamw_ranges(t, t, t, t, Tensor(), {{5, 6, 0.0f}}, s, false),
               std::invalid_argument);
  EXPECT_THROW(be().sum_squares_ranges(t, {{-1, 2}}), std::invalid_argument);
}

TEST_P(AdamWTest, SumSquaresOverRangesAgainstADoubleLoop) {
  const std::int64_t n = 200003;
  const auto x = random_vector(static_cast<std::size_t>(n), 21);
  const std::vector<FlatRange> ranges{{3, 100000}, {100003, 0}, {120000, 80000}, {200002, 1}};
  double want = 0;
  for (const FlatRange& r : ranges)
    for (std::int64_t i = r.begin; i < r.begin + r.count; ++i)
      want += static_cast<double>(x[static_cast<std::size_t>(i)]) * x[static_cast<std::size_t>(i)];
  Tensor t = upload(x, {n});
  EXPECT_NEAR(be().sum_squares_ranges(t, ranges), want, 1e-10 * want);
  EXPECT_EQ(be().sum_squares_ranges(t, {}), 0.0);
  // As the sum of per-range sum_squares (the gradient norm stays what it was).
  double per_range = 0;
  for (const FlatRange& r : ranges)
    per_range += be().sum_squares(t.rows(r.begin, r.count));
  if (GetParam() == "host") {
    EXPECT_EQ(be().sum_squares_ranges(t, ranges), per_range);
  } else {
    EXPECT_NEAR(be().sum_squares_ranges(t, ranges), per_range, 1e-10 * want);
  }
}

FASTLLM_INSTANTIATE_BACKENDS(AdamWTest);

}  // namespace
}  // namespace fastllm::test
