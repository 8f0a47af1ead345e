#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "backends.h"

namespace fastllm::test {
namespace {

class MoeTest : public BackendTest {
 protected:
  void check_router(int tokens, int experts, int k);
};

struct Routing {
  std::vector<double> probs;      // [tokens, experts]
  std::vector<std::int32_t> top;  // [tokens, k]
  std::vector<double> weights;    // [tokens, k]
};

// Softmax in double, the k largest by a stable sort (ties to the lower index), renormalised.
Routing reference_routing(const std::vector<double>& logits, int tokens, int experts, int k) {
  Routing out;
  for (int t = 0; t < tokens; ++t) {
    const double* l = logits.data() + static_cast<std::size_t>(t) * experts;
    const double m = *std::max_element(l, l + experts);
    double sum = 0;
    for (int e = 0; e < experts; ++e)
      sum += std::exp(l[e] - m);
    std::vector<double> p(experts);
    for (int e = 0; e < experts; ++e)
      p[e] = std::exp(l[e] - m) / sum;
    std::vector<int> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double chosen = 0;
    for (int s = 0; s < k; ++s)
      chosen += p[order[s]];
    for (int s = 0; s < k; ++s) {
      out.top.push_back(order[s]);
      out.weights.push_back(p[order[s]] / chosen);
    }
    out.probs.insert(out.probs.end(), p.begin(), p.end());
  }
  return out;
}

void MoeTest::check_router(int tokens, int experts, int k) {
  const auto logits = random_vector(static_cast<std::size_t>(tokens) * experts, 1, 2.0f);
  Tensor tl = upload(logits, {tokens, experts});
  Tensor probs = zeros({tokens, experts});
  Tensor index = zeros({tokens, k}, DType::I32);
  Tensor weight = zeros({tokens, k});
  be().router_forward(tl, k, probs, index, weight);
  const Routing ref = reference_routing(to_double(logits), tokens, experts, k);
  EXPECT_LE(relative_error(download(probs), ref.probs), 1e-6);
  EXPECT_EQ(download_ints(index), ref.top);
  EXPECT_LE(relative_error(download(weight), ref.weights), 1e-6);

  // L = sum dw * weights + sum_e dprob[e] sum_t probs[t,e]: the second term is how the
  // load-balancing loss reaches the router.
  const auto dw = random_vector(static_cast<std::size_t>(tokens) * k, 2);
  const auto dprob = random_vector(experts, 3);
  const auto loss = [&](const std::vector<double>& l, bool with_dprob) {
    const Routing r = reference_routing(l, tokens, experts, k);
    double total = 0;
    for (std::size_t i = 0; i < dw.size(); ++i)
      total += dw[i] * r.weights[i];
    if (with_dprob)
      for (std::size_t i = 0; i < r.probs.size(); ++i)
        total += dprob[i % experts] * r.probs[i];
    return total;
  };
  for (bool with_dprob : {true, false}) {
    Tensor dlogits = upload(random_vector(logits.size(), 4), {tokens, experts});
    be().router_backward(probs, index, upload(dw, {tokens, k}),
                         with_dprob ? upload(dprob, {experts}) : Tensor(), dlogits);
    const auto expected = central_difference(
        [&](const std::vector<double>& l) { return loss(l, with_dprob); }, to_double(logits));
    EXPECT_LE(relative_error(download(dlogits), expected), 1e-6)
        << "experts " << experts << " top " << k << " dprob " << with_dprob;
  }
}

TEST_P(MoeTest, RouterFiveExpertsTopTwo) {
  check_router(7, 5, 2);
}
TEST_P(MoeTest, RouterEightExpertsTopTwo) {
  check_router(7, 8, 2);
}
TEST_P(MoeTest, RouterEightExpertsTopThree) {
  check_router(7, 8, 3);
}
TEST_P(MoeTest, RouterManyTokensRunInParallel) {
  check_router(301, 8, 2);
}

TEST_P(MoeTest, RouterTiesGoToTheLowerIndex) {
  // Equal logits give bit-equal probabilities.
  const std::vector<float> logits = {1, 2, 2, 0, 2,  //
                                     3, 3, 3, 3, 3,  //
                                     0, 1, 0, 1, 1};
  for (int k : {2, 3}) {
    Tensor index = zeros({3, k}, DType::I32);
    Tensor weight = zeros({3, k});
    be().router_forward(upload(logits, {3, 5}), k, zeros({3, 5}), index, weight);
    const std::vector<std::int32_t> expected =
        k == 2 ? std::vector<std::int32_t>{1, 2, 0, 1, 1, 3}
               : std::vector<std::int32_t>{1, 2, 4, 0, 1, 2, 1, 3, 4};
    EXPECT_EQ(download_ints(index), expected) << "top " << k;
    for (float w : download(weight))
      EXPECT_FLOAT_EQ(w, 1.0f / static_cast<float>(k));
  }
}

TEST_P(MoeTest, RouterStatisticsAccumulate) {
  const int tokens = 7, experts = 5, k = 2;
  const auto probs = random_vector(tokens * experts, 5);
  const std::vector<std::int32_t> top = {0, 3, 3, 4, 1, 0, 3, 2, 4, 0, 0, 1, 3, 1};
  const auto counts0 = random_vector(experts, 6);
  const auto sums0 = random_vector(experts, 7);
  Tensor counts = upload(counts0, {experts});
  Tensor sums = upload(sums0, {experts});
  be().router_statistics(upload(probs, {tokens, experts}), upload_ints(top, {tokens, k}), counts,
                         sums);
  std::vector<double> count_ref(counts0.begin(), counts0.end());
  std::vector<double> sum_ref(sums0.begin(), sums0.end());
  for (std::int32_t e : top)
    count_ref[e] += 1;
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e)
      sum_ref[e] += probs[t * experts + e];
  EXPECT_LE(relative_error(download(counts), count_ref), 1e-7);
  EXPECT_LE(relative_error(download(sums), sum_ref), 1e-6);
}

TEST_P(MoeTest, GatherRows) {
  const int rows = 9, width = 45;
  const auto src = random_vector(rows * width, 8);
  const std::vector<std::int32_t> index = {3, 0, 8, 3, 3, 5, 1};
  Tensor dst = zeros({7, width});
  be().gather_rows(upload(src, {rows, width}), upload_ints(index, {7}), dst);
  std::vector<double> expected;
  for (std::int32_t i : index)
    expected.insert(expected.end(), src.begin() + i * width, src.begin() + (i + 1) * width);
  EXPECT_EQ(relative_error(download(dst), expected), 0.0);
  EXPECT_THROW(
      be().gather_rows(upload(src, {rows, width}), upload_ints({9}, {1}), zeros({1, width})),
      std::invalid_argument);
}

TEST_P(MoeTest, ScatterAddRowsWithAndWithoutWeights) {
  for (int n : {14, 2000}) {
    const int rows = n > 100 ? 500 : 7, width = n > 100 ? 67 : 45;
    const auto src = random_vector(static_cast<std::size_t>(n) * width, 9);
    const auto weight = random_vector(n, 10);
    const auto dst0 = random_vector(static_cast<std::size_t>(rows) * width, 11);
    std::vector<std::int32_t> index(n);
    std::mt19937 gen(12);
    for (auto& i : index)
      i = static_cast<std::int32_t>(gen() % rows);
    for (bool weighted : {true, false}) {
      Tensor dst = upload(dst0, {rows, width});
      be().scatter_add_rows(upload(src, {n, width}), upload_ints(index, {n}),
                            weighted ? upload(weight, {n}) : Tensor(), dst);
      std::vector<double> expected(dst0.begin(), dst0.end());
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < width; ++j)
          expected[index[i] * width + j] +=
              (weighted ? static_cast<double>(weight[i]) : 1.0) * src[i * width + j];
      const auto first = download(dst);
      EXPECT_LE(relative_error(first, expected), 1e-6) << n << " weighted " << weighted;
      // Deterministic: the same inputs give the same bits.
      Tensor again = upload(dst0, {rows, width});
      be().scatter_add_rows(upload(src, {n, width}), upload_ints(index, {n}),
                            weighted ? upload(weight, {n}) : Tensor(), again);
      EXPECT_EQ(download(again), first);
    }
  }
}

