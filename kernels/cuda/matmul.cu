// Dense layers: GEMMs through cuBLASLt (bf16 or f32 operands, f32 accumulation, no TF32), bias
// add and its gradient, and the linear layer with its bias and bias gradient fused into the GEMM
// as cuBLASLt epilogues.
#include <cublasLt.h>

#include <cstdio>
#include <string>

#include "kernels/cuda/column_sums.cuh"
#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/gemm_plan.h"

namespace fastllm::cuda {
namespace {

void lt_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLASLt ") + what + " failed with status " +
                             std::to_string(static_cast<int>(status)));
}

cudaDataType_t lt_type(DType dtype) {
  return dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

// The largest power of two up to 256 dividing the address: what cuBLASLt may assume of it.
int alignment(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  int a = 1;
  while (a < 256 && address % (2 * a) == 0)
    a *= 2;
  return a;
}

// Element (i, j) of op(x) for a row-major x of ld columns, transposed when trans.
template <class T>
__device__ __forceinline__ float op_at(const T* x, bool trans, std::int64_t ld, std::int64_t i,
                                       std::int64_t j) {
  return to_f32(trans ? x[j * ld + i] : x[i * ld + j]);
}

// The plain tiled GEMM for the cases cuBLASLt has no algorithm for; row-major like the interface.
template <class TA, class TB, class TC>
__global__ void gemm_fallback_kernel(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                                     std::int64_t k, float alpha, const TA* a, const TB* b,
                                     float beta, TC* c) {
  __shared__ float as[16][17];
  __shared__ float bs[16][17];
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.y) * 16 + threadIdx.y;
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * 16 + threadIdx.x;
  const std::int64_t lda = trans_a ? m : k;
  const std::int64_t ldb = trans_b ? k : n;
  float acc = 0.0f;
  for (std::int64_t k0 = 0; k0 < k; k0 += 16) {
    const std::int64_t ka = k0 + threadIdx.x;
    const std::int64_t kb = k0 + threadIdx.y;
    as[threadIdx.y][threadIdx.x] = row < m && ka < k ? op_at(a, trans_a, lda, row, ka) : 0.0f;
    bs[threadIdx.y][threadIdx.x] = kb < k && col < n ? op_at(b, trans_b, ldb, kb, col) : 0.0f;
    __syncthreads();
    for (int kk = 0; kk < 16; ++kk)
      acc += as[threadIdx.y][kk] * bs[kk][threadIdx.x];
    __syncthreads();
  }
  if (row < m && col < n) {
    TC* out = c + row * n + col;
    const float prior = beta == 0.0f ? 0.0f : beta * to_f32(*out);
    *out = from_f32<TC>(alpha * acc + prior);
  }
}

// c = beta * c for an empty product (beta = 0 writes zeros whatever c held, as BLAS does).
template <class T>
__global__ void scale_matrix_kernel(T* c, std::int64_t count, float beta) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    c[i] = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(c[i]));
}

template <class T>
__global__ void add_bias_kernel(T* y, const T* bias, std::int64_t rows, std::int64_t width) {
  const std::int64_t n = rows * width;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % width]));
}

template <class T>
struct BiasTerm {
  const T* dy;
  std::int64_t width;
  __device__ float operator()(std::int64_t r, std::int64_t j) const {
    return to_f32(dy[r * width + j]);
  }
};

// A copy of x in dtype `to` in the backend's scratch memory.
Buffer converted(CudaBackend& be, const Tensor& x, DType to, Tensor& out) {
  Buffer buffer = be.scratch(static_cast<std::size_t>(x.numel()) * dtype_size(to));
  out = x;
  out.data = buffer.data();
  out.dtype = to;
  be.copy(out, x);
  return buffer;
}

}  // namespace

CudaBackend::GemmKey CudaBackend::gemm_key(bool trans_a, bool trans_b, std::int64_t m,
                                           std::int64_t n, std::int64_t k, const Tensor& a,
                                           const Tensor& b, const Tensor& c,
                                           cublasLtEpilogue_t epilogue, const void* vector) {
  return {int(trans_a),
          int(trans_b),
          m,
          n,
          k,
          int(a.dtype),
          int(b.dtype),
          int(c.dtype),
          alignment(a.data),
          alignment(b.data),
          alignment(c.data),
          int(epilogue),
          vector ? alignment(vector) : 0};
}

