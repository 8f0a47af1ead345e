#include <stdexcept>

#include "kernels/backend.h"

namespace fastllm {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::BF16:
    case DType::F16:
      return 2;
  }
  throw std::invalid_argument("unknown dtype");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "f32";
    case DType::BF16:
      return "bf16";
    case DType::I32:
      return "i32";
    case DType::F16:
      return "f16";
  }
  return "?";
}

Tensor::Tensor(void* data_, DType dtype_, std::initializer_list<std::int64_t> shape)
    : data(data_), dtype(dtype_), rank(static_cast<int>(shape.size())) {
  if (shape.size() > dims.size()) throw std::invalid_argument("tensor rank above 4");
  std::copy(shape.begin(), shape.end(), dims.begin());
}

std::int64_t Tensor::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < rank; ++i)
    n *= dims[i];
  return n;
}

Tensor Tensor::rows(std::int64_t begin, std::int64_t count) const {
  if (rank == 0 || begin < 0 || begin + count > dims[0])
    throw std::out_of_range("Tensor::rows outside the first axis");
  Tensor t = *this;
  const std::int64_t row_elems = dims[0] == 0 ? 0 : numel() / dims[0];
  t.data =
      static_cast<char*>(data) + begin * row_elems * static_cast<std::int64_t>(dtype_size(dtype));
  t.dims[0] = count;
  return t;
}

Tensor Tensor::view(std::initializer_list<std::int64_t> shape) const {
  Tensor t(data, dtype, shape);
  if (t.numel() != numel()) throw std::invalid_argument("Tensor::view changes the element count");
  return t;
}

Tensor Buffer::tensor(DType dtype, std::initializer_list<std::int64_t> shape) const {
  Tensor t(data(), dtype, shape);
  if (t.bytes() > bytes_) throw std::out_of_range("Buffer::tensor larger than the buffer");
  return t;
}

}  // namespace fastllm
