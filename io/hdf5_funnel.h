#pragma once
// The write funnel of the serial-HDF5 build of H5File (io/hdf5_file.h): rank 0 holds the file;
// the other ranks keep copies of the slabs they write and, in a round, take turns (rank 1, 2, ...
// passing a token) writing them while rank 0 has the file closed. This part knows the ranks and
// the slabs kept, not HDF5: H5File says how a turn opens, writes and closes the file. Internal to
// io/.
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "io/hdf5_file.h"

namespace fastllm {

// A slab to write; `data` points into `copy` (kept by the funnel) or at the caller's memory.
struct WriteSlab {
  std::string name;
  H5DType dtype;
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> count;
  std::int64_t elements;
  std::vector<std::byte> copy;
  const void* data;
};

class WriteFunnel {
 public:
  // How one rank's turn uses the file.
  struct Turn {
    std::function<void()> open;
    std::function<void(const WriteSlab&)> write;
    std::function<void()> close;
    std::function<void()> forget;  // after a failure: drop the file without further writes
  };

  WriteFunnel(MPI_Comm comm, std::size_t limit_bytes);

  // Collective. Whether a slab of `bytes` that this rank writes now makes a round run: when any
  // rank other than 0 would keep more than the limit.
  bool round_needed(std::size_t bytes);
  // Collective. Whether any rank keeps slabs (then flush and commit run a round).
  bool holds_slabs();
  // Keeps a copy of a slab of this rank (not rank 0) until the next round.
  void keep(WriteSlab slab, std::size_t bytes);
  // Collective. The turns of a round, once rank 0 has closed the file: ranks 1, 2, ... in order
  // open it, write what they kept (and `extra`, from the caller's memory) and close it. Returns
  // this rank's failure, for the caller to agree on; the kept slabs are gone either way.
  std::exception_ptr take_turns(const WriteSlab* extra, const Turn& turn);

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::size_t limit_;
  std::vector<WriteSlab> kept_;
  std::size_t kept_bytes_ = 0;
};

}  // namespace fastllm
