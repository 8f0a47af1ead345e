// The training sampler on datasets whose every token names its dataset, document and position
// (token = 1000000 * dataset + 1000 * document + position), so each sample can be checked against
// the documents directly.
#include "data/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <thread>

#include "data_test_util.h"

namespace fastllm {
namespace {

using test::TempDir;
using test::user_error;
using Ids = std::vector<std::int32_t>;

std::int32_t token_of(int dataset, int doc, int pos) {
  return 1000000 * dataset + 1000 * doc + pos;
}

// Writes a dataset of `docs` documents; document d has length(d) tokens. Returns the documents.
std::vector<Ids> make_dataset(const std::string& prefix, int dataset, int docs,
                              int (*length)(int)) {
  std::vector<Ids> out;
  IndexedDatasetWriter writer(prefix, TokenDtype::kInt32);
  for (int d = 0; d < docs; ++d) {
    Ids doc;
    for (int p = 0; p < length(d); ++p)
      doc.push_back(token_of(dataset, d, p));
    writer.add_document(doc);
    out.push_back(doc);
  }
  writer.finalize();
  return out;
}

int varied(int d) {
  return 3 + d * 7 % 13;
}
int fixed5(int) {
  return 5;
}

struct Sample {
  Ids tokens, targets;
  bool operator==(const Sample&) const = default;
};

Sample draw(const DataSampler& sampler, std::int64_t index) {
  Sample s{Ids(static_cast<std::size_t>(sampler.sequence_length())),
           Ids(static_cast<std::size_t>(sampler.sequence_length()))};
  sampler.sample(index, s.tokens, s.targets);
  return s;
}

SamplerConfig config_for(std::vector<DataSource> sources, std::int64_t seq, SamplingMode mode,
                         bool shuffle, std::uint64_t seed = 1234) {
  SamplerConfig c;
  c.sources = std::move(sources);
  c.sequence_length = seq;
  c.mode = mode;
  c.shuffle = shuffle;
  c.seed = seed;
  return c;
}

class SamplerTest : public ::testing::Test {
 protected:
  std::string prefix(const std::string& name) const { return (dir_ / name).string(); }
  TempDir dir_;
};

TEST_F(SamplerTest, PackedWindowsOverlapByOneTokenAndCoverTheStream) {
  const auto docs = make_dataset(prefix("a"), 0, 30, varied);
  Ids stream;
  for (const Ids& d : docs)
    stream.insert(stream.end(), d.begin(), d.end());
  const std::int64_t seq = 8;
  const DataSampler sampler(config_for({{prefix("a"), {}}}, seq, SamplingMode::kPacked, false),
                            DataSplit::kTrain);
  const std::int64_t n = (static_cast<std::int64_t>(stream.size()) - 1) / seq;
  ASSERT_EQ(sampler.sources()[0].samples_per_epoch, n);
  ASSERT_GT(n, 10);
  for (std::int64_t i = 0; i < n; ++i) {
    const Sample s = draw(sampler, i);
    const auto at = stream.begin() + i * seq;
    EXPECT_EQ(s.tokens, Ids(at, at + seq)) << "sample " << i;
    EXPECT_EQ(s.targets, Ids(at + 1, at + seq + 1)) << "sample " << i;
    if (i + 1 < n) {
      EXPECT_EQ(s.targets.back(), draw(sampler, i + 1).tokens.front());
    }
  }
  // The next epoch starts over (no shuffle: the same order).
  for (std::int64_t i : {0L, 3L, n - 1})
    EXPECT_EQ(draw(sampler, n + i), draw(sampler, i));
}

// The positions of a sample's tokens in their documents, from the token ids (which encode each
// token's document and position): counted from the document's first token, or from the sample's
// start for the document the sample cuts into.
TEST_F(SamplerTest, PositionsRestartAtEachDocumentAndAtTheSampleStart) {
  make_dataset(prefix("a"), 0, 40, varied);
  const std::int64_t seq = 11;
  for (const SamplingMode mode : {SamplingMode::kPacked, SamplingMode::kDocument}) {
    const DataSampler sampler(config_for({{prefix("a"), {}}}, seq, mode, true), DataSplit::kTrain);
    int starts_inside = 0;
    for (std::int64_t i = 0; i < 30; ++i) {
      const Sample s = draw(sampler, i);
      Ids tokens(seq), targets(seq), positions(seq);
      sampler.sample(i, tokens, targets, positions);
      EXPECT_EQ(tokens, s.tokens);
      EXPECT_EQ(targets, s.targets);
      const int first_doc = s.tokens[0] / 1000 % 1000, first_pos = s.tokens[0] % 1000;
      for (std::int64_t t = 0; t < seq; ++t) {
        const auto at = static_cast<std::size_t>(t);
        const int doc = s.tokens[at] / 1000 % 1000, pos = s.tokens[at] % 1000;
        // Document mode pads past the document: the padding continues its positions.
        const bool padding = mode == SamplingMode::kDocument && t > 0 && s.targets[at - 1] < 0;
        const int want = padding ? static_cast<int>(t) : doc == first_doc ? pos - first_pos : pos;
        EXPECT_EQ(positions[at], want) << "sample " << i << " token " << t;
        starts_inside += t > 0 && positions[at] == 0;
      }
    }
    if (mode == SamplingMode::kPacked) {
      EXPECT_GT(starts_inside, 10);
    }
    Ids short_positions(static_cast<std::size_t>(seq - 1)), tokens(seq), targets(seq);
    EXPECT_THROW(sampler.sample(0, tokens, targets, short_positions), std::invalid_argument);
  }
}

// Each window must be whole documents back to back: inside a document positions step by one, and
// a document's last token is followed by another document's first.
void expect_window_of_whole_documents(const Sample& s, const std::vector<Ids>& docs) {
  Ids window = s.tokens;
  window.push_back(s.targets.back());
  for (std::size_t t = 0; t + 1 < window.size(); ++t) {
    const int doc = window[t] / 1000 % 1000, pos = window[t] % 1000;
    const int next_doc = window[t + 1] / 1000 % 1000, next_pos = window[t + 1] % 1000;
    if (pos + 1 < static_cast<int>(docs[static_cast<std::size_t>(doc)].size())) {
      EXPECT_EQ(next_doc, doc);
      EXPECT_EQ(next_pos, pos + 1);
    } else {
      EXPECT_EQ(next_pos, 0);
      EXPECT_NE(next_doc, doc);
    }
  }
}

TEST_F(SamplerTest, PackedShuffleIsAPermutedStreamAndDeterministicInTheSeed) {
  const auto docs = make_dataset(prefix("a"), 0, 40, varied);
  const std::int64_t seq = 6;
  const auto config = config_for({{prefix("a"), {}}}, seq, SamplingMode::kPacked, true, 99);
  const DataSampler sampler(config, DataSplit::kTrain);
  const std::int64_t n = sampler.sources()[0].samples_per_epoch;
  for (std::int64_t epoch = 0; epoch < 2; ++epoch) {
    std::set<std::int32_t> seen;
    for (std::int64_t i = 0; i < n; ++i) {
      const Sample s = draw(sampler, epoch * n + i);
      expect_window_of_whole_documents(s, docs);
      for (std::size_t t = 0; t + 1 < s.tokens.size(); ++t)
        EXPECT_EQ(s.targets[t], s.tokens[t + 1]);
      seen.insert(s.tokens.begin(), s.tokens.end());
    }
    // The windows' inputs tile n * seq distinct tokens of the epoch's stream.
    EXPECT_EQ(static_cast<std::int64_t>(seen.size()), n * seq) << "epoch " << epoch;
  }

  const DataSampler same(config, DataSplit::kTrain);
  auto other_config = config;
  other_config.seed = 100;
  const DataSampler other(other_config, DataSplit::kTrain);
  auto plain_config = config;
  plain_config.shuffle = false;
  const DataSampler plain(plain_config, DataSplit::kTrain);
  int differ_seed = 0, differ_epoch = 0, differ_plain = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(draw(same, i), draw(sampler, i));
    differ_seed += draw(other, i) == draw(sampler, i) ? 0 : 1;
    differ_epoch += draw(sampler, n + i) == draw(sampler, i) ? 0 : 1;
    differ_plain += draw(plain, i) == draw(sampler, i) ? 0 : 1;
  }
  EXPECT_GT(differ_seed, n / 2);
  EXPECT_GT(differ_epoch, n / 2);
  EXPECT_GT(differ_plain, n / 2);
}

TEST_F(SamplerTest, DocumentModePadsWithTargetMinusOneAndTruncates) {
  const auto docs = make_dataset(prefix("a"), 0, 25, varied);
  const std::int64_t seq = 10;
  auto config = config_for({{prefix("a"), {}}}, seq, SamplingMode::kDocument, false);
  config.pad_token = 77;
  const DataSampler sampler(config, DataSplit::kTrain);
  EXPECT_EQ(sampler.sources()[0].samples_per_epoch, 25);
  bool saw_short = false, saw_long = false;
  for (std::int64_t i = 0; i < 25; ++i) {
    const Ids& doc = docs[static_cast<std::size_t>(i)];
    const Sample s = draw(sampler, i);
    const auto length = std::min<std::size_t>(doc.size(), seq + 1);
    saw_short = saw_short || doc.size() < static_cast<std::size_t>(seq);
    saw_long = saw_long || doc.size() > static_cast<std::size_t>(seq + 1);
    for (std::size_t t = 0; t < static_cast<std::size_t>(seq); ++t) {
      EXPECT_EQ(s.tokens[t], t < length ? doc[t] : 77) << "sample " << i << " position " << t;
      EXPECT_EQ(s.targets[t], t + 1 < length ? doc[t + 1] : -1)
          << "sample " << i << " position " << t;
    }
    EXPECT_EQ(draw(sampler, 25 + i), s);
  }
  EXPECT_TRUE(saw_short);
  EXPECT_TRUE(saw_long);
}

TEST_F(SamplerTest, DocumentModeShuffleVisitsEveryDocumentOncePerEpoch) {
  make_dataset(prefix("a"), 0, 50, varied);
  const DataSampler sampler(config_for({{prefix("a"), {}}}, 4, SamplingMode::kDocument, true, 5),
                            DataSplit::kTrain);
  std::vector<std::vector<int>> orders(3);
  for (int epoch = 0; epoch < 3; ++epoch) {
    for (int i = 0; i < 50; ++i) {
      orders[static_cast<std::size_t>(epoch)].push_back(draw(sampler, epoch * 50 + i).tokens[0] /
                                                        1000);
    }
    std::vector<int> sorted = orders[static_cast<std::size_t>(epoch)];
    std::sort(sorted.begin(), sorted.end());
    std::vector<int> all(50);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all) << "epoch " << epoch;
  }
  EXPECT_NE(orders[0], orders[1]);
  EXPECT_NE(orders[1], orders[2]);
}

