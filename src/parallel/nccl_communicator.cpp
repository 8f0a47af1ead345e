#include "parallel/nccl_communicator.h"

#include <string>

#include "io/error.h"
// This file is globbed into fastllm_core in every build; NCCL exists only in CUDA builds.
#if FASTLLM_HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "kernels/cuda/cuda_backend.h"
#endif

namespace fastllm {

#if FASTLLM_HAVE_CUDA
namespace {

void check(ncclResult_t result, const char* what) {
  if (result != ncclSuccess)
    throw std::runtime_error(std::string("NCCL ") + what +
                             " failed: " + ncclGetErrorString(result));
}

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) throw std::runtime_error(std::string("MPI ") + what + " failed");
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return ncclFloat32;
    case DType::BF16:
      return ncclBfloat16;
    case DType::F16:
      return ncclFloat16;
    case DType::I32:
      return ncclInt32;
  }
  throw std::invalid_argument("NcclCommunicator: unknown dtype");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  return op == ReduceOp::Max ? ncclMax : ncclSum;
}

std::size_t count(const Tensor& t) {
  return static_cast<std::size_t>(t.numel());
}

// Seconds a collective may stay unfinished before the job is ended: FASTLLM_NCCL_TIMEOUT (0: no
// limit), by default 1800, which no healthy collective of a training step comes near.
double collective_timeout_seconds() {
  const char* text = std::getenv("FASTLLM_NCCL_TIMEOUT");
  if (text == nullptr || *text == '\0') return 1800;
  char* end = nullptr;
  const double seconds = std::strtod(text, &end);
  if (*end != '\0' || !(seconds >= 0))
    throw UserError(std::string("FASTLLM_NCCL_TIMEOUT=") + text +
                    ": expected a number of seconds >= 0 (0: no limit)");
  return seconds;
}

