#include "parallel/nccl_communicator.h"

#include <string>

#include "io/error.h"
// This file is globbed into fastllm_core in every build; NCCL exists only in CUDA builds.
#if FASTLLM_HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>

#include <stdexcept>

#include "kernels/cuda/cuda_backend.h"
#endif

namespace fastllm {

#if FASTLLM_HAVE_CUDA
namespace {

void check(ncclResult_t result, const char* what) {
  if (result != ncclSuccess)
    throw std::runtime_error(std::string("NCCL ") + what +
                             " failed: " + ncclGetErrorString(result));
}

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) throw std::runtime_error(std::string("MPI ") + what + " failed");
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return ncclFloat32;
    case DType::BF16:
      return ncclBfloat16;
    case DType::I32:
      return ncclInt32;
  }
  throw std::invalid_argument("NcclCommunicator: unknown dtype");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  return op == ReduceOp::Max ? ncclMax : ncclSum;
}

std::size_t count(const Tensor& t) {
  return static_cast<std::size_t>(t.numel());
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MPI_Comm group, Backend& backend)
      : stream_(static_cast<cudaStream_t>(cuda_stream(backend))) {
    check_mpi(MPI_Comm_rank(group, &rank_), "Comm_rank");
    check_mpi(MPI_Comm_size(group, &size_), "Comm_size");
    ncclUniqueId id{};
    if (rank_ == 0) check(ncclGetUniqueId(&id), "GetUniqueId");
    check_mpi(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, group), "Bcast of the NCCL id");
    check(ncclCommInitRank(&comm_, size_, id, rank_), "CommInitRank");
  }
  ~NcclCommunicator() override {
    // Pending collectives finish first; errors at teardown have no one left to report to.
    cudaStreamSynchronize(stream_);
    ncclCommDestroy(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce(Tensor t, ReduceOp op) override {
    check(ncclAllReduce(t.data, t.data, count(t), nccl_type(t.dtype), nccl_op(op), comm_, stream_),
          "AllReduce");
  }
  void reduce_scatter(Tensor in, Tensor out, ReduceOp op) override {
    require_same(in, out, in.numel() == out.numel() * size_, "reduce_scatter",
                 "in must hold size() blocks of out");
    check(ncclReduceScatter(in.data, out.data, count(out), nccl_type(out.dtype), nccl_op(op), comm_,
                            stream_),
          "ReduceScatter");
  }
  void all_gather(Tensor in, Tensor out) override {
    require_same(in, out, out.numel() == in.numel() * size_, "all_gather",
                 "out must hold size() blocks of in");
    check(ncclAllGather(in.data, out.data, count(in), nccl_type(in.dtype), comm_, stream_),
          "AllGather");
  }
  void broadcast(Tensor t, int root) override {
    check(ncclBroadcast(t.data, t.data, count(t), nccl_type(t.dtype), root, comm_, stream_),
          "Broadcast");
  }
  void send(Tensor t, int peer) override {
    check(ncclSend(t.data, count(t), nccl_type(t.dtype), peer, comm_, stream_), "Send");
  }
  void recv(Tensor t, int peer) override {
    check(ncclRecv(t.data, count(t), nccl_type(t.dtype), peer, comm_, stream_), "Recv");
  }
  void send_recv(Tensor out, int send_peer, Tensor in, int recv_peer) override {
    // One group: NCCL progresses both together, so neighbours exchanging at once cannot deadlock.
    check(ncclGroupStart(), "GroupStart");
    check(ncclSend(out.data, count(out), nccl_type(out.dtype), send_peer, comm_, stream_), "Send");
    check(ncclRecv(in.data, count(in), nccl_type(in.dtype), recv_peer, comm_, stream_), "Recv");
    check(ncclGroupEnd(), "GroupEnd");
  }

 private:
  static void require_same(const Tensor& in, const Tensor& out, bool sizes_ok, const char* op,
                           const char* what) {
    if (in.dtype != out.dtype)
      throw std::invalid_argument(std::string("NcclCommunicator::") + op +
                                  ": in and out differ in dtype");
    if (!sizes_ok)
      throw std::invalid_argument(std::string("NcclCommunicator::") + op + ": " + what);
  }

  cudaStream_t stream_;
  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm group, Backend& backend) {
  return std::make_unique<NcclCommunicator>(group, backend);
}

#else

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm, Backend&) {
  throw UserError(
      "--backend: 'cuda', but this fastllm was built without CUDA (no NCCL); expected "
      "host, or a build configured with -DFASTLLM_CUDA=ON");
}

#endif

}  // namespace fastllm
