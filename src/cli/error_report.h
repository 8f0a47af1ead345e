#pragma once
// A command's fatal error, printed once for the whole job instead of once per rank.
#include <string>

namespace fastllm {

// Prints `line` (one line, no newline) to stderr so that a job of many ranks shows it once: rank 0
// prints it; every other rank that failed compares its own line with rank 0's and prints it,
// prefixed with "[rank N] ", only when it differs. Ranks that did not fail are never waited for
// beyond a deadline of a few seconds: a failing rank that cannot hear from rank 0 by then prints
// its own prefixed line, and a rank stuck in MPI after its line is settled exits with `exit_code`
// (std::_Exit) without finalising MPI, which makes the launcher end the job.
// Works whether MPI is not yet initialised (the error came before any MPI call; it is initialised
// here when the environment shows a launcher with several ranks), initialised (it is finalised
// here), or already finalised (each rank prints its own line).
void report_fatal_error(const std::string& line, int exit_code);

}  // namespace fastllm