TEST_P(MoeTest, ScaleRows) {
  const int rows = 7, width = 45;
  const auto y0 = random_vector(rows * width, 13);
  const auto w = random_vector(rows, 14);
  Tensor y = upload(y0, {rows, width});
  be().scale_rows(y, upload(w, {rows}));
  std::vector<double> expected(y0.size());
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < width; ++j)
      expected[r * width + j] = static_cast<double>(w[r]) * y0[r * width + j];
  EXPECT_LE(relative_error(download(y), expected), 1e-7);
}

TEST_P(MoeTest, DotRowsGathered) {
  for (int n : {7, 1500}) {
    const int rows = 9, width = n > 100 ? 129 : 45;
    const auto a = random_vector(static_cast<std::size_t>(n) * width, 15);
    const auto b = random_vector(rows * width, 16);
    std::vector<std::int32_t> index(n);
    for (int i = 0; i < n; ++i)
      index[i] = (i * 5 + 2) % rows;
    Tensor out = zeros({n});
    be().dot_rows_gathered(upload(a, {n, width}), upload(b, {rows, width}), upload_ints(index, {n}),
                           out);
    std::vector<double> expected(n, 0.0);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < width; ++j)
        expected[i] += static_cast<double>(a[i * width + j]) * b[index[i] * width + j];
    EXPECT_LE(relative_error(download(out), expected), 1e-6) << n;
  }
}

