#pragma once
// Ranges of a flat buffer seen as one concatenated sequence, so that one kernel can sweep many
// parameters (the fused optimizer, the multi-tensor gradient norm): each block takes an equal
// span of the concatenation and finds where it starts by a binary search over the ranges. Plain
// C++ usable from device code, so that the host tests check the same walk the GPU does.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/backend.h"

#if defined(__CUDACC__)
#define FASTLLM_HOST_DEVICE __host__ __device__
#else
#define FASTLLM_HOST_DEVICE
#endif

namespace fastllm {

// A non-empty range and where it starts in the concatenation; for AdamW's ranges, the weight
// decay and the factor 1 - lr * weight_decay the optimizer forms from it.
struct RangeRun {
  std::int64_t begin = 0;
  std::int64_t count = 0;
  std::int64_t start = 0;
  float weight_decay = 0;
  float decay = 1;
};

struct RangeRuns {
  std::vector<RangeRun> runs;
  std::int64_t total = 0;
};

namespace detail {
template <class Range>
RangeRuns concatenate(const std::vector<Range>& ranges, std::int64_t n, const char* op,
                      float (*decay)(const Range&)) {
  RangeRuns out;
  for (const Range& r : ranges) {
    if (r.begin < 0 || r.count < 0 || r.begin + r.count > n)
      throw std::invalid_argument(std::string(op) + ": range [" + std::to_string(r.begin) + ", " +
                                  std::to_string(r.begin + r.count) + ") outside the buffer of " +
                                  std::to_string(n) + " elements");
    if (r.count == 0) continue;
    out.runs.push_back({r.begin, r.count, out.total, decay(r), 1.0f});
    out.total += r.count;
  }
  return out;
}
}  // namespace detail

// The non-empty ranges in order with their starts; throws invalid_argument naming op for a range
// outside [0, n).
inline RangeRuns concatenate(const std::vector<FlatRange>& ranges, std::int64_t n, const char* op) {
  return detail::concatenate<FlatRange>(ranges, n, op, [](const FlatRange&) { return 0.0f; });
}
inline RangeRuns concatenate(const std::vector<AdamWRange>& ranges, std::int64_t n,
                             const char* op) {
  return detail::concatenate<AdamWRange>(ranges, n, op,
                                         [](const AdamWRange& r) { return r.weight_decay; });
}

// The span of the concatenation each of `blocks` blocks takes (the last may take less).
inline std::int64_t span_per_block(std::int64_t total, std::int64_t blocks) {
  return blocks <= 0 ? total : (total + blocks - 1) / blocks;
}

// The last run starting at or before position (runs sorted by start, count >= 1).
FASTLLM_HOST_DEVICE inline int run_at(const RangeRun* runs, int count, std::int64_t position) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (runs[mid].start <= position) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Calls f(run, element) for the elements of the concatenation's positions [lo, hi) that lane
// `lane` of `lanes` takes (positions lane, lane + lanes, ... of each run's part), element being
// the index in the flat buffer.
template <class F>
FASTLLM_HOST_DEVICE void walk_span(const RangeRun* runs, int count, std::int64_t lo,
                                   std::int64_t hi, std::int64_t lane, std::int64_t lanes, F&& f) {
  if (count == 0 || lo >= hi) return;
  for (int i = run_at(runs, count, lo); i < count && runs[i].start < hi; ++i) {
    const RangeRun& r = runs[i];
    const std::int64_t from = lo > r.start ? lo : r.start;
    const std::int64_t end = r.start + r.count;
    const std::int64_t to = hi < end ? hi : end;
    for (std::int64_t p = from + lane; p < to; p += lanes)
      f(r, r.begin + (p - r.start));
  }
}

}  // namespace fastllm
