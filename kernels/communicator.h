#pragma once
// Collectives between the ranks of one group (world, tensor-, data- or pipeline-parallel), on the
// memory of one backend: MPI over host memory for the host backend, NCCL over device memory for
// the CUDA backend (docs/DESIGN.md section 4). Every layout's hot path goes through this interface.
#include "kernels/backend.h"

namespace fastllm {

enum class ReduceOp { Sum, Max };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In place; t is F32, BF16 or I32 (BF16 is reduced in F32 where the transport allows it).
  virtual void all_reduce(Tensor t, ReduceOp op) = 0;
  // in holds size() equal blocks of out.numel() elements; rank r receives the reduction of block r.
  virtual void reduce_scatter(Tensor in, Tensor out, ReduceOp op) = 0;
  // In place on `root`, which receives the reduction of every rank's t; t is unchanged elsewhere.
  virtual void reduce(Tensor t, int root, ReduceOp op) = 0;
  // out receives size() blocks of in.numel() elements, block r from rank r.
  virtual void all_gather(Tensor in, Tensor out) = 0;
  virtual void broadcast(Tensor t, int root) = 0;
  // Point to point (pipeline activations and their gradients); a send is matched by one recv.
  virtual void send(Tensor t, int peer) = 0;
  virtual void recv(Tensor t, int peer) = 0;
  // Sends `out` to send_peer while receiving `in` from recv_peer, so that two neighbouring stages
  // exchanging activations and gradients at once cannot deadlock (matched by a send_recv, or by a
  // recv and a send, on the peers).
  virtual void send_recv(Tensor out, int send_peer, Tensor in, int recv_peer) = 0;
};

}  // namespace fastllm