TEST_F(SamplerTest, SplitRangesFollowMegatronRounding) {
  make_dataset(prefix("hundred"), 0, 100, fixed5);
  make_dataset(prefix("ten"), 0, 10, fixed5);
  make_dataset(prefix("odd"), 0, 37, fixed5);
  auto range = [&](const std::string& name, const std::string& split, DataSplit which) {
    auto config = config_for({{prefix(name), {}}}, 4, SamplingMode::kDocument, false);
    config.split = parse_split(split);
    const DataSampler sampler(config, which);
    return std::pair{sampler.sources()[0].first_sequence, sampler.sources()[0].end_sequence};
  };
  using R = std::pair<std::int64_t, std::int64_t>;
  EXPECT_EQ(range("hundred", "98,2,0", DataSplit::kTrain), R(0, 98));
  EXPECT_EQ(range("hundred", "98,2,0", DataSplit::kValid), R(98, 100));
  EXPECT_EQ(range("hundred", "98,2,0", DataSplit::kTest), R(0, 0));
  // Python's round: 37 * 0.8 = 29.6 -> 30, 37 * 0.95 = 35.15 -> 35.
  EXPECT_EQ(range("odd", "80,15,5", DataSplit::kTrain), R(0, 30));
  EXPECT_EQ(range("odd", "80,15,5", DataSplit::kValid), R(30, 35));
  EXPECT_EQ(range("odd", "80,15,5", DataSplit::kTest), R(35, 37));
  // Halves round to even: 2.5 -> 2, 7.5 -> 8.
  EXPECT_EQ(range("ten", "25,50,25", DataSplit::kTrain), R(0, 2));
  EXPECT_EQ(range("ten", "25,50,25", DataSplit::kValid), R(2, 8));
  EXPECT_EQ(range("ten", "25,50,25", DataSplit::kTest), R(8, 10));

  auto config = config_for({{prefix("hundred"), {}}}, 4, SamplingMode::kDocument, false);
  config.split = parse_split("98,2,0");
  const DataSampler valid(config, DataSplit::kValid);
  EXPECT_EQ(draw(valid, 0).tokens[0], token_of(0, 98, 0));
  EXPECT_EQ(draw(valid, 1).tokens[0], token_of(0, 99, 0));
  EXPECT_EQ(draw(valid, 2).tokens[0], token_of(0, 98, 0));
  const DataSampler train(config, DataSplit::kTrain);
  for (int i = 0; i < 98; ++i)
    EXPECT_EQ(draw(train, i).tokens[0], token_of(0, i, 0));
  EXPECT_EQ(draw(train, 98).tokens[0], token_of(0, 0, 0));
  const DataSampler test_split(config, DataSplit::kTest);
  EXPECT_TRUE(test_split.empty());
  EXPECT_FALSE(train.empty());
}