GemmPlan* CudaBackend::gemm_plan(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                                 std::int64_t k, const Tensor& a, const Tensor& b, const Tensor& c,
                                 cublasLtEpilogue_t epilogue, const void* vector,
                                 DType vector_dtype) {
  const GemmKey key = gemm_key(trans_a, trans_b, m, n, k, a, b, c, epilogue, vector);
  if (std::shared_ptr<GemmPlan>* found = gemm_plans_.find(key)) return found->get();

  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLASLt's A is our b and
  // its B is our a, each with the same transposition flag.
  auto plan = std::make_shared<GemmPlan>();
  cublasLtMatmulDesc_t desc = nullptr;
  lt_check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  plan->desc.reset(desc);
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof op_b),
           "set TRANSA");
  lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof op_a),
           "set TRANSB");
  if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    // The vector's pointer is set here for the heuristic, which reads its alignment, and again
    // before every call.
    const cudaDataType_t vector_type = lt_type(vector_dtype);
    lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                            sizeof epilogue),
             "set EPILOGUE");
    lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &vector_type,
                                            sizeof vector_type),
             "set BIAS_DATA_TYPE");
    lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vector,
                                            sizeof vector),
             "set BIAS_POINTER");
  }
  cublasLtMatrixLayout_t layout = nullptr;
  lt_check(cublasLtMatrixLayoutCreate(&layout, lt_type(b.dtype), trans_b ? k : n, trans_b ? n : k,
                                      trans_b ? k : n),
           "layout A");
  plan->a.reset(layout);
  lt_check(cublasLtMatrixLayoutCreate(&layout, lt_type(a.dtype), trans_a ? m : k, trans_a ? k : m,
                                      trans_a ? m : k),
           "layout B");
  plan->b.reset(layout);
  lt_check(cublasLtMatrixLayoutCreate(&layout, lt_type(c.dtype), n, m, n), "layout C");
  plan->c.reset(layout);

  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  const std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                        decltype(&cublasLtMatmulPreferenceDestroy)>
      pref_owner(pref, &cublasLtMatmulPreferenceDestroy);
  const std::size_t workspace = gemm_workspace_.bytes();
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &workspace, sizeof workspace),
           "set workspace");
  const std::uint32_t align_lt_a = static_cast<std::uint32_t>(alignment(b.data));
  const std::uint32_t align_lt_b = static_cast<std::uint32_t>(alignment(a.data));
  const std::uint32_t align_c = static_cast<std::uint32_t>(alignment(c.data));
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                &align_lt_a, sizeof align_lt_a),
           "set alignment A");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                &align_lt_b, sizeof align_lt_b),
           "set alignment B");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                &align_c, sizeof align_c),
           "set alignment C");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                &align_c, sizeof align_c),
           "set alignment D");
  // Split-K partial sums only in the f32 compute type: never added up in a bf16 output.
  const std::uint32_t reductions =
      CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                &reductions, sizeof reductions),
           "set reduction schemes");
  cublasLtMatmulHeuristicResult_t result{};
  int found_count = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(lt_.get(), desc, plan->a.get(), plan->b.get(), plan->c.get(),
                                     plan->c.get(), pref, 1, &result, &found_count);
  plan->key = key;
  if (status == CUBLAS_STATUS_SUCCESS && found_count > 0) {
    plan->algo = result.algo;
  } else {
    plan->fallback = true;
    plan->fallback_reason = "cuBLASLt's heuristic offers no algorithm";
  }
  return gemm_plans_.insert(key, std::move(plan)).get();
}

