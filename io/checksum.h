#pragma once
// The checksums of stored datasets (README.md, "Formats").
//
// A dataset's flat (row-major) index space is cut into chunks of whole rows of its last axis, at
// least kChecksumMinChunk elements each (rank-1 datasets: kChecksumFlatChunk elements). The
// boundaries depend only on the dataset's shape, so a checkpoint written under one parallel layout
// is verified by readers of any other. The checksum of a chunk is
//
//   sum over its elements i (mod 2^64) of  splitmix64_mix((i + 1) * kChecksumGolden + bits(x_i))
//
// with i the flat index in the whole dataset and bits(x_i) the element's little-endian bytes
// zero-extended to 64 bits. Summing makes the checksum of a chunk the sum of the parts that the
// ranks wrote (one MPI_SUM reduction, whatever the slabs), and the position in the mix makes a
// moved or swapped element count. A single changed element always changes the sum, since the mix
// is a bijection. For all-zero data the terms are the outputs of the SplitMix64 generator seeded
// with 0 (Steele, Lea and Flood 2014), which is what the test of this header checks against.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastllm {

inline constexpr std::uint64_t kChecksumGolden = 0x9E3779B97F4A7C15ull;
inline constexpr std::int64_t kChecksumMinChunk = 64;
inline constexpr std::int64_t kChecksumFlatChunk = 4096;

// SplitMix64's output function.
inline std::uint64_t splitmix64_mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Elements per checksum chunk of a dataset of this shape.
inline std::int64_t checksum_chunk_elements(const std::vector<std::int64_t>& shape) {
  if (shape.size() < 2) return kChecksumFlatChunk;
  const std::int64_t cols = shape.back() > 0 ? shape.back() : 1;
  return (kChecksumMinChunk + cols - 1) / cols * cols;
}

// Adds the terms of `count` consecutive elements of `element_size` bytes, the first at flat index
// `first`, to sums[chunk - first_chunk] of the chunks they fall in.
inline void add_checksum_terms(std::uint64_t* sums, std::int64_t first_chunk,
                               std::int64_t chunk_elements, std::int64_t first, std::int64_t count,
                               const void* data, std::size_t element_size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::int64_t i = 0; i < count;) {
    const std::int64_t chunk = (first + i) / chunk_elements;
    const std::int64_t end = std::min(count, (chunk + 1) * chunk_elements - first);
    std::uint64_t sum = 0;
    for (; i < end; ++i) {
      std::uint64_t bits = 0;
      std::memcpy(&bits, bytes + static_cast<std::size_t>(i) * element_size, element_size);
      sum += splitmix64_mix(static_cast<std::uint64_t>(first + i + 1) * kChecksumGolden + bits);
    }
    sums[chunk - first_chunk] += sum;
  }
}

}  // namespace fastllm