// Megatron's build_blending_indices, written out plainly.
std::vector<std::pair<std::size_t, std::int64_t>> blend_reference(std::vector<double> weights,
                                                                  std::int64_t count) {
  const double total = std::accumulate(weights.begin(), weights.end(), 0.0);
  for (double& w : weights)
    w /= total;
  std::vector<std::int64_t> taken(weights.size(), 0);
  std::vector<std::pair<std::size_t, std::int64_t>> out;
  for (std::int64_t i = 0; i < count; ++i) {
    const double x = std::max(static_cast<double>(i), 1.0);
    std::size_t best = 0;
    for (std::size_t s = 1; s < weights.size(); ++s) {
      if (weights[s] * x - static_cast<double>(taken[s]) >
          weights[best] * x - static_cast<double>(taken[best])) {
        best = s;
      }
    }
    out.emplace_back(best, taken[best]++);
  }
  return out;
}

TEST_F(SamplerTest, BlendFollowsMegatronsErrorRuleAndWeights) {
  make_dataset(prefix("a"), 1, 30, varied);
  make_dataset(prefix("b"), 2, 20, varied);
  make_dataset(prefix("c"), 3, 10, varied);
  const auto config =
      config_for(parse_data_path({"0.5 " + prefix("a"), "0.3", prefix("b"), "0.2", prefix("c")}), 8,
                 SamplingMode::kPacked, false);
  const DataSampler blend(config, DataSplit::kTrain);
  const std::int64_t count = 3000;
  const auto expected = blend_reference({0.5, 0.3, 0.2}, count);
  std::vector<std::int64_t> per_source(3, 0);
  for (std::int64_t i = 0; i < count; ++i) {
    ASSERT_EQ(blend.locate(i), expected[static_cast<std::size_t>(i)]) << "sample " << i;
    if (i < 1000) ++per_source[expected[static_cast<std::size_t>(i)].first];
  }
  EXPECT_NEAR(per_source[0], 500, 1);
  EXPECT_NEAR(per_source[1], 300, 1);
  EXPECT_NEAR(per_source[2], 200, 1);

  // Sample i is its dataset's next sample: the same tokens as that dataset read alone.
  std::vector<std::unique_ptr<DataSampler>> alone;
  for (const char* name : {"a", "b", "c"}) {
    alone.push_back(std::make_unique<DataSampler>(
        config_for({{prefix(name), {}}}, 8, SamplingMode::kPacked, false), DataSplit::kTrain));
  }
  for (std::int64_t i : {0L, 1L, 2L, 3L, 10L, 999L, 2999L}) {
    const auto [source, local] = expected[static_cast<std::size_t>(i)];
    EXPECT_EQ(draw(blend, i), draw(*alone[source], local)) << "sample " << i;
    EXPECT_EQ(draw(blend, i).tokens[0] / 1000000, static_cast<int>(source) + 1);
  }
}

