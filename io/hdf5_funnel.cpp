#include "io/hdf5_funnel.h"

#include <utility>

namespace fastllm {
namespace {

constexpr int kTokenTag = 7001;

std::uint64_t max_over(MPI_Comm comm, std::uint64_t value) {
  MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_UINT64_T, MPI_MAX, comm);
  return value;
}

}  // namespace

WriteFunnel::WriteFunnel(MPI_Comm comm, std::size_t limit_bytes)
    : comm_(comm), limit_(limit_bytes) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

bool WriteFunnel::round_needed(std::size_t bytes) {
  return max_over(comm_, rank_ == 0 ? 0 : kept_bytes_ + bytes) > limit_;
}

bool WriteFunnel::holds_slabs() {
  return max_over(comm_, kept_bytes_) > 0;
}

void WriteFunnel::keep(WriteSlab slab, std::size_t bytes) {
  const auto* begin = static_cast<const std::byte*>(slab.data);
  slab.copy.assign(begin, begin + bytes);
  slab.data = slab.copy.data();
  kept_.push_back(std::move(slab));
  kept_bytes_ += bytes;
}

std::exception_ptr WriteFunnel::take_turns(const WriteSlab* extra, const Turn& turn) {
  std::exception_ptr failure;
  int token = 0;
  if (rank_ > 0) MPI_Recv(&token, 1, MPI_INT, rank_ - 1, kTokenTag, comm_, MPI_STATUS_IGNORE);
  if (rank_ > 0 && (!kept_.empty() || extra != nullptr)) {
    try {
      turn.open();
      for (const WriteSlab& slab : kept_)
        turn.write(slab);
      if (extra != nullptr) turn.write(*extra);
      turn.close();
    } catch (...) {
      failure = std::current_exception();
      turn.forget();
    }
  }
  if (rank_ + 1 < size_) MPI_Send(&token, 1, MPI_INT, rank_ + 1, kTokenTag, comm_);
  MPI_Barrier(comm_);
  kept_.clear();
  kept_bytes_ = 0;
  return failure;
}

}  // namespace fastllm
