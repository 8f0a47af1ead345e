#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends.h"

namespace fastllm::test {
namespace {

class MemoryTest : public BackendTest {};

// bf16 bit patterns of float values, worked out by hand: the upper 16 bits, rounded to nearest
// with ties to the even pattern.
struct Bf16Case {
  std::uint32_t f32_bits;
  std::uint16_t bf16_bits;
};
constexpr Bf16Case kBf16Cases[] = {
    {0x3F800000u, 0x3F80},                         // 1.0 exactly
    {0x3F808000u, 0x3F80},                         // tie, 0x3F80 is even: down
    {0x3F818000u, 0x3F82},                         // tie, 0x3F81 is odd: up
    {0x3F808001u, 0x3F81},                         // just above the tie: up
    {0x3F807FFFu, 0x3F80},                         // just below the tie: down
    {0xC0490FDBu, 0xC049},                         // -pi
    {0x7F7FFFFFu, 0x7F80},                         // FLT_MAX rounds to +inf
    {0x00000000u, 0x0000}, {0x80000000u, 0x8000},  // -0
};

TEST_P(MemoryTest, AllocationsAreAlignedWritableAndSized) {
  for (std::size_t bytes : {0, 1, 63, 64, 65, 1000, 1 << 20}) {
    Buffer b = be().allocate(bytes);
    EXPECT_EQ(b.bytes(), bytes);
    ASSERT_NE(b.data(), nullptr);
    if (be().name() == "host") {
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 64, 0u) << bytes;
      std::memset(b.data(), 0xAB, bytes);
    }
  }
}

TEST_P(MemoryTest, HostRoundTripKeepsEveryBit) {
  std::vector<float> values = random_vector(1001, 1);
  values[3] = std::numeric_limits<float>::quiet_NaN();
  values[4] = -std::numeric_limits<float>::infinity();
  values[5] = std::numeric_limits<float>::denorm_min();
  Tensor t = upload(values, {7, 143});
  std::vector<float> back = download(t);
  ASSERT_EQ(std::memcmp(back.data(), values.data(), values.size() * sizeof(float)), 0);

  std::vector<std::int32_t> ids = {0, -1, 7, std::numeric_limits<std::int32_t>::max(), 42};
  EXPECT_EQ(download_ints(upload_ints(ids, {5})), ids);
}

TEST_P(MemoryTest, CopySameDtype) {
  std::vector<float> values = random_vector(45 * 7, 2);
  Tensor src = upload(values, {7, 45});
  Tensor dst = zeros({7, 45});
  be().copy(dst, src);
  EXPECT_EQ(download(dst), values);
}

TEST_P(MemoryTest, CopyToBf16RoundsToNearestEven) {
  std::vector<float> values;
  for (const auto& c : kBf16Cases) {
    float f;
    std::memcpy(&f, &c.f32_bits, sizeof f);
    values.push_back(f);
  }
  const auto n = static_cast<std::int64_t>(values.size());
  Tensor src = upload(values, {n});
  Tensor half = zeros({n}, DType::BF16);
  be().copy(half, src);
  std::vector<std::uint16_t> bits(values.size());
  be().copy_to_host(bits.data(), half);
  for (std::size_t i = 0; i < values.size(); ++i)
    EXPECT_EQ(bits[i], kBf16Cases[i].bf16_bits) << "case " << i;

  // And back: bf16 -> f32 is exact, the pattern shifted into the upper half.
  Tensor wide = zeros({n});
  be().copy(wide, half);
  std::vector<float> back = download(wide);
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::uint32_t got;
    std::memcpy(&got, &back[i], sizeof got);
    EXPECT_EQ(got, static_cast<std::uint32_t>(kBf16Cases[i].bf16_bits) << 16) << "case " << i;
  }
}