TEST_F(SamplerTest, UnweightedBlendFollowsDatasetSizes) {
  make_dataset(prefix("a"), 1, 30, fixed5);
  make_dataset(prefix("b"), 2, 10, fixed5);
  const DataSampler blend(
      config_for(parse_data_path({prefix("a"), prefix("b")}), 4, SamplingMode::kDocument, false),
      DataSplit::kTrain);
  EXPECT_DOUBLE_EQ(blend.sources()[0].weight, 0.75);
  EXPECT_DOUBLE_EQ(blend.sources()[1].weight, 0.25);
  const auto expected = blend_reference({30, 10}, 400);
  for (std::int64_t i = 0; i < 400; ++i) {
    EXPECT_EQ(blend.locate(i), expected[static_cast<std::size_t>(i)]);
  }
}

TEST_F(SamplerTest, SampleIsIndependentOfCallOrderAndThreads) {
  make_dataset(prefix("a"), 1, 40, varied);
  make_dataset(prefix("b"), 2, 25, varied);
  const auto config = config_for(parse_data_path({"0.6", prefix("a"), "0.4", prefix("b")}), 7,
                                 SamplingMode::kPacked, true, 2024);
  const std::int64_t count = 2600;  // several epochs and blend checkpoints
  const DataSampler forward(config, DataSplit::kTrain);
  std::vector<Sample> expected;
  for (std::int64_t i = 0; i < count; ++i)
    expected.push_back(draw(forward, i));

  const DataSampler backward(config, DataSplit::kTrain);
  for (std::int64_t i = count - 1; i >= 0; i -= 3) {
    EXPECT_EQ(draw(backward, i), expected[static_cast<std::size_t>(i)]) << "sample " << i;
  }
  const DataSampler threaded(config, DataSplit::kTrain);
  std::vector<Sample> got(static_cast<std::size_t>(count));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::int64_t i = count - 1 - t; i >= 0; i -= 4) {
        got[static_cast<std::size_t>(i)] = draw(threaded, i);
      }
    });
  }
  for (auto& th : threads)
    th.join();
  EXPECT_TRUE(got == expected);
  EXPECT_EQ(forward.fingerprint(), threaded.fingerprint());
}

