#include <algorithm>
#include <limits>

#include "backends.h"

namespace fastllm::test {
namespace {

class CrossEntropyTest : public BackendTest {
 protected:
  struct Stats {
    std::vector<float> max, sumexp, target;
  };
  Stats stats(const std::vector<float>& logits, int rows, int vocab,
              const std::vector<std::int32_t>& targets, std::int64_t offset);
  std::vector<float> backward(const std::vector<float>& logits, int rows, int vocab,
                              const std::vector<std::int32_t>& targets, std::int64_t offset,
                              const std::vector<float>& max, const std::vector<float>& sumexp,
                              float scale);
};

CrossEntropyTest::Stats CrossEntropyTest::stats(const std::vector<float>& logits, int rows,
                                                int vocab, const std::vector<std::int32_t>& targets,
                                                std::int64_t offset) {
  Tensor m = zeros({rows});
  Tensor s = zeros({rows});
  Tensor t = zeros({rows});
  be().cross_entropy_stats(upload(logits, {rows, vocab}), upload_ints(targets, {rows}), offset, m,
                           s, t);
  return {download(m), download(s), download(t)};
}

std::vector<float> CrossEntropyTest::backward(const std::vector<float>& logits, int rows, int vocab,
                                              const std::vector<std::int32_t>& targets,
                                              std::int64_t offset, const std::vector<float>& max,
                                              const std::vector<float>& sumexp, float scale) {
  Tensor d = upload(random_vector(logits.size(), 99), {rows, vocab});
  be().cross_entropy_backward(upload(logits, {rows, vocab}), upload_ints(targets, {rows}), offset,
                              upload(max, {rows}), upload(sumexp, {rows}), scale, d);
  return download(d);
}

// scale * sum over rows with a target >= 0 of logsumexp(row) - row[target], in double.
double reference_loss(const std::vector<double>& logits, int rows, int vocab,
                      const std::vector<std::int32_t>& targets, double scale) {
  double loss = 0;
  for (int r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    const double* l = logits.data() + static_cast<std::size_t>(r) * vocab;
    const double m = *std::max_element(l, l + vocab);
    double s = 0;
    for (int j = 0; j < vocab; ++j)
      s += std::exp(l[j] - m);
    loss += std::log(s) + m - l[targets[r]];
  }
  return scale * loss;
}

// Rows 7, vocab 103, with two ignored rows and targets at both ends of the vocabulary.
constexpr int kRows = 7;
constexpr int kVocab = 103;
const std::vector<std::int32_t> kTargets = {5, -1, 102, 0, 77, -100, 40};

TEST_P(CrossEntropyTest, StatsAgainstDoubleReference) {
  const auto logits = random_vector(kRows * kVocab, 1, 3.0f);
  const Stats s = stats(logits, kRows, kVocab, kTargets, 0);
  std::vector<double> max_ref, sum_ref, target_ref;
  for (int r = 0; r < kRows; ++r) {
    const float* l = logits.data() + r * kVocab;
    const double m = *std::max_element(l, l + kVocab);
    double sum = 0;
    for (int j = 0; j < kVocab; ++j)
      sum += std::exp(l[j] - m);
    max_ref.push_back(m);
    sum_ref.push_back(sum);
    target_ref.push_back(kTargets[r] >= 0 ? l[kTargets[r]] : 0.0);
  }
  EXPECT_LE(relative_error(s.max, max_ref), 0.0);
  EXPECT_LE(relative_error(s.sumexp, sum_ref), 1e-6);
  EXPECT_LE(relative_error(s.target, target_ref), 0.0);
}

TEST_P(CrossEntropyTest, BackwardIsTheGradientOfTheLoss) {
  const auto logits = random_vector(kRows * kVocab, 2, 3.0f);
  const float scale = 1.0f / 5.0f;  // the mean over the 5 predicted rows
  const Stats s = stats(logits, kRows, kVocab, kTargets, 0);
  const auto grad = backward(logits, kRows, kVocab, kTargets, 0, s.max, s.sumexp, scale);
  const auto expected = central_difference(
      [&](const std::vector<double>& l) {
        return reference_loss(l, kRows, kVocab, kTargets, scale);
      },
      to_double(logits));
  EXPECT_LE(relative_error(grad, expected), 1e-6);
  for (int r : {1, 5})
    for (int j = 0; j < kVocab; ++j)
      ASSERT_EQ(grad[r * kVocab + j], 0.0f) << "ignored row " << r;
}

TEST_P(CrossEntropyTest, BackwardInPlaceOverTheLogits) {
  const auto logits = random_vector(kRows * kVocab, 3, 3.0f);
  const Stats s = stats(logits, kRows, kVocab, kTargets, 0);
  const auto separate = backward(logits, kRows, kVocab, kTargets, 0, s.max, s.sumexp, 0.5f);
  Tensor l = upload(logits, {kRows, kVocab});
  be().cross_entropy_backward(l, upload_ints(kTargets, {kRows}), 0, upload(s.max, {kRows}),
                              upload(s.sumexp, {kRows}), 0.5f, l);
  EXPECT_EQ(download(l), separate);
}

// The vocabulary split over ranks: per-slice statistics combined as the training loop does
// reproduce the loss and, sliced, the gradient of the whole vocabulary.
TEST_P(CrossEntropyTest, VocabParallelSlicesReconstructTheFullLoss) {
  const auto logits = random_vector(kRows * kVocab, 4, 3.0f);
  const float scale = 0.25f;
  for (const std::vector<int>& bounds :
       {std::vector<int>{0, 52, kVocab}, std::vector<int>{0, 40, 77, kVocab}}) {
    const auto parts = bounds.size() - 1;
    std::vector<std::vector<float>> slices(parts);
    std::vector<Stats> slice_stats;
    for (std::size_t p = 0; p < parts; ++p) {
      const int width = bounds[p + 1] - bounds[p];
      for (int r = 0; r < kRows; ++r)
        for (int j = bounds[p]; j < bounds[p + 1]; ++j)
          slices[p].push_back(logits[r * kVocab + j]);
      slice_stats.push_back(stats(slices[p], kRows, width, kTargets, bounds[p]));
    }
    std::vector<float> global_max(kRows), global_sum(kRows);
    double loss = 0;
    for (int r = 0; r < kRows; ++r) {
      float m = -std::numeric_limits<float>::infinity();
      for (const Stats& s : slice_stats)
        m = std::max(m, s.max[r]);
      double sum = 0, target = 0;
      for (const Stats& s : slice_stats) {
        sum += s.sumexp[r] * std::exp(static_cast<double>(s.max[r]) - m);
        target += s.target[r];
      }
      global_max[r] = m;
      global_sum[r] = static_cast<float>(sum);
      if (kTargets[r] >= 0) loss += scale * (std::log(sum) + m - target);
    }
    const double expected_loss = reference_loss(to_double(logits), kRows, kVocab, kTargets, scale);
    EXPECT_NEAR(loss, expected_loss, 1e-6 * expected_loss) << parts << " slices";

    std::vector<float> grad(logits.size());
    for (std::size_t p = 0; p < parts; ++p) {
      const int width = bounds[p + 1] - bounds[p];
      const auto g =
          backward(slices[p], kRows, width, kTargets, bounds[p], global_max, global_sum, scale);
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < width; ++j)
          grad[r * kVocab + bounds[p] + j] = g[r * width + j];
    }
    const auto expected = central_difference(
        [&](const std::vector<double>& l) {
          return reference_loss(l, kRows, kVocab, kTargets, scale);
        },
        to_double(logits));
    EXPECT_LE(relative_error(grad, expected), 1e-6) << parts << " slices";
  }
}

TEST_P(CrossEntropyTest, ManyRowsRunInParallel) {
  const int rows = 64, vocab = 1000;
  const auto logits = random_vector(rows * vocab, 5, 4.0f);
  std::vector<std::int32_t> targets(rows);
  for (int r = 0; r < rows; ++r)
    targets[r] = r % 9 == 0 ? -1 : (r * 37) % vocab;
  const Stats s = stats(logits, rows, vocab, targets, 0);
  const auto grad = backward(logits, rows, vocab, targets, 0, s.max, s.sumexp, 1.0f);
  // softmax - onehot, in double.
  std::vector<double> expected(logits.size(), 0.0);
  for (int r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    const float* l = logits.data() + r * vocab;
    const double m = *std::max_element(l, l + vocab);
    double sum = 0;
    for (int j = 0; j < vocab; ++j)
      sum += std::exp(l[j] - m);
    for (int j = 0; j < vocab; ++j)
      expected[r * vocab + j] = std::exp(l[j] - m) / sum;
    expected[r * vocab + targets[r]] -= 1.0;
  }
  EXPECT_LE(relative_error(grad, expected), 1e-6);
}

FASTLLM_INSTANTIATE_BACKENDS(CrossEntropyTest);

}  // namespace
}  // namespace fastllm::test
