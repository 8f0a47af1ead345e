#pragma once
// One cuBLASLt matmul configured for a shape, dtypes, pointer alignments and epilogue (none, the
// bias, or the bias gradient of a linear layer): made on the first GEMM of that kind and reused
// for every later one.
#include <cublasLt.h>

#include <cstdint>
#include <memory>
#include <tuple>
#include <type_traits>

namespace fastllm::cuda {

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
};
using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, MatmulDescDeleter>;
using Layout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, LayoutDeleter>;

struct GemmPlan {
  MatmulDesc desc;
  Layout a, b, c;  // cuBLASLt's A, B, C (= D), column-major
  cublasLtMatmulAlgo_t algo{};
  // No cuBLASLt algorithm takes this case (odd leading dimensions or alignments): the backend's
  // own tiled kernel runs it instead, counted and reported (CudaBackend::gemm_fallback).
  bool fallback = false;
  const char* fallback_reason = "";
  // The epilogue's vector (CUBLASLT_MATMUL_DESC_BIAS_POINTER) is set on desc before each call;
  // its alignment is part of the key, as the algorithm may depend on it.
  std::tuple<int, int, std::int64_t, std::int64_t, std::int64_t, int, int, int, int, int, int, int,
             int>
      key;
};

}  // namespace fastllm::cuda