// Ends the job when a collective of `comm` does not finish in time or NCCL reports an
// asynchronous error (a peer that died, a network failure): without it the other ranks would wait
// forever in a kernel for a rank that is gone. Each collective is followed by an event on the
// stream; a thread polls the oldest unfinished one and ncclCommGetAsyncError, and on a failure
// aborts the communicator (so that its kernels return) and the MPI job, with a message that names
// the rank and the wait.
class CollectiveWatchdog {
 public:
  CollectiveWatchdog(ncclComm_t comm, cudaStream_t stream, int rank, double timeout)
      : comm_(comm), stream_(stream), rank_(rank), timeout_(timeout) {
    cudaGetDevice(&device_);
    if (timeout_ > 0) thread_ = std::thread([this] { watch(); });
  }
  ~CollectiveWatchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
    for (auto& [event, since] : pending_)
      cudaEventDestroy(event);
    for (cudaEvent_t event : free_)
      cudaEventDestroy(event);
  }
  CollectiveWatchdog(const CollectiveWatchdog&) = delete;
  CollectiveWatchdog& operator=(const CollectiveWatchdog&) = delete;

  // After each collective is enqueued.
  void enqueued(const char* what) {
    if (timeout_ <= 0) return;
    std::lock_guard lock(mutex_);
    cudaEvent_t event = nullptr;
    if (!free_.empty()) {
      event = free_.back();
      free_.pop_back();
    } else if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) {
      return;  // no event: this collective goes unwatched rather than failing the step
    }
    if (cudaEventRecord(event, stream_) != cudaSuccess) {
      free_.push_back(event);
      return;
    }
    pending_.push_back({event, Clock::now()});
    last_ = what;
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    cudaEvent_t event;
    Clock::time_point since;
  };

  void watch() {
    cudaSetDevice(device_);
    std::unique_lock lock(mutex_);
    while (!done_) {
      wake_.wait_for(lock, std::chrono::seconds(1));
      while (!pending_.empty() && cudaEventQuery(pending_.front().event) == cudaSuccess) {
        free_.push_back(pending_.front().event);
        pending_.pop_front();
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      const bool late =
          !pending_.empty() &&
          std::chrono::duration<double>(Clock::now() - pending_.front().since).count() > timeout_;
      if ((async == ncclSuccess || async == ncclInProgress) && !late) continue;
      char message[320];
      if (late) {
        std::snprintf(message, sizeof message,
                      "fastllm: rank %d: an NCCL collective (last enqueued: %s) has not finished "
                      "after %.0f s (FASTLLM_NCCL_TIMEOUT); another rank has probably died or "
                      "hangs. Ending the job.",
                      rank_, last_, timeout_);
      } else {
        std::snprintf(message, sizeof message,
                      "fastllm: rank %d: NCCL reported an error: %s. Ending the job.", rank_,
                      ncclGetErrorString(async));
      }
      std::fprintf(stderr, "%s\n", message);
      std::fflush(stderr);
      ncclCommAbort(comm_);
      MPI_Abort(MPI_COMM_WORLD, 1);
      std::_Exit(1);
    }
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_;
  int device_ = 0;
  double timeout_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool done_ = false;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_;
  const char* last_ = "none";
  std::thread thread_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MPI_Comm group, Backend& backend)
      : stream_(static_cast<cudaStream_t>(cuda_stream(backend))) {
    check_mpi(MPI_Comm_rank(group, &rank_), "Comm_rank");
    check_mpi(MPI_Comm_size(group, &size_), "Comm_size");
    ncclUniqueId id{};
    if (rank_ == 0) check(ncclGetUniqueId(&id), "GetUniqueId");
    check_mpi(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, group), "Bcast of the NCCL id");
    check(ncclCommInitRank(&comm_, size_, id, rank_), "CommInitRank");
    watchdog_ =
        std::make_unique<CollectiveWatchdog>(comm_, stream_, rank_, collective_timeout_seconds());
  }
  ~NcclCommunicator() override {
    // Pending collectives finish first; errors at teardown have no one left to report to.
    cudaStreamSynchronize(stream_);
    watchdog_.reset();
    ncclCommDestroy(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce(Tensor t, ReduceOp op) override {
    check(ncclAllReduce(t.data, t.data, count(t), nccl_type(t.dtype), nccl_op(op), comm_, stream_),
          "AllReduce");
    watchdog_->enqueued("AllReduce");
  }
  void reduce_scatter(Tensor in, Tensor out, ReduceOp op) override {
    require_same(in, out, in.numel() == out.numel() * size_, "reduce_scatter",
                 "in must hold size() blocks of out");
    check(ncclReduceScatter(in.data, out.data, count(out), nccl_type(out.dtype), nccl_op(op), comm_,
                            stream_),
          "ReduceScatter");
    watchdog_->enqueued("ReduceScatter");
  }
  void reduce(Tensor t, int root, ReduceOp op) override {
    check(
        ncclReduce(t.data, t.data, count(t), nccl_type(t.dtype), nccl_op(op), root, comm_, stream_),
        "Reduce");
    watchdog_->enqueued("Reduce");
  }
  void all_gather(Tensor in, Tensor out) override {
    require_same(in, out, out.numel() == in.numel() * size_, "all_gather",
                 "out must hold size() blocks of in");
    check(ncclAllGather(in.data, out.data, count(in), nccl_type(in.dtype), comm_, stream_),
          "AllGather");
    watchdog_->enqueued("AllGather");
  }
  void broadcast(Tensor t, int root) override {
    check(ncclBroadcast(t.data, t.data, count(t), nccl_type(t.dtype), root, comm_, stream_),
          "Broadcast");
    watchdog_->enqueued("Broadcast");
  }
  void send(Tensor t, int peer) override {
    check(ncclSend(t.data, count(t), nccl_type(t.dtype), peer, comm_, stream_), "Send");
    watchdog_->enqueued("Send");
  }
  void recv(Tensor t, int peer) override {
    check(ncclRecv(t.data, count(t), nccl_type(t.dtype), peer, comm_, stream_), "Recv");
    watchdog_->enqueued("Recv");
  }
  void send_recv(Tensor out, int send_peer, Tensor in, int recv_peer) override {
    // One group: NCCL progresses both together, so neighbours exchanging at once cannot deadlock.
    check(ncclGroupStart(), "GroupStart");
    check(ncclSend(out.data, count(out), nccl_type(out.dtype), send_peer, comm_, stream_), "Send");
    check(ncclRecv(in.data, count(in), nccl_type(in.dtype), recv_peer, comm_, stream_), "Recv");
    check(ncclGroupEnd(), "GroupEnd");
    watchdog_->enqueued("SendRecv");
  }

 private:
  static void require_same(const Tensor& in, const Tensor& out, bool sizes_ok, const char* op,
                           const char* what) {
    if (in.dtype != out.dtype)
      throw std::invalid_argument(std::string("NcclCommunicator::") + op +
                                  ": in and out differ in dtype");
    if (!sizes_ok)
      throw std::invalid_argument(std::string("NcclCommunicator::") + op + ": " + what);
  }

  cudaStream_t stream_;
  ncclComm_t comm_ = nullptr;
  std::unique_ptr<CollectiveWatchdog> watchdog_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm group, Backend& backend) {
  return std::make_unique<NcclCommunicator>(group, backend);
}

#else

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm, Backend&) {
  throw UserError(
      "--backend: 'cuda', but this fastllm was built without CUDA (no NCCL); expected "
      "host, or a build configured with -DFASTLLM_CUDA=ON");
}

#endif

}  // namespace fastllm
