#include "backends.h"

namespace fastllm::test {
namespace {

class ElementwiseTest : public BackendTest {};

// Small sizes run serially, the large one through the parallel loops.
const std::int64_t kSizes[] = {1, 45 * 7, 100003};

TEST_P(ElementwiseTest, AddAccumulatesScaledInput) {
  for (std::int64_t n : kSizes) {
    const auto y0 = random_vector(static_cast<std::size_t>(n), 1);
    const auto x = random_vector(static_cast<std::size_t>(n), 2);
    Tensor y = upload(y0, {n});
    be().add(y, upload(x, {n}), -0.37f);
    std::vector<double> expected(y0.size());
    for (std::size_t i = 0; i < y0.size(); ++i)
      expected[i] = y0[i] + -0.37 * x[i];
    EXPECT_LE(relative_error(download(y), expected), 1e-6) << n;
  }
}

TEST_P(ElementwiseTest, ScaleMultipliesInPlace) {
  for (std::int64_t n : kSizes) {
    const auto y0 = random_vector(static_cast<std::size_t>(n), 3);
    Tensor y = upload(y0, {n});
    be().scale(y, 1.7f);
    std::vector<double> expected(y0.size());
    for (std::size_t i = 0; i < y0.size(); ++i)
      expected[i] = 1.7 * y0[i];
    EXPECT_LE(relative_error(download(y), expected), 1e-6) << n;
  }
}

TEST_P(ElementwiseTest, SumSquaresInDouble) {
  for (std::int64_t n : kSizes) {
    const auto x = random_vector(static_cast<std::size_t>(n), 4, 3.0f);
    double expected = 0;
    for (float v : x)
      expected += static_cast<double>(v) * v;
    EXPECT_NEAR(be().sum_squares(upload(x, {n})), expected, 1e-12 * expected) << n;
  }
  EXPECT_EQ(be().sum_squares(zeros({0})), 0.0);
}

FASTLLM_INSTANTIATE_BACKENDS(ElementwiseTest);

}  // namespace
}  // namespace fastllm::test
