#include "backends.h"

namespace fastllm::test {
namespace {

class EmbeddingTest : public BackendTest {
 protected:
  // This rank holds rows [offset, offset + vocab) of a larger vocabulary.
  void check(int vocab, int dim, std::int64_t offset, const std::vector<std::int32_t>& ids);
};

void EmbeddingTest::check(int vocab, int dim, std::int64_t offset,
                          const std::vector<std::int32_t>& ids) {
  const auto tokens = static_cast<std::int64_t>(ids.size());
  const auto table = random_vector(static_cast<std::size_t>(vocab) * dim, 1);
  Tensor id = upload_ints(ids, {tokens});
  Tensor out = zeros({tokens, dim});
  be().embedding_forward(id, upload(table, {vocab, dim}), offset, out);
  std::vector<double> expected(static_cast<std::size_t>(tokens) * dim, 0.0);
  for (std::int64_t i = 0; i < tokens; ++i) {
    const std::int64_t row = ids[i] - offset;
    if (row < 0 || row >= vocab) continue;
    for (int j = 0; j < dim; ++j)
      expected[i * dim + j] = table[row * dim + j];
  }
  EXPECT_EQ(relative_error(download(out), expected), 0.0);

  // Backward adds dout rows into the rows of this rank, repeated ids summing.
  const auto dout = random_vector(static_cast<std::size_t>(tokens) * dim, 2);
  const auto dtable0 = random_vector(static_cast<std::size_t>(vocab) * dim, 3);
  Tensor dtable = upload(dtable0, {vocab, dim});
  be().embedding_backward(id, upload(dout, {tokens, dim}), offset, dtable);
  std::vector<double> grad(dtable0.begin(), dtable0.end());
  for (std::int64_t i = 0; i < tokens; ++i) {
    const std::int64_t row = ids[i] - offset;
    if (row < 0 || row >= vocab) continue;
    for (int j = 0; j < dim; ++j)
      grad[row * dim + j] += dout[i * dim + j];
  }
  EXPECT_LE(relative_error(download(dtable), grad), 1e-7);
}

TEST_P(EmbeddingTest, IdsInsideAndOutsideTheRankSlice) {
  // Rows [20, 31) on this rank: ids below, above and at both edges, repeated ones.
  check(11, 45, 20, {20, 5, 30, 31, 25, 25, 19, 0, 22, 25});
}

TEST_P(EmbeddingTest, WholeVocabularyOnOneRank) {
  check(103, 45, 0, {0, 102, 7, 7, 50, 3, 101});
}

TEST_P(EmbeddingTest, ManyTokensRunInParallel) {
  std::vector<std::int32_t> ids(300);
  std::mt19937 gen(4);
  for (auto& id : ids)
    id = static_cast<std::int32_t>(gen() % 150);
  check(97, 301, 40, ids);
}

FASTLLM_INSTANTIATE_BACKENDS(EmbeddingTest);

}  // namespace
}  // namespace fastllm::test