TEST_P(MoeTest, PermuteIsAStableSortByExpertWithOffsetsInTheBackend) {
  const int tokens = 7, experts = 5, k = 2;
  // Expert 2 receives nothing: its run is empty.
  const std::vector<std::int32_t> top = {0, 3, 3, 4, 1, 0, 3, 1, 4, 0, 0, 1, 3, 4};
  Tensor sorted_token = zeros({tokens * k}, DType::I32);
  Tensor sorted_slot = zeros({tokens * k}, DType::I32);
  Tensor offsets = zeros({experts + 1}, DType::I32);
  be().moe_permute_offsets(upload_ints(top, {tokens, k}), experts, sorted_token, sorted_slot,
                           offsets);
  std::vector<std::int32_t> slots(tokens * k);
  std::iota(slots.begin(), slots.end(), 0);
  std::stable_sort(slots.begin(), slots.end(),
                   [&](std::int32_t a, std::int32_t b) { return top[a] < top[b]; });
  std::vector<std::int32_t> token_ref;
  for (std::int32_t s : slots)
    token_ref.push_back(s / k);
  EXPECT_EQ(download_ints(sorted_slot), slots);
  EXPECT_EQ(download_ints(sorted_token), token_ref);
  EXPECT_EQ(download_ints(offsets), (std::vector<std::int32_t>{0, 4, 7, 7, 11, 14}));
  EXPECT_THROW(
      be().moe_permute_offsets(upload_ints({0, 5}, {1, 2}), experts, zeros({2}, DType::I32),
                               zeros({2}, DType::I32), zeros({experts + 1}, DType::I32)),
      std::invalid_argument);
}

// Expert runs of the grouped linear tests: empty experts (first, middle, last), one expert with
// every row, odd sizes, and rows past the last offset that no expert owns.
struct GroupedCase {
  std::vector<std::int32_t> offsets;
  int rows;  // of the row tensors, >= offsets.back()
};

std::vector<GroupedCase> grouped_cases() {
  return {{{0, 0, 5, 5, 12, 12}, 12},
          {{0, 0, 0, 19, 19}, 19},
          {{0, 3, 4, 11, 17}, 20},
          {{0, 1}, 1},
          {{0, 0, 0}, 3}};
}

TEST_P(MoeTest, GroupedLinearForwardMatchesALoopOverExperts) {
  const int n = 13, k = 21;
  for (const GroupedCase& c : grouped_cases()) {
    const int experts = static_cast<int>(c.offsets.size()) - 1, rows = c.rows;
    const auto x = random_vector(static_cast<std::size_t>(rows) * k, 20);
    const auto y0 = random_vector(static_cast<std::size_t>(rows) * n, 21);
    std::vector<std::vector<float>> w, b;
    std::vector<Tensor> weights, biases;
    for (int e = 0; e < experts; ++e) {
      w.push_back(random_vector(static_cast<std::size_t>(n) * k, 30 + e));
      b.push_back(random_vector(n, 60 + e));
      weights.push_back(upload(w[e], {n, k}));
      // Every other expert without a bias: an empty tensor.
      biases.push_back(e % 2 == 0 ? upload(b[e], {n}) : Tensor());
    }
    for (bool with_bias : {false, true}) {
      Tensor y = upload(y0, {rows, n});
      be().grouped_linear_forward(upload(x, {rows, k}), weights,
                                  with_bias ? biases : std::vector<Tensor>(),
                                  upload_ints(c.offsets, {experts + 1}), y);
      // Rows no expert owns keep their values.
      std::vector<double> expected(y0.begin(), y0.end());
      for (int e = 0; e < experts; ++e)
        for (int r = c.offsets[e]; r < c.offsets[e + 1]; ++r)
          for (int j = 0; j < n; ++j) {
            double acc = with_bias && e % 2 == 0 ? b[e][j] : 0.0;
            for (int p = 0; p < k; ++p)
              acc += static_cast<double>(x[r * k + p]) * w[e][j * k + p];
            expected[r * n + j] = acc;
          }
      EXPECT_LE(relative_error(download(y), expected), 1e-6)
          << experts << " experts, " << rows << " rows, bias " << with_bias;
    }
  }
}

