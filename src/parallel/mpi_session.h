#pragma once
// MPI for the lifetime of a command: initialised on construction (also without mpirun, as a
// singleton), finalised on destruction unless an exception is unwinding (main then finalises it
// after reporting the error).
#include <mpi.h>

namespace fastllm {

class MpiSession {
 public:
  MpiSession();
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm world() const { return MPI_COMM_WORLD; }

 private:
  int rank_ = 0;
  int size_ = 1;
  int exceptions_at_start_ = 0;
};

}  // namespace fastllm