namespace {

const char* epilogue_name(int epilogue) {
  switch (epilogue) {
    case CUBLASLT_EPILOGUE_BIAS:
      return "bias (CUBLASLT_EPILOGUE_BIAS)";
    case CUBLASLT_EPILOGUE_BGRADB:
      return "bias gradient (CUBLASLT_EPILOGUE_BGRADB)";
    default:
      return "none";
  }
}

// The shape part of a GEMM's report line.
template <class GemmKey>
void print_gemm(const char* what, const GemmKey& key) {
  const auto [trans_a, trans_b, m, n, k, a_dtype, b_dtype, c_dtype, align_a, align_b, align_c,
              epilogue, align_vector] = key;
  std::fprintf(stderr,
               "fastllm: %s m=%lld n=%lld k=%lld (trans_a %d, trans_b %d, dtypes %s/%s/%s, "
               "alignments %d/%d/%d bytes, epilogue %s, its vector aligned to %d bytes)",
               what, static_cast<long long>(m), static_cast<long long>(n),
               static_cast<long long>(k), trans_a, trans_b, dtype_name(static_cast<DType>(a_dtype)),
               dtype_name(static_cast<DType>(b_dtype)), dtype_name(static_cast<DType>(c_dtype)),
               align_a, align_b, align_c, epilogue_name(epilogue), align_vector);
}

}  // namespace

void CudaBackend::gemm_fallback(const GemmKey& key, const char* why) {
  ++gemm_fallbacks_;
  if (gemm_fallbacks_reported_.find(key)) return;
  gemm_fallbacks_reported_.insert(key, true);
  print_gemm("GEMM", key);
  std::fprintf(stderr,
               ": %s, so fastllm's slow fallback kernel runs it (reported once per shape)\n", why);
}

void CudaBackend::epilogue_fallback(const GemmKey& key, const char* why) {
  ++epilogue_fallbacks_;
  if (gemm_fallbacks_reported_.find(key)) return;
  gemm_fallbacks_reported_.insert(key, true);
  print_gemm("linear layer GEMM", key);
  std::fprintf(stderr,
               ": %s, so the plain GEMM and fastllm's bias kernel run it (reported once per "
               "shape)\n",
               why);
}

bool CudaBackend::lt_matmul(GemmPlan& plan, float alpha, const Tensor& a, const Tensor& b,
                            float beta, const Tensor& c, const void* vector) {
  if (plan.fallback) return false;
  if (vector)
    lt_check(cublasLtMatmulDescSetAttribute(plan.desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                            &vector, sizeof vector),
             "set BIAS_POINTER");
  const cublasStatus_t status =
      cublasLtMatmul(lt_.get(), plan.desc.get(), &alpha, b.data, plan.a.get(), a.data, plan.b.get(),
                     &beta, c.data, plan.c.get(), c.data, plan.c.get(), &plan.algo,
                     gemm_workspace_.data(), gemm_workspace_.bytes(), stream());
  if (status != CUBLAS_STATUS_NOT_SUPPORTED) {
    lt_check(status, "Matmul");
    return true;
  }
  // The heuristic offered an algorithm the call then refused: this case takes the fallback.
  plan.fallback = true;
  plan.fallback_reason = "cuBLASLt refused the algorithm its heuristic offered";
  return false;
}

bool CudaBackend::epilogue_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                                std::int64_t k, const Tensor& a, const Tensor& b, float beta,
                                const Tensor& c, cublasLtEpilogue_t epilogue, const void* vector,
                                DType vector_dtype, const char* mixed_dtypes) {
  if (mixed_dtypes) {
    epilogue_fallback(gemm_key(trans_a, trans_b, m, n, k, a, b, c, epilogue, vector), mixed_dtypes);
    return false;
  }
  GemmPlan* plan = gemm_plan(trans_a, trans_b, m, n, k, a, b, c, epilogue, vector, vector_dtype);
  if (lt_matmul(*plan, 1.0f, a, b, beta, c, vector)) return true;
  epilogue_fallback(plan->key, plan->fallback_reason);
  return false;
}