TEST_P(MoeTest, GroupedLinearBackwardMatchesALoopOverExperts) {
  const int n = 13, k = 21;
  for (const GroupedCase& c : grouped_cases()) {
    const int experts = static_cast<int>(c.offsets.size()) - 1, rows = c.rows;
    const auto x = random_vector(static_cast<std::size_t>(rows) * k, 22);
    const auto dy = random_vector(static_cast<std::size_t>(rows) * n, 23);
    const auto dx0 = random_vector(static_cast<std::size_t>(rows) * k, 24);
    std::vector<std::vector<float>> w, dw0, db0;
    std::vector<Tensor> weights, dweights, dbiases;
    for (int e = 0; e < experts; ++e) {
      w.push_back(random_vector(static_cast<std::size_t>(n) * k, 40 + e));
      dw0.push_back(random_vector(static_cast<std::size_t>(n) * k, 80 + e));
      db0.push_back(random_vector(n, 120 + e));
      weights.push_back(upload(w[e], {n, k}));
      dweights.push_back(upload(dw0[e], {n, k}));
      dbiases.push_back(e % 2 == 1 ? upload(db0[e], {n}) : Tensor());
    }
    const Tensor offsets = upload_ints(c.offsets, {experts + 1});
    for (float beta : {0.0f, 1.0f}) {
      Tensor dx = upload(dx0, {rows, k});
      be().grouped_linear_backward_data(upload(dy, {rows, n}), weights, offsets, beta, dx);
      std::vector<double> expected(dx0.begin(), dx0.end());
      for (int e = 0; e < experts; ++e)
        for (int r = c.offsets[e]; r < c.offsets[e + 1]; ++r)
          for (int p = 0; p < k; ++p) {
            double acc = beta * static_cast<double>(dx0[r * k + p]);
            for (int j = 0; j < n; ++j)
              acc += static_cast<double>(dy[r * n + j]) * w[e][j * k + p];
            expected[r * k + p] = acc;
          }
      EXPECT_LE(relative_error(download(dx), expected), 1e-6)
          << experts << " experts, " << rows << " rows, beta " << beta;
    }
    be().grouped_linear_backward_weight(upload(x, {rows, k}), upload(dy, {rows, n}), offsets,
                                        dweights, dbiases);
    for (int e = 0; e < experts; ++e) {
      std::vector<double> dw_ref(dw0[e].begin(), dw0[e].end());
      std::vector<double> db_ref(db0[e].begin(), db0[e].end());
      for (int r = c.offsets[e]; r < c.offsets[e + 1]; ++r)
        for (int j = 0; j < n; ++j) {
          db_ref[j] += dy[r * n + j];
          for (int p = 0; p < k; ++p)
            dw_ref[j * k + p] += static_cast<double>(dy[r * n + j]) * x[r * k + p];
        }
      // Accumulated onto what the gradients held; an expert without rows leaves them alone.
      EXPECT_LE(relative_error(download(dweights[e]), dw_ref), 1e-6) << "expert " << e;
      if (e % 2 == 1) {
        EXPECT_LE(relative_error(download(dbiases[e]), db_ref), 1e-6) << "expert " << e;
      }
    }
  }
}

// The host reads the offsets where they lie and checks them; a device backend does not wait for
// the host to do so (moe_permute_offsets makes them valid by construction).
TEST_P(MoeTest, GroupedLinearRejectsBadOffsetsOnTheHost) {
  if (GetParam() != "host") GTEST_SKIP() << "the device ops do not read the offsets on the host";
  const int rows = 6, n = 3, k = 2;
  const std::vector<Tensor> weights = {upload(random_vector(n * k, 1), {n, k}),
                                       upload(random_vector(n * k, 2), {n, k})};
  const Tensor x = upload(random_vector(rows * k, 3), {rows, k});
  for (const auto& bad : std::vector<std::vector<std::int32_t>>{{1, 2, 6}, {0, 4, 3}, {0, 3, 7}}) {
    EXPECT_THROW(
        be().grouped_linear_forward(x, weights, {}, upload_ints(bad, {3}), zeros({rows, n})),
        std::invalid_argument);
    EXPECT_THROW(be().grouped_linear_backward_weight(x, zeros({rows, n}), upload_ints(bad, {3}),
                                                     weights, {}),
                 std::invalid_argument);
  }
  // Offsets for three experts with two experts' weights.
  EXPECT_THROW(
      be().grouped_linear_backward_data(zeros({rows, n}), weights, upload_ints({0, 2, 4, 6}, {4}),
                                        0.0f, zeros({rows, k})),
      std::invalid_argument);
}

FASTLLM_INSTANTIATE_BACKENDS(MoeTest);

}  // namespace
}  // namespace fastllm::test