TEST_F(SamplerTest, FingerprintFollowsWhatDecidesTheSamples) {
  make_dataset(prefix("a"), 0, 20, varied);
  const auto config = config_for({{prefix("a"), {}}}, 8, SamplingMode::kPacked, true, 1);
  const std::uint64_t base = DataSampler(config, DataSplit::kTrain).fingerprint();
  EXPECT_EQ(DataSampler(config, DataSplit::kTrain).fingerprint(), base);
  auto seed = config;
  seed.seed = 2;
  EXPECT_NE(DataSampler(seed, DataSplit::kTrain).fingerprint(), base);
  auto length = config;
  length.sequence_length = 9;
  EXPECT_NE(DataSampler(length, DataSplit::kTrain).fingerprint(), base);
  make_dataset(prefix("a"), 0, 21, varied);
  EXPECT_NE(DataSampler(config, DataSplit::kTrain).fingerprint(), base);
}

TEST(SamplerBatches, GlobalBatchIsTheSameUnderAnyDataParallelSplit) {
  // Global batch of 4 samples with micro-batches of 2: DP 2 x 1 step, or DP 1 x 2 steps.
  std::set<std::int64_t> dp2, dp1;
  for (int r = 0; r < 2; ++r) {
    const std::int64_t first = micro_batch_first_sample(100, 0, r, 2, 2);
    dp2.insert({first, first + 1});
  }
  for (int m = 0; m < 2; ++m) {
    const std::int64_t first = micro_batch_first_sample(100, m, 0, 1, 2);
    dp1.insert({first, first + 1});
  }
  EXPECT_EQ(dp2, (std::set<std::int64_t>{100, 101, 102, 103}));
  EXPECT_EQ(dp1, dp2);
}

