#pragma once
// The Communicator of the CUDA backend: NCCL over device memory, on the backend's stream so that
// collectives stay ordered with the ops around them (docs/DESIGN.md section 4).
#include <mpi.h>

#include <memory>

#include "kernels/backend.h"
#include "kernels/communicator.h"

namespace fastllm {

// A communicator over the ranks of the MPI communicator `group` (which it uses only while it is
// made: the group's rank 0 calls ncclGetUniqueId, MPI_Bcast shares the id, every rank calls
// ncclCommInitRank). Collective over `group`. `backend` must be a CUDA backend and outlive the
// communicator. Throws UserError in a build without CUDA.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm group, Backend& backend);

}  // namespace fastllm
