#pragma once
// Expected values for the HDF5 tests, made by plain loops that know nothing of HDF5.
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace fastllm::test {

// A fresh directory, removed with everything in it at the end of the scope.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    std::random_device entropy;
    path_ = std::filesystem::temp_directory_path() /
            ("fastllm_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(entropy()));
    std::filesystem::create_directories(path_);
  }
  // Adopts a directory made by another rank; only the owner removes it.
  explicit TempDir(std::filesystem::path path, bool owner)
      : path_(std::move(path)), owner_(owner) {}
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    if (owner_) std::filesystem::remove_all(path_, ignored);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  bool owner_ = true;
};

inline std::int64_t numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape)
    n *= d;
  return n;
}

// Element i of each test dataset. The float ones include values whose bits a conversion would
// change: NaN with a payload, -0, infinities, subnormals.
inline float f32_value(std::int64_t i) {
  switch (i % 11) {
    case 3:
      return std::bit_cast<float>(std::uint32_t{0x7fc12345});
    case 5:
      return -0.0f;
    case 7:
      return i % 2 ? std::numeric_limits<float>::infinity()
                   : -std::numeric_limits<float>::infinity();
    case 9:
      return std::numeric_limits<float>::denorm_min() * static_cast<float>(i + 1);
    default:
      return static_cast<float>(i) * 0.37f - 3.0f;
  }
}
inline double f64_value(std::int64_t i) {
  return i % 4 == 1 ? std::bit_cast<double>(std::uint64_t{0x7ff8000000abcdef})
                    : std::ldexp(static_cast<double>(i) + 0.1, static_cast<int>(i % 40) - 20);
}
inline std::int64_t i64_value(std::int64_t i) {
  return (i % 2 ? -1 : 1) * (std::int64_t{1} << (40 + i % 20)) + i;
}
inline std::int32_t i32_value(std::int64_t i) {
  return static_cast<std::int32_t>((i % 3 == 0 ? -1 : 1) * (1000003 * i % 2147483629));
}
inline std::uint16_t bf16_value(std::int64_t i) {
  return static_cast<std::uint16_t>((0xffff - 7919 * i) & 0xffff);
}

template <class T, class F>
std::vector<T> make_values(std::int64_t n, F value) {
  std::vector<T> values(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    values[static_cast<std::size_t>(i)] = value(i);
  return values;
}

// The hyperslab [offset, offset + count) of a dense row-major array of the given shape.
template <class T>
std::vector<T> extract(const std::vector<T>& global, const std::vector<std::int64_t>& shape,
                       const std::vector<std::int64_t>& offset,
                       const std::vector<std::int64_t>& count) {
  std::vector<T> out;
  const std::int64_t total = numel(count);
  std::vector<std::int64_t> index(count.size(), 0);
  for (std::int64_t n = 0; n < total; ++n) {
    std::int64_t linear = 0;
    for (std::size_t axis = 0; axis < shape.size(); ++axis) {
      linear = linear * shape[axis] + offset[axis] + index[axis];
    }
    out.push_back(global[static_cast<std::size_t>(linear)]);
    for (std::size_t axis = count.size(); axis-- > 0;) {
      if (++index[axis] < count[axis]) break;
      index[axis] = 0;
    }
  }
  return out;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace fastllm::test