TEST_P(MemoryTest, Bf16RoundTripOfManyValuesIsWithinHalfAnUlp) {
  const std::vector<float> values = random_vector(100003, 3, 10.0f);
  const auto n = static_cast<std::int64_t>(values.size());
  Tensor half = zeros({n}, DType::BF16);
  be().copy(half, upload(values, {n}));
  Tensor wide = zeros({n});
  be().copy(wide, half);
  std::vector<float> back = download(wide);
  for (std::size_t i = 0; i < values.size(); ++i) {
    // bf16 keeps 8 significant bits: an ulp of x is 2^(ilogb(x) - 7).
    const double half_ulp = std::ldexp(1.0, std::ilogb(values[i]) - 8);
    ASSERT_LE(std::fabs(static_cast<double>(back[i]) - values[i]), half_ulp) << i;
  }
}

TEST_P(MemoryTest, FillEveryDtype) {
  Tensor f = zeros({3, 37});
  be().fill(f, -2.5f);
  for (float v : download(f))
    ASSERT_EQ(v, -2.5f);

  Tensor big = zeros({100000});
  be().fill(big, 0.25f);
  for (float v : download(big))
    ASSERT_EQ(v, 0.25f);

  Tensor ints = zeros({11}, DType::I32);
  be().fill(ints, 7.0f);
  for (std::int32_t v : download_ints(ints))
    ASSERT_EQ(v, 7);

  Tensor half = zeros({9}, DType::BF16);
  be().fill(half, 1.0f);
  std::vector<std::uint16_t> bits(9);
  be().copy_to_host(bits.data(), half);
  for (std::uint16_t v : bits)
    ASSERT_EQ(v, 0x3F80);
}

TEST_P(MemoryTest, CopyRejectsMismatchedTensors) {
  Tensor a = zeros({4, 5});
  Tensor b = zeros({21});
  EXPECT_THROW(be().copy(a, b), std::invalid_argument);
  Tensor ints = zeros({20}, DType::I32);
  EXPECT_THROW(be().copy(a, ints), std::invalid_argument);
}

FASTLLM_INSTANTIATE_BACKENDS(MemoryTest);

TEST(Dtypes, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::F32), 4u);
  EXPECT_EQ(dtype_size(DType::I32), 4u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::F16), 2u);
  EXPECT_STREQ(dtype_name(DType::F32), "f32");
  EXPECT_STREQ(dtype_name(DType::BF16), "bf16");
  EXPECT_STREQ(dtype_name(DType::I32), "i32");
  EXPECT_STREQ(dtype_name(DType::F16), "f16");
  std::uint16_t storage[6] = {};
  EXPECT_EQ(Tensor(storage, DType::F16, {2, 3}).bytes(), 12u);
}

// f16 is an input dtype of cuDNN's attention on CUDA only: the host backend, which computes in
// f32, refuses it wherever it would have to read or write it as numbers, with the op and the
// dtype in the message.
TEST(Dtypes, HostBackendRejectsF16) {
  HostBackend host;
  std::vector<float> f32(12, 1.0f);
  std::vector<std::uint16_t> f16(12, 0x3C00);  // 1.0 in f16
  const Tensor a(f32.data(), DType::F32, {3, 4});
  const Tensor h(f16.data(), DType::F16, {3, 4});
  const auto message = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message([&] { host.copy(a, h); }), "HostBackend::copy: cannot convert f16 to f32");
  EXPECT_EQ(message([&] { host.copy(h, a); }), "HostBackend::copy: cannot convert f32 to f16");
  EXPECT_EQ(message([&] { host.fill(h, 0.0f); }),
            "HostBackend::fill: t is f16, which the host backend has no op for");
  EXPECT_EQ(message([&] { host.gemm(false, false, 3, 4, 4, 1.0f, h, h, 0.0f, a); }),
            "HostBackend::gemm: a is f16, expected f32");
  EXPECT_EQ(message([&] { host.add(a, h, 1.0f); }), "HostBackend::add: x is f16, expected f32");
  std::vector<float> lse(3);
  const Tensor q(f16.data(), DType::F16, {1, 3, 1, 4});
  const std::string attention = message([&] {
    host.attention_forward(q, q, q, 0, q, Tensor(lse.data(), DType::F32, {1, 1, 3}));
  });
  EXPECT_NE(attention.find("attention_forward"), std::string::npos) << attention;
  EXPECT_NE(attention.find("f16"), std::string::npos) << attention;
  EXPECT_EQ(f32, std::vector<float>(12, 1.0f));  // nothing written
}

}  // namespace
}  // namespace fastllm::test
