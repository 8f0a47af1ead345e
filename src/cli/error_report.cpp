#include "cli/error_report.h"

#include <mpi.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace fastllm {

namespace {

// Point-to-point tags on MPI_COMM_WORLD that nothing else uses: the collectives and the
// sub-communicators of the rest of the program can never match them, whatever state a rank is in.
constexpr int kLineTag = 0x4c4c;
constexpr int kAckTag = 0x4c4d;
using Clock = std::chrono::steady_clock;
// How long a rank waits for the others once MPI is up, and for MPI_Init, which on a loaded node
// can take seconds by itself.
constexpr auto kDeadline = std::chrono::milliseconds(2500);
constexpr auto kInitDeadline = std::chrono::seconds(15);

void print_line(const std::string& line) {
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

std::string with_rank(const std::string& line, int rank) {
  return "[rank " + std::to_string(rank) + "] " + line;
}

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  return *end == '\0' && v >= 0 ? static_cast<int>(v) : fallback;
}

struct LaunchedAs {
  int rank = 0;
  int size = 1;
};

// The rank and job size the launcher gave this process, read before MPI is initialised: Open MPI's
// mpirun, Hydra (MPICH, Intel MPI) and srun --mpi=pmi2, or an srun job step.
LaunchedAs launched_as() {
  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr)
    return {env_int("OMPI_COMM_WORLD_RANK", 0), env_int("OMPI_COMM_WORLD_SIZE", 1)};
  if (std::getenv("PMI_SIZE") != nullptr) return {env_int("PMI_RANK", 0), env_int("PMI_SIZE", 1)};
  if (std::getenv("SLURM_STEP_ID") != nullptr)
    return {env_int("SLURM_PROCID", 0), env_int("SLURM_STEP_NUM_TASKS", 1)};
  return {};
}

// Bounds the time spent in MPI: past the deadline it prints the fallback line (unless the rank's
// line was already dealt with) and ends the process, wherever the main thread is blocked.
class Watchdog {
 public:
  Watchdog(std::string fallback, int exit_code, Clock::duration timeout)
      : fallback_(std::move(fallback)),
        exit_code_(exit_code),
        deadline_(Clock::now() + timeout),
        thread_([this] { watch(); }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // A new fallback line and deadline.
  void rearm(std::string fallback, Clock::duration timeout) {
    {
      std::lock_guard lock(mutex_);
      fallback_ = std::move(fallback);
      deadline_ = Clock::now() + timeout;
    }
    wake_.notify_one();
  }
  // Prints `line` now (if not empty); from then on the deadline only ends the process.
  void settle(const std::string& line) {
    std::lock_guard lock(mutex_);
    if (!line.empty()) print_line(line);
    settled_ = true;
  }

 private:
  void watch() {
    std::unique_lock lock(mutex_);
    while (true) {
      const Clock::time_point deadline = deadline_;
      if (!wake_.wait_until(lock, deadline, [&] { return done_ || deadline_ != deadline; })) break;
      if (done_) return;
    }
    if (!settled_) print_line(fallback_);
    std::_Exit(exit_code_);
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::string fallback_;
  int exit_code_;
  Clock::time_point deadline_;
  bool settled_ = false;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace

void report_fatal_error(const std::string& line, int exit_code) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  const LaunchedAs launched = launched_as();
  if (finalized || (!initialized && launched.size <= 1)) {
    print_line(launched.size > 1 ? with_rank(line, launched.rank) : line);
    return;
  }
  // MPI_Init waits for every rank of the job, and MPI_Finalize too: both are under the watchdog.
  Watchdog watchdog(with_rank(line, launched.rank), exit_code,
                    initialized ? Clock::duration(kDeadline) : Clock::duration(kInitDeadline));
  if (!initialized) MPI_Init(nullptr, nullptr);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  watchdog.rearm(size > 1 ? with_rank(line, rank) : line, kDeadline);
  if (size == 1) {
    watchdog.settle(line);
  } else if (rank == 0) {
    watchdog.settle(line);
    std::vector<MPI_Request> sends(static_cast<std::size_t>(size - 1));
    for (int r = 1; r < size; ++r)
      MPI_Isend(line.data(), static_cast<int>(line.size()), MPI_CHAR, r, kLineTag, MPI_COMM_WORLD,
                &sends[static_cast<std::size_t>(r - 1)]);
    // Every other rank acknowledges once it has the line: then all ranks failed and can finalise
    // together. A rank that did not fail never answers, and the watchdog ends this one.
    for (int r = 1; r < size; ++r)
      MPI_Recv(nullptr, 0, MPI_CHAR, r, kAckTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Waitall(size - 1, sends.data(), MPI_STATUSES_IGNORE);
  } else {
    MPI_Status status;
    MPI_Probe(0, kLineTag, MPI_COMM_WORLD, &status);
    int count = 0;
    MPI_Get_count(&status, MPI_CHAR, &count);
    std::string first(static_cast<std::size_t>(count), '\0');
    MPI_Recv(first.data(), count, MPI_CHAR, 0, kLineTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    watchdog.settle(first == line ? std::string() : with_rank(line, rank));
    MPI_Send(nullptr, 0, MPI_CHAR, 0, kAckTag, MPI_COMM_WORLD);
  }
  MPI_Finalize();
}

}  // namespace fastllm