void CudaBackend::gemm_lt(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                          std::int64_t k, float alpha, Tensor a, Tensor b, float beta, Tensor c) {
  GemmPlan* plan = gemm_plan(trans_a, trans_b, m, n, k, a, b, c);
  if (lt_matmul(*plan, alpha, a, b, beta, c, nullptr)) return;
  gemm_fallback(plan->key, plan->fallback_reason);
  const dim3 grid(static_cast<unsigned>((n + 15) / 16), static_cast<unsigned>((m + 15) / 16));
  dispatch_float(a.dtype, "gemm", [&]<class TA>() {
    dispatch_float(b.dtype, "gemm", [&]<class TB>() {
      dispatch_float(c.dtype, "gemm", [&]<class TC>() {
        gemm_fallback_kernel<TA, TB, TC><<<grid, dim3(16, 16), 0, stream()>>>(
            trans_a, trans_b, m, n, k, alpha, a.as<TA>(), b.as<TB>(), beta, c.as<TC>());
        FASTLLM_CUDA_LAUNCHED();
      });
    });
  });
}

void CudaBackend::gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                       float alpha, Tensor a, Tensor b, float beta, Tensor c) {
  require_float(a, "gemm", "a");
  require_float(b, "gemm", "b");
  require_float(c, "gemm", "c");
  require(m >= 0 && n >= 0 && k >= 0, "gemm", "negative size");
  require(a.numel() >= m * k, "gemm", "a is smaller than m x k");
  require(b.numel() >= k * n, "gemm", "b is smaller than k x n");
  require(c.numel() >= m * n, "gemm", "c is smaller than m x n");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    dispatch_float(c.dtype, "gemm", [&]<class T>() {
      scale_matrix_kernel<T><<<grid_for(m * n, 256), 256, 0, stream()>>>(c.as<T>(), m * n, beta);
      FASTLLM_CUDA_LAUNCHED();
    });
    return;
  }
  // cuBLASLt wants A and B of one dtype: a product of bf16 with f32 (the router's gradients in a
  // bf16 model) rounds the f32 side to bf16, as autocast would.
  Buffer a_copy, b_copy;
  if (a.dtype != b.dtype) {
    if (a.dtype == DType::F32) {
      a_copy = converted(*this, a.view({a.numel()}), DType::BF16, a);
    } else {
      b_copy = converted(*this, b.view({b.numel()}), DType::BF16, b);
    }
  }
  // f32 operands into a bf16 result: accumulate in an f32 copy of c.
  if (a.dtype == DType::F32 && c.dtype == DType::BF16) {
    const Tensor c_out = c.view({m * n});
    Tensor wide;
    Buffer wide_buffer = converted(*this, c_out, DType::F32, wide);
    gemm_lt(trans_a, trans_b, m, n, k, alpha, a, b, beta, wide);
    copy(c_out, wide);
    return;
  }
  gemm_lt(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
}

