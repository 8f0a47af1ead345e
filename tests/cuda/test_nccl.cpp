// NCCL communicators made from an MPI group, on the CUDA backend's stream. The GPU machine has one
// GPU, so these run as one rank (communicators of size 1); with more ranks and GPUs
// (mpirun -np N) they check the sums across ranks too.
#include <gtest/gtest.h>

#include <numeric>

#include "cuda_test_util.h"
#include "parallel/mpi_session.h"
#include "parallel/nccl_communicator.h"

namespace fastllm::test {
namespace {

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << kNoDevice;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    backend_ = make_cuda_backend(DType::BF16);
    comm_ = make_nccl_communicator(MPI_COMM_WORLD, *backend_);
  }
  Backend& be() { return *backend_; }
  Communicator& comm() { return *comm_; }
  Tensor upload(const std::vector<float>& v, DType dtype) {
    const auto n = static_cast<std::int64_t>(v.size());
    buffers_.push_back(be().allocate(v.size() * 4));
    Tensor staging = buffers_.back().tensor(DType::F32, {n});
    be().copy_from_host(staging, v.data());
    if (dtype == DType::F32) return staging;
    buffers_.push_back(be().allocate(v.size() * 2));
    Tensor t = buffers_.back().tensor(dtype, {n});
    be().copy(t, staging);
    return t;
  }
  std::vector<float> download(Tensor t) {
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    if (t.dtype == DType::F32) {
      be().copy_to_host(out.data(), t);
      return out;
    }
    buffers_.push_back(be().allocate(out.size() * 4));
    Tensor staging = buffers_.back().tensor(DType::F32, {t.numel()});
    be().copy(staging, t);
    be().copy_to_host(out.data(), staging);
    return out;
  }

  int rank_ = 0;
  int size_ = 1;

 private:
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Communicator> comm_;
  std::vector<Buffer> buffers_;
};

TEST_F(Nccl, RankAndSizeFollowTheMpiGroup) {
  EXPECT_EQ(comm().rank(), rank_);
  EXPECT_EQ(comm().size(), size_);
}

TEST_F(Nccl, AllReduceSumsAndMaximaInEachDtype) {
  // Small integers: exact in bf16 too.
  const std::vector<float> mine = {1.0f + static_cast<float>(rank_), -2.0f, 3.0f, 0.5f};
  for (DType dtype : {DType::F32, DType::BF16}) {
    Tensor t = upload(mine, dtype);
    comm().all_reduce(t, ReduceOp::Sum);
    const float ranks = static_cast<float>(size_);
    const float rank_sum = ranks * (ranks - 1) / 2;
    EXPECT_EQ(download(t),
              (std::vector<float>{ranks + rank_sum, -2 * ranks, 3 * ranks, 0.5f * ranks}))
        << dtype_name(dtype);
    Tensor m = upload(mine, dtype);
    comm().all_reduce(m, ReduceOp::Max);
    EXPECT_EQ(download(m), (std::vector<float>{ranks, -2.0f, 3.0f, 0.5f})) << dtype_name(dtype);
  }
}

TEST_F(Nccl, ReduceScatterAllGatherAndBroadcast) {
  const std::int64_t block = 5;
  std::vector<float> in(static_cast<std::size_t>(block * size_));
  std::iota(in.begin(), in.end(), 1.0f);
  Tensor whole = upload(in, DType::F32);
  Tensor part = upload(std::vector<float>(block, -1.0f), DType::F32);
  comm().reduce_scatter(whole, part, ReduceOp::Sum);
  std::vector<float> want(in.begin() + rank_ * block, in.begin() + (rank_ + 1) * block);
  for (auto& w : want)
    w *= static_cast<float>(size_);
  EXPECT_EQ(download(part), want);

  Tensor gathered = upload(std::vector<float>(in.size(), 0.0f), DType::F32);
  comm().all_gather(upload(std::vector<float>(block, static_cast<float>(rank_)), DType::F32),
                    gathered);
  std::vector<float> gathered_want;
  for (int r = 0; r < size_; ++r)
    gathered_want.insert(gathered_want.end(), block, static_cast<float>(r));
  EXPECT_EQ(download(gathered), gathered_want);

  Tensor b = upload(std::vector<float>(3, static_cast<float>(rank_ + 7)), DType::F32);
  comm().broadcast(b, 0);
  EXPECT_EQ(download(b), std::vector<float>(3, 7.0f));
}

TEST_F(Nccl, SendRecvExchangesWithNeighbours) {
  // A ring: each rank sends to the next and receives from the previous (itself when alone).
  const int next = (rank_ + 1) % size_;
  const int previous = (rank_ + size_ - 1) % size_;
  Tensor out = upload(std::vector<float>(4, static_cast<float>(rank_)), DType::F32);
  Tensor in = upload(std::vector<float>(4, -1.0f), DType::F32);
  comm().send_recv(out, next, in, previous);
  EXPECT_EQ(download(in), std::vector<float>(4, static_cast<float>(previous)));
}

TEST_F(Nccl, MismatchedBlocksAreRejected) {
  Tensor whole =
      upload(std::vector<float>(static_cast<std::size_t>(3 * size_ + 1), 0.0f), DType::F32);
  Tensor part = upload(std::vector<float>(3, 0.0f), DType::F32);
  EXPECT_THROW(comm().reduce_scatter(whole, part, ReduceOp::Sum), std::invalid_argument);
}

}  // namespace
}  // namespace fastllm::test

int main(int argc, char** argv) {
  fastllm::MpiSession mpi;
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
