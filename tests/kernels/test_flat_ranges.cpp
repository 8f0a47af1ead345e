// The host-side logic the CUDA backend's multi-range kernels and caches rest on: the bounded LRU
// cache (GEMM plans, attention graphs) and the walk that splits ranges' concatenation over blocks.
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/flat_ranges.h"
#include "kernels/lru_cache.h"

namespace fastllm::test {
namespace {

TEST(LruCache, EvictsTheLeastRecentlyUsed) {
  LruCache<int, std::string> cache(2);
  cache.insert(1, "one");
  cache.insert(2, "two");
  ASSERT_NE(cache.find(1), nullptr);  // 1 is now more recent than 2
  cache.insert(3, "three");
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.evictions(), 1u);
  EXPECT_EQ(cache.find(2), nullptr);
  ASSERT_NE(cache.find(1), nullptr);
  EXPECT_EQ(*cache.find(1), "one");
  EXPECT_EQ(*cache.find(3), "three");
}

TEST(LruCache, ReplacesAKeyWithoutEvicting) {
  LruCache<int, std::unique_ptr<int>> cache(2);
  cache.insert(1, std::make_unique<int>(10));
  cache.insert(2, std::make_unique<int>(20));
  cache.insert(1, std::make_unique<int>(11));
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.evictions(), 0u);
  EXPECT_EQ(**cache.find(1), 11);
  EXPECT_EQ(**cache.find(2), 20);
}

TEST(LruCache, StaysBoundedUnderChangingKeys) {
  // As the GEMM plans under MoE: a new row count every step.
  LruCache<std::tuple<int, long>, int> cache(8);
  for (long rows = 0; rows < 1000; ++rows) {
    if (!cache.find({0, rows})) cache.insert({0, rows}, static_cast<int>(rows));
    ASSERT_LE(cache.size(), 8u);
  }
  EXPECT_EQ(cache.evictions(), 992u);
  EXPECT_EQ(*cache.find({0, 999L}), 999);
  EXPECT_THROW((LruCache<int, int>(0)), std::invalid_argument);
}

TEST(FlatRanges, ConcatenationSkipsEmptyRangesAndChecksBounds) {
  const RangeRuns runs =
      concatenate(std::vector<AdamWRange>{{5, 3, 0.1f}, {8, 0, 0.0f}, {20, 4, 0.0f}}, 30, "op");
  ASSERT_EQ(runs.runs.size(), 2u);
  EXPECT_EQ(runs.total, 7);
  EXPECT_EQ(runs.runs[1].begin, 20);
  EXPECT_EQ(runs.runs[1].start, 3);
  EXPECT_EQ(runs.runs[0].weight_decay, 0.1f);
  EXPECT_THROW(concatenate(std::vector<FlatRange>{{28, 3}}, 30, "op"), std::invalid_argument);
  EXPECT_THROW(concatenate(std::vector<FlatRange>{{-1, 1}}, 30, "op"), std::invalid_argument);
}

// Every element of every range visited exactly once, for block and lane counts that split runs
// anywhere, as the kernels walk them.
TEST(FlatRanges, BlocksAndLanesVisitEveryElementOnce) {
  const std::vector<FlatRange> ranges{{0, 1}, {3, 17}, {20, 0}, {25, 64}, {90, 5}, {200, 33}};
  const RangeRuns runs = concatenate(ranges, 240, "op");
  for (std::int64_t blocks : {1, 2, 3, 7, 50, 120, 500}) {
    for (std::int64_t lanes : {1, 4, 32}) {
      std::vector<int> visits(240, 0);
      const std::int64_t span = span_per_block(runs.total, blocks);
      for (std::int64_t b = 0; b * span < runs.total; ++b) {
        const std::int64_t lo = b * span;
        const std::int64_t hi = std::min(lo + span, runs.total);
        for (std::int64_t lane = 0; lane < lanes; ++lane)
          walk_span(
              runs.runs.data(), static_cast<int>(runs.runs.size()), lo, hi, lane, lanes,
              [&](const RangeRun&, std::int64_t i) { ++visits[static_cast<std::size_t>(i)]; });
      }
      for (std::int64_t i = 0; i < 240; ++i) {
        bool inside = false;
        for (const FlatRange& r : ranges)
          inside = inside || (i >= r.begin && i < r.begin + r.count);
        ASSERT_EQ(visits[static_cast<std::size_t>(i)], inside ? 1 : 0)
            << "element " << i << " blocks " << blocks << " lanes " << lanes;
      }
    }
  }
}

TEST(FlatRanges, RunAtFindsTheRunHoldingAPosition) {
  const RangeRuns runs = concatenate(std::vector<FlatRange>{{0, 4}, {10, 1}, {20, 5}}, 30, "op");
  const int n = static_cast<int>(runs.runs.size());
  EXPECT_EQ(run_at(runs.runs.data(), n, 0), 0);
  EXPECT_EQ(run_at(runs.runs.data(), n, 3), 0);
  EXPECT_EQ(run_at(runs.runs.data(), n, 4), 1);
  EXPECT_EQ(run_at(runs.runs.data(), n, 5), 2);
  EXPECT_EQ(run_at(runs.runs.data(), n, 9), 2);
}

}  // namespace
}  // namespace fastllm::test