TEST_F(SamplerTest, Errors) {
  make_dataset(prefix("tiny"), 0, 2, fixed5);
  make_dataset(prefix("big"), 0, 100, fixed5);
  make_dataset(prefix("small"), 0, 10, fixed5);
  test::expect_contains(user_error([&] {
                          DataSampler s(
                              config_for({{prefix("big"), {}}}, 0, SamplingMode::kPacked, false),
                              DataSplit::kTrain);
                        }),
                        {"--sequence_length", "0"});
  test::expect_contains(user_error([&] {
                          DataSampler s(
                              config_for({{prefix("tiny"), {}}}, 10, SamplingMode::kPacked, false),
                              DataSplit::kTrain);
                        }),
                        {prefix("tiny"), "10 tokens", "train", "11"});
  auto blend = config_for(parse_data_path({"1", prefix("big"), "1", prefix("small")}), 4,
                          SamplingMode::kDocument, false);
  blend.split = parse_split("98,2,0");
  test::expect_contains(user_error([&] { DataSampler s(blend, DataSplit::kValid); }),
                        {prefix("small"), "no document", "valid"});
  auto vocab = config_for({{prefix("big"), {}}}, 4, SamplingMode::kPacked, false);
  vocab.vocab_size = 50000;
  test::expect_contains(user_error([&] { DataSampler::open_sources(vocab); }),
                        {prefix("big") + ".bin", "document 50", "token id 50000", "50000"});
}

TEST(SamplerParsing, DataPath) {
  auto one = parse_data_path({"/data/corpus"});
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].prefix, "/data/corpus");
  EXPECT_FALSE(one[0].weight.has_value());
  auto two = parse_data_path({"0.7 A 0.3 B"});
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[1].prefix, "B");
  EXPECT_DOUBLE_EQ(*two[0].weight, 0.7);
  EXPECT_DOUBLE_EQ(*two[1].weight, 0.3);
  EXPECT_EQ(parse_data_path({"A", "B"}).size(), 2u);
  test::expect_contains(user_error([] {
                          parse_data_path({"0.7", "A", "B"});
                        }),
                        {"--data_path", "'0.7'"});
  test::expect_contains(user_error([] {
                          parse_data_path({"-1", "A"});
                        }),
                        {"--data_path", "'-1'", ">= 0"});
  test::expect_contains(user_error([] {
                          parse_data_path({"0", "A", "0", "B"});
                        }),
                        {"--data_path", "0"});
  test::expect_contains(user_error([] { parse_data_path({}); }), {"--data_path"});
}

TEST(SamplerParsing, Split) {
  const auto s = parse_split("98,2,0");
  EXPECT_DOUBLE_EQ(s[0], 0.98);
  EXPECT_DOUBLE_EQ(s[1], 0.02);
  EXPECT_DOUBLE_EQ(s[2], 0.0);
  EXPECT_EQ(parse_split("1/1/2"), (std::array<double, 3>{0.25, 0.25, 0.5}));
  EXPECT_EQ(parse_split("100"), (std::array<double, 3>{1, 0, 0}));
  test::expect_contains(user_error([] { parse_split("98,x,0"); }), {"--split", "'x'"});
  test::expect_contains(user_error([] { parse_split("1,2,3,4"); }), {"--split", "three"});
  test::expect_contains(user_error([] { parse_split("0,0,0"); }), {"--split", "0"});
  test::expect_contains(user_error([] { parse_split("-1,2"); }), {"--split", "'-1'"});
  EXPECT_EQ(parse_sampling_mode("packed"), SamplingMode::kPacked);
  EXPECT_EQ(parse_sampling_mode("document"), SamplingMode::kDocument);
  test::expect_contains(user_error([] { parse_sampling_mode("docs"); }),
                        {"'docs'", "packed or document"});
}

}  // namespace
}  // namespace fastllm
