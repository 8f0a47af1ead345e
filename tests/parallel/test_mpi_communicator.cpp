// MpiCommunicator on 3 ranks (mpiexec): each collective against values every rank can compute
// from the rank numbers alone.
#include <gtest/gtest.h>
#include <mpi.h>

#include <numeric>
#include <vector>

#include "io/half.h"
#include "parallel/mpi_communicator.h"

namespace fastllm::test {
namespace {

Tensor f32(std::vector<float>& v) {
  return Tensor(v.data(), DType::F32, {static_cast<std::int64_t>(v.size())});
}

class MpiCommunicatorTest : public ::testing::Test {
 protected:
  MpiCommunicator world_{MPI_COMM_WORLD};
  int rank_ = world_.rank(), size_ = world_.size();
};

TEST_F(MpiCommunicatorTest, AllReduceSumAndMax) {
  std::vector<float> v{1.0f * rank_, 10.0f - rank_, 0.5f};
  world_.all_reduce(f32(v), ReduceOp::Sum);
  const float ranks = static_cast<float>(size_ * (size_ - 1) / 2);
  EXPECT_EQ(v, (std::vector<float>{ranks, 10.0f * size_ - ranks, 0.5f * size_}));
  std::vector<float> m{1.0f * rank_, -1.0f * rank_};
  world_.all_reduce(f32(m), ReduceOp::Max);
  EXPECT_EQ(m, (std::vector<float>{size_ - 1.0f, 0.0f}));
  std::vector<std::int32_t> i{rank_ + 1};
  world_.all_reduce(Tensor(i.data(), DType::I32, {1}), ReduceOp::Sum);
  EXPECT_EQ(i[0], size_ * (size_ + 1) / 2);
}

TEST_F(MpiCommunicatorTest, AllReduceBf16InFloat) {
  // 1 + 2^-8 on every rank: bf16 cannot hold the partial sums' low bits, the F32 sum can.
  std::vector<std::uint16_t> v{f32_to_bf16(1.0f + 1.0f / 128), f32_to_bf16(-2.0f)};
  world_.all_reduce(Tensor(v.data(), DType::BF16, {2}), ReduceOp::Sum);
  EXPECT_EQ(bf16_to_f32(v[0]), bf16_to_f32(f32_to_bf16(size_ * (1.0f + 1.0f / 128))));
  EXPECT_EQ(bf16_to_f32(v[1]), -2.0f * size_);
}

TEST_F(MpiCommunicatorTest, ReduceScatterGivesEachRankItsBlock) {
  const int block = 4;
  std::vector<float> in(static_cast<std::size_t>(block * size_)), out(block);
  for (int r = 0; r < size_; ++r)
    for (int j = 0; j < block; ++j)
      in[r * block + j] = 100.0f * r + j + rank_;
  world_.reduce_scatter(f32(in), f32(out), ReduceOp::Sum);
  const float ranks = static_cast<float>(size_ * (size_ - 1) / 2);
  for (int j = 0; j < block; ++j)
    EXPECT_EQ(out[j], size_ * (100.0f * rank_ + j) + ranks);
}

TEST_F(MpiCommunicatorTest, ReduceOntoEachRoot) {
  const float ranks = static_cast<float>(size_ * (size_ - 1) / 2);
  for (int root = 0; root < size_; ++root) {
    std::vector<float> v{1.0f * rank_, 3.0f};
    world_.reduce(f32(v), root, ReduceOp::Sum);
    if (rank_ == root) {
      EXPECT_EQ(v, (std::vector<float>{ranks, 3.0f * size_}));
    } else {
      EXPECT_EQ(v, (std::vector<float>{1.0f * rank_, 3.0f}));
    }
  }
}

TEST_F(MpiCommunicatorTest, AllGatherAlsoInPlace) {
  std::vector<float> in{1.0f * rank_, 2.0f * rank_}, out(2 * size_);
  world_.all_gather(f32(in), f32(out));
  for (int r = 0; r < size_; ++r) {
    EXPECT_EQ(out[2 * r], 1.0f * r);
    EXPECT_EQ(out[2 * r + 1], 2.0f * r);
  }
  std::vector<float> shared(2 * size_, -1.0f);
  shared[2 * rank_] = 3.0f * rank_;
  shared[2 * rank_ + 1] = 4.0f * rank_;
  const Tensor all = f32(shared);
  world_.all_gather(all.rows(2 * rank_, 2), all);
  for (int r = 0; r < size_; ++r) {
    EXPECT_EQ(shared[2 * r], 3.0f * r);
    EXPECT_EQ(shared[2 * r + 1], 4.0f * r);
  }
}

TEST_F(MpiCommunicatorTest, BroadcastFromRoot) {
  std::vector<float> v{1.0f * rank_, 7.0f};
  world_.broadcast(f32(v), size_ - 1);
  EXPECT_EQ(v, (std::vector<float>{size_ - 1.0f, 7.0f}));
}

TEST_F(MpiCommunicatorTest, PointToPointAroundARing) {
  const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
  // Even ranks send first, odd ones receive first: plain send/recv cannot deadlock.
  std::vector<float> out{1.0f * rank_}, in{-1.0f};
  if (rank_ % 2 == 0) {
    world_.send(f32(out), next);
    if (size_ % 2 == 0 || rank_ != 0) world_.recv(f32(in), prev);
  } else {
    world_.recv(f32(in), prev);
    world_.send(f32(out), next);
  }
  if (size_ % 2 == 1 && rank_ == 0) world_.recv(f32(in), prev);
  EXPECT_EQ(in[0], 1.0f * prev);
  // send_recv of different sizes: everybody at once.
  std::vector<float> big(1000, 1.0f * rank_), small(3, -1.0f);
  std::vector<float> got_big(1000), got_small(3);
  world_.send_recv(f32(big), next, f32(got_big), prev);
  world_.send_recv(f32(small), prev, f32(got_small), next);
  EXPECT_EQ(got_big, std::vector<float>(1000, 1.0f * prev));
  EXPECT_EQ(got_small, std::vector<float>(3, -1.0f));
}

}  // namespace
}  // namespace fastllm::test

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int failed = RUN_ALL_TESTS();
  int any = failed;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
