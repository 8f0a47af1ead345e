#pragma once
// The Communicator of the host backend: MPI over host memory, on one MPI communicator.
#include <mpi.h>

#include "kernels/communicator.h"

namespace fastllm {

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction) unless it is MPI_COMM_WORLD or MPI_COMM_SELF.
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  // The MPI communicator itself, for host-side scalars (loss sums, token counts).
  MPI_Comm comm() const { return comm_; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce(Tensor t, ReduceOp op) override;
  void reduce_scatter(Tensor in, Tensor out, ReduceOp op) override;
  void reduce(Tensor t, int root, ReduceOp op) override;
  void all_gather(Tensor in, Tensor out) override;
  void broadcast(Tensor t, int root) override;
  void send(Tensor t, int peer) override;
  void recv(Tensor t, int peer) override;
  void send_recv(Tensor out, int send_peer, Tensor in, int recv_peer) override;

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace fastllm
