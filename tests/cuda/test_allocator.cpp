// The caching allocator behind CudaBackend::allocate: blocks come back for reuse, the statistics
// count what is live, and reuse never lets a later op see an earlier op's data out of order.
#include <cstring>

#include "cuda_test_util.h"

namespace fastllm::test {
namespace {

class CudaAllocator : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
    backend_ = make_cuda_backend(DType::BF16);
  }
  Backend& be() { return *backend_; }

 private:
  std::unique_ptr<Backend> backend_;
};

TEST_F(CudaAllocator, ReleasedBlocksAreReusedForTheSameSize) {
  void* first = nullptr;
  {
    Buffer b = be().allocate(1000);
    first = b.data();
    EXPECT_EQ(b.bytes(), 1000u);
  }
  Buffer again = be().allocate(1000);
  EXPECT_EQ(again.data(), first);
  // A block far larger than asked for is not handed out for a small request.
  Buffer large = be().allocate(std::size_t{64} << 20);
  large = Buffer();
  Buffer small = be().allocate(4096);
  EXPECT_NE(small.data(), nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(small.data()) % 256, 0u);
}

TEST_F(CudaAllocator, StatisticsCountLiveAndPeakBytes) {
  const CudaMemoryStats before = cuda_memory_stats(be());
  {
    Buffer a = be().allocate(std::size_t{10} << 20);
    Buffer b = be().allocate(std::size_t{6} << 20);
    const CudaMemoryStats during = cuda_memory_stats(be());
    EXPECT_GE(during.in_use, before.in_use + (std::size_t{16} << 20));
    EXPECT_GE(during.peak, during.in_use);
  }
  const CudaMemoryStats after = cuda_memory_stats(be());
  EXPECT_EQ(after.in_use, before.in_use);
  EXPECT_GE(after.cached, std::size_t{16} << 20);
}

TEST_F(CudaAllocator, ReuseKeepsStreamOrder) {
  // A block freed while a copy still reads it and reused by the next op: the copy sees the old
  // values, the new owner its own.
  const std::int64_t n = 1 << 22;
  Buffer keep = be().allocate(static_cast<std::size_t>(n) * 4);
  Tensor out = keep.tensor(DType::F32, {n});
  void* reused = nullptr;
  {
    Buffer temp = be().allocate(static_cast<std::size_t>(n) * 4);
    Tensor t = temp.tensor(DType::F32, {n});
    be().fill(t, 3.0f);
    be().copy(out, t);
    reused = temp.data();
  }
  Buffer next = be().allocate(static_cast<std::size_t>(n) * 4);
  ASSERT_EQ(next.data(), reused);
  be().fill(next.tensor(DType::F32, {n}), -1.0f);
  std::vector<float> host(static_cast<std::size_t>(n));
  be().copy_to_host(host.data(), out);
  for (float v : host)
    ASSERT_EQ(v, 3.0f);
}

TEST_F(CudaAllocator, ExhaustionIsAnErrorNotACrash) {
  EXPECT_THROW(be().allocate(std::size_t{1} << 50), std::runtime_error);
  Buffer fine = be().allocate(1 << 20);
  EXPECT_NE(fine.data(), nullptr);
}

}  // namespace
}  // namespace fastllm::test
