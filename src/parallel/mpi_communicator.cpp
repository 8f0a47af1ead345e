#include "parallel/mpi_communicator.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/half.h"

namespace fastllm {
namespace {

// MPI counts are int: larger transfers go in pieces of this many elements.
constexpr std::int64_t kChunk = std::int64_t{1} << 28;

void check(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw std::runtime_error(std::string("MPI ") + what + " failed: " + std::string(text, length));
}

// The MPI type that moves (not reduces) one element of `dtype`.
MPI_Datatype move_type(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return MPI_FLOAT;
    case DType::I32:
      return MPI_INT32_T;
    case DType::BF16:
    case DType::F16:
      return MPI_UINT16_T;
  }
  throw std::invalid_argument("unknown dtype");
}

MPI_Op mpi_op(ReduceOp op) {
  return op == ReduceOp::Max ? MPI_MAX : MPI_SUM;
}

char* bytes(Tensor t, std::int64_t element) {
  return static_cast<char*>(t.data) + element * static_cast<std::int64_t>(dtype_size(t.dtype));
}

int count_of(std::int64_t n) {
  return static_cast<int>(n);
}

std::vector<float> widen(Tensor t) {
  std::vector<float> out(static_cast<std::size_t>(t.numel()));
  const auto* in = t.as<std::uint16_t>();
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = bf16_to_f32(in[i]);
  return out;
}

void narrow(const std::vector<float>& in, Tensor t) {
  auto* out = t.as<std::uint16_t>();
  for (std::size_t i = 0; i < in.size(); ++i)
    out[i] = f32_to_bf16(in[i]);
}

Tensor flat_f32(std::vector<float>& v) {
  return Tensor(v.data(), DType::F32, {static_cast<std::int64_t>(v.size())});
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_SELF && comm_ != MPI_COMM_NULL)
    MPI_Comm_free(&comm_);
}

void MpiCommunicator::all_reduce(Tensor t, ReduceOp op) {
  if (size_ == 1) return;
  if (t.dtype == DType::BF16) {
    std::vector<float> wide = widen(t);
    all_reduce(flat_f32(wide), op);
    narrow(wide, t);
    return;
  }
  const MPI_Datatype type = move_type(t.dtype);
  for (std::int64_t begin = 0, n = t.numel(); begin < n; begin += kChunk)
    check(MPI_Allreduce(MPI_IN_PLACE, bytes(t, begin), count_of(std::min(kChunk, n - begin)), type,
                        mpi_op(op), comm_),
          "all-reduce");
}

void MpiCommunicator::reduce_scatter(Tensor in, Tensor out, ReduceOp op) {
  const std::int64_t block = out.numel();
  if (in.numel() != block * size_ || in.dtype != out.dtype)
    throw std::invalid_argument("reduce_scatter: in must hold size() blocks of out's dtype");
  if (in.dtype == DType::BF16) {
    std::vector<float> wide_in = widen(in), wide_out(static_cast<std::size_t>(block));
    reduce_scatter(flat_f32(wide_in), flat_f32(wide_out), op);
    narrow(wide_out, out);
    return;
  }
  const MPI_Datatype type = move_type(in.dtype);
  if (block <= kChunk) {
    check(MPI_Reduce_scatter_block(in.data, out.data, count_of(block), type, mpi_op(op), comm_),
          "reduce-scatter");
    return;
  }
  // Block r reduced onto rank r, piece by piece.
  for (int root = 0; root < size_; ++root) {
    for (std::int64_t begin = 0; begin < block; begin += kChunk) {
      const int count = count_of(std::min(kChunk, block - begin));
      check(MPI_Reduce(bytes(in, root * block + begin), root == rank_ ? bytes(out, begin) : nullptr,
                       count, type, mpi_op(op), root, comm_),
            "reduce");
    }
  }
}

void MpiCommunicator::reduce(Tensor t, int root, ReduceOp op) {
  if (size_ == 1) return;
  if (t.dtype == DType::BF16) {
    std::vector<float> wide = widen(t);
    reduce(flat_f32(wide), root, op);
    if (rank_ == root) narrow(wide, t);
    return;
  }
  const MPI_Datatype type = move_type(t.dtype);
  for (std::int64_t begin = 0, n = t.numel(); begin < n; begin += kChunk) {
    void* data = bytes(t, begin);
    check(MPI_Reduce(rank_ == root ? MPI_IN_PLACE : data, data,
                     count_of(std::min(kChunk, n - begin)), type, mpi_op(op), root, comm_),
          "reduce");
  }
}

void MpiCommunicator::all_gather(Tensor in, Tensor out) {
  const std::int64_t block = in.numel();
  if (out.numel() != block * size_ || in.dtype != out.dtype)
    throw std::invalid_argument("all_gather: out must hold size() blocks of in's dtype");
  const MPI_Datatype type = move_type(in.dtype);
  const bool in_place = in.data == bytes(out, rank_ * block);
  if (block <= kChunk) {
    check(MPI_Allgather(in_place ? MPI_IN_PLACE : in.data, count_of(block), type, out.data,
                        count_of(block), type, comm_),
          "all-gather");
    return;
  }
  if (!in_place)
    std::copy_n(static_cast<const char*>(in.data), in.bytes(), bytes(out, rank_ * block));
  for (int root = 0; root < size_; ++root) {
    for (std::int64_t begin = 0; begin < block; begin += kChunk)
      check(MPI_Bcast(bytes(out, root * block + begin), count_of(std::min(kChunk, block - begin)),
                      type, root, comm_),
            "broadcast");
  }
}

void MpiCommunicator::broadcast(Tensor t, int root) {
  if (size_ == 1) return;
  for (std::int64_t begin = 0, n = t.numel(); begin < n; begin += kChunk)
    check(MPI_Bcast(bytes(t, begin), count_of(std::min(kChunk, n - begin)), move_type(t.dtype),
                    root, comm_),
          "broadcast");
}

void MpiCommunicator::send(Tensor t, int peer) {
  for (std::int64_t begin = 0, n = t.numel(); begin < n; begin += kChunk)
    check(MPI_Send(bytes(t, begin), count_of(std::min(kChunk, n - begin)), move_type(t.dtype), peer,
                   0, comm_),
          "send");
}

void MpiCommunicator::recv(Tensor t, int peer) {
  for (std::int64_t begin = 0, n = t.numel(); begin < n; begin += kChunk)
    check(MPI_Recv(bytes(t, begin), count_of(std::min(kChunk, n - begin)), move_type(t.dtype), peer,
                   0, comm_, MPI_STATUS_IGNORE),
          "receive");
}

void MpiCommunicator::send_recv(Tensor out, int send_peer, Tensor in, int recv_peer) {
  const std::int64_t n_out = out.numel(), n_in = in.numel();
  for (std::int64_t begin = 0; begin < std::max(n_out, n_in); begin += kChunk) {
    const std::int64_t c_out = std::clamp<std::int64_t>(n_out - begin, 0, kChunk);
    const std::int64_t c_in = std::clamp<std::int64_t>(n_in - begin, 0, kChunk);
    check(MPI_Sendrecv(c_out ? bytes(out, begin) : out.data, count_of(c_out), move_type(out.dtype),
                       send_peer, 0, c_in ? bytes(in, begin) : in.data, count_of(c_in),
                       move_type(in.dtype), recv_peer, 0, comm_, MPI_STATUS_IGNORE),
          "send-receive");
  }
}

}  // namespace fastllm
