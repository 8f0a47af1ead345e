#include "parallel/mpi_session.h"

#include <exception>

namespace fastllm {

MpiSession::MpiSession() : exceptions_at_start_(std::uncaught_exceptions()) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) MPI_Init(nullptr, nullptr);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiSession::~MpiSession() {
  // Unwinding from an error: MPI stays up so that main can print the error once for all ranks
  // (report_fatal_error in cli/error_report.h), which finalises it.
  if (std::uncaught_exceptions() > exceptions_at_start_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace fastllm