void CudaBackend::add_bias(Tensor y, Tensor bias) {
  require_float(y, "add_bias", "y");
  require_dtype(bias, y.dtype, "add_bias", "bias");
  const std::int64_t width = row_width(y);
  const std::int64_t rows = row_count(y);
  require_numel(bias, width, "add_bias", "bias");
  if (rows * width == 0) return;
  dispatch_float(y.dtype, "add_bias", [&]<class T>() {
    add_bias_kernel<T>
        <<<grid_for(rows * width, 256), 256, 0, stream()>>>(y.as<T>(), bias.as<T>(), rows, width);
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::bias_backward(Tensor dy, Tensor dbias) {
  require_float(dy, "bias_backward", "dy");
  require_dtype(dbias, DType::F32, "bias_backward", "dbias");
  const std::int64_t width = row_width(dy);
  const std::int64_t rows = row_count(dy);
  require_numel(dbias, width, "bias_backward", "dbias");
  dispatch_float(dy.dtype, "bias_backward", [&]<class T>() {
    column_sums(*this, BiasTerm<T>{dy.as<T>(), width}, rows, width, dbias.as<float>());
  });
}

namespace {

// The rows of a linear layer's input x for weight [out, in], checked against y (or dy) [rows, out].
std::int64_t linear_rows(const Tensor& x, const Tensor& weight, const Tensor& y, const char* op,
                         const char* y_name) {
  require(weight.rank == 2, op, "weight is not [out, in]");
  const std::int64_t out = weight.size(0), in = weight.size(1);
  require(in > 0 ? x.numel() % in == 0 : x.numel() == 0, op,
          "x's elements are not a whole number of rows of weight's width");
  const std::int64_t rows = in > 0 ? x.numel() / in : 0;
  require_numel(y, rows * out, op, y_name);
  return rows;
}

}  // namespace

// y^T = W x^T + bias in cuBLASLt's column-major order (see gemm_plan): the bias runs along
// cuBLASLt's M (the rows of its D), which is what CUBLASLT_EPILOGUE_BIAS broadcasts. The bias is
// added to the f32 accumulator before y is rounded to its dtype, and is of y's dtype (cuBLASLt's
// bias type is D's by default; CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE says so explicitly).
void CudaBackend::linear_forward(Tensor x, Tensor weight, Tensor bias, Tensor y) {
  const std::int64_t rows = linear_rows(x, weight, y, "linear_forward", "y");
  const std::int64_t out = weight.size(0), in = weight.size(1);
  if (is_empty(bias)) {
    gemm(false, true, rows, out, in, 1.0f, x, weight, 0.0f, y);
    return;
  }
  require_float(x, "linear_forward", "x");
  require_float(weight, "linear_forward", "weight");
  require_float(y, "linear_forward", "y");
  require_dtype(bias, y.dtype, "linear_forward", "bias");
  require_numel(bias, out, "linear_forward", "bias");
  if (rows == 0 || out == 0) return;
  // in = 0 has no GEMM to fuse into: y is the bias on every row.
  const bool one_dtype = x.dtype == weight.dtype && weight.dtype == y.dtype;
  if (in > 0 && epilogue_gemm(false, true, rows, out, in, x, weight, 0.0f, y,
                              CUBLASLT_EPILOGUE_BIAS, bias.data, bias.dtype,
                              one_dtype ? nullptr : "x, weight and y are not all of one dtype"))
    return;
  gemm(false, true, rows, out, in, 1.0f, x, weight, 0.0f, y);
  add_bias(y.view({rows, out}), bias);
}

// dW = dy^T x is, in cuBLASLt's order, dW^T = x^T dy with cuBLASLt's A = x (not transposed) and
// B = dy (transposed): dy is cuBLASLt's B, and the sums of dy over the rows (cuBLASLt's k) are
// CUBLASLT_EPILOGUE_BGRADB's, one per column of D (= out). The epilogue's vector has C's type,
// f32 here (dW is f32), as dbias. It writes the gradient rather than adding to it, while
// parameter gradients accumulate (+=) over micro-batches: it writes a scratch vector of `out`
// floats that one add then puts into dbias. The other choice, passing dbias itself where it is
// known to be zero, would need that knowledge here, and the add costs one pass over `out` floats
// beside a GEMM over rows x out x in.
void CudaBackend::linear_backward_weight(Tensor x, Tensor dy, Tensor dweight, Tensor dbias) {
  const std::int64_t rows = linear_rows(x, dweight, dy, "linear_backward_weight", "dy");
  const std::int64_t out = dweight.size(0), in = dweight.size(1);
  if (is_empty(dbias)) {
    gemm(true, false, out, in, rows, 1.0f, dy, x, 1.0f, dweight);
    return;
  }
  require_float(x, "linear_backward_weight", "x");
  require_float(dy, "linear_backward_weight", "dy");
  require_dtype(dweight, DType::F32, "linear_backward_weight", "dweight");
  require_dtype(dbias, DType::F32, "linear_backward_weight", "dbias");
  require_numel(dbias, out, "linear_backward_weight", "dbias");
  if (rows == 0 || out == 0) return;
  if (in > 0) {
    Buffer sums_buffer = scratch(static_cast<std::size_t>(out) * sizeof(float));
    const Tensor sums = sums_buffer.tensor(DType::F32, {out});
    if (epilogue_gemm(true, false, out, in, rows, dy, x, 1.0f, dweight, CUBLASLT_EPILOGUE_BGRADB,
                      sums.data, DType::F32,
                      dy.dtype == x.dtype ? nullptr : "x and dy are not of one dtype")) {
      add(dbias, sums, 1.0f);
      return;
    }
    gemm(true, false, out, in, rows, 1.0f, dy, x, 1.0f, dweight);
  }
  bias_backward(dy.view({rows, out}), dbias);
}

}  // namespace fastllm::cuda
