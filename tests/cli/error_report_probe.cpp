// Calls report_fatal_error on the ranks chosen by the first argument, under mpiexec, as main does
// when a command fails:
//   same     every rank fails with the same line
//   differ   every rank fails; rank 2's line differs
//   partial  only rank 1 fails; the others wait in a barrier that never completes
//   early    every rank fails before MPI is initialised (as a flag error does)
// Exits with report_fatal_error's code, 2.
#include <mpi.h>

#include <cstdio>
#include <string>

#include "cli/error_report.h"

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const std::string line = "error_report_probe: error: the same for all";
  if (mode == "early") {
    fastllm::report_fatal_error(line, 2);
    return 2;
  }
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (mode == "partial" && rank != 1) {
    MPI_Barrier(MPI_COMM_WORLD);
    std::fprintf(stderr, "rank %d: the barrier completed without rank 1\n", rank);
    MPI_Finalize();
    return 0;
  }
  const bool odd_one = mode == "differ" && rank == 2;
  fastllm::report_fatal_error(odd_one ? "error_report_probe: error: only rank 2 sees this" : line,
                              2);
  return 2;
}
