#pragma once
// The CUDA backend (docs/DESIGN.md section 4): each op of kernels/backend.h on one GPU, one stream.
// Each op's forward and backward live side by side in one file of this folder (attention.cu,
// rmsnorm.cu, ...), as on the host.
//
// Dtypes: activations and weights may be F32 or BF16 (the backend's compute dtype says which the
// model uses; F32 tensors are accepted in either mode); statistics (rstd, lse, maxima), router
// probabilities and parameter gradients are F32. Arithmetic is F32 (reductions where the host
// uses double use double or F32 tree sums); F32 GEMMs never use TF32.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/allocator.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/lru_cache.h"

namespace fastllm::cuda {

struct StreamDeleter {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct LtHandleDeleter {
  void operator()(cublasLtHandle_t h) const { cublasLtDestroy(h); }
};
struct PinnedDeleter {
  void operator()(void* p) const { cudaFreeHost(p); }
};

// A cuBLASLt matmul set up once per GEMM shape, dtype and pointer alignment.
struct GemmPlan;

// cuDNN's handle and the fused-attention graphs built for the shapes met (cudnn_attention.cpp);
// held by a shared_ptr, which may be destroyed where the type is incomplete.
class CudnnAttention;

class CudaBackend final : public Backend {
 public:
  CudaBackend(DType compute, int device, AttentionKernel attention = AttentionKernel::Cudnn);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  DType compute_dtype() const override { return compute_; }

  Buffer allocate(std::size_t bytes) override;
  void copy_from_host(Tensor dst, const void* src) override;
  void copy_to_host(void* dst, Tensor src) override;
  void copy(Tensor dst, Tensor src) override;
  void fill(Tensor t, float value) override;
  void synchronize() override;

  void add(Tensor y, Tensor x, float alpha) override;
  void scale(Tensor y, float alpha) override;
  double sum_squares(Tensor x) override;
  double sum_squares_ranges(Tensor x, const std::vector<FlatRange>& ranges) override;

  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
            Tensor a, Tensor b, float beta, Tensor c) override;
  void add_bias(Tensor y, Tensor bias) override;
  void bias_backward(Tensor dy, Tensor dbias) override;
  void linear_forward(Tensor x, Tensor weight, Tensor bias, Tensor y) override;
  void linear_backward_weight(Tensor x, Tensor dy, Tensor dweight, Tensor dbias) override;

  void embedding_forward(Tensor ids, Tensor table, std::int64_t vocab_offset, Tensor out) override;
  void embedding_backward(Tensor ids, Tensor dout, std::int64_t vocab_offset,
                          Tensor dtable) override;

  void rmsnorm_forward(Tensor x, Tensor weight, float eps, Tensor y, Tensor rstd) override;
  void rmsnorm_backward(Tensor x, Tensor weight, Tensor rstd, Tensor dy, Tensor dx,
                        Tensor dweight) override;
  void layernorm_forward(Tensor x, Tensor weight, Tensor bias, float eps, Tensor y, Tensor mean,
                         Tensor rstd) override;
  void layernorm_backward(Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dy, Tensor dx,
                          Tensor dweight, Tensor dbias) override;

  void rope(Tensor x, double theta, bool inverse) override;
  void rope_positions(Tensor x, Tensor positions, double theta, bool inverse) override;

  void attention_forward(Tensor q, Tensor k, Tensor v, std::int64_t window, Tensor out,
                         Tensor lse) override;
  void attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout,
                          std::int64_t window, Tensor dq, Tensor dk, Tensor dv) override;
  void document_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions,
                                  std::int64_t window, Tensor out, Tensor lse) override;
  void document_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                   Tensor dout, Tensor positions, std::int64_t window, Tensor dq,
                                   Tensor dk, Tensor dv) override;

  void activation_forward(Activation kind, Tensor x, Tensor y) override;
  void activation_backward(Activation kind, Tensor x, Tensor dy, Tensor dx) override;
  void gated_forward(Activation kind, Tensor gate, Tensor up, Tensor y) override;
  void gated_backward(Activation kind, Tensor gate, Tensor up, Tensor dy, Tensor dgate,
                      Tensor dup) override;

  void cross_entropy_stats(Tensor logits, Tensor targets, std::int64_t vocab_offset, Tensor row_max,
                           Tensor row_sumexp, Tensor target_logit) override;
  void cross_entropy_backward(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                              Tensor row_max, Tensor row_sumexp, float grad_scale,
                              Tensor dlogits) override;
  void cross_entropy_rescale(Tensor row_sumexp, Tensor slice_max, Tensor global_max) override;
  double cross_entropy_loss(Tensor row_max, Tensor row_sumexp, Tensor target_logit,
                            Tensor targets) override;

  void router_forward(Tensor logits, int top_k, Tensor probs, Tensor topk_index,
                      Tensor topk_weight) override;
  void router_backward(Tensor probs, Tensor topk_index, Tensor dtopk_weight,
                       Tensor dprob_per_expert, Tensor dlogits) override;
  void router_statistics(Tensor probs, Tensor topk_index, Tensor counts, Tensor prob_sums) override;
  void gather_rows(Tensor src, Tensor index, Tensor dst) override;
  void scatter_add_rows(Tensor src, Tensor index, Tensor weight, Tensor dst) override;
  void scale_rows(Tensor y, Tensor weight) override;
  void dot_rows_gathered(Tensor a, Tensor b, Tensor index, Tensor out) override;
  void moe_permute_offsets(Tensor topk_index, int experts, Tensor sorted_token, Tensor sorted_slot,
                           Tensor offsets) override;
  void grouped_linear_forward(Tensor x, const std::vector<Tensor>& weights,
                              const std::vector<Tensor>& biases, Tensor offsets, Tensor y) override;
  void grouped_linear_backward_data(Tensor dy, const std::vector<Tensor>& weights, Tensor offsets,
                                    float beta, Tensor dx) override;
  void grouped_linear_backward_weight(Tensor x, Tensor dy, Tensor offsets,
                                      const std::vector<Tensor>& dweights,
                                      const std::vector<Tensor>& dbiases) override;

  void adamw_ranges(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq, Tensor weights,
                    const std::vector<AdamWRange>& ranges, const AdamWStepScalars& scalars,
                    bool zero_grad) override;

  void rope_at(Tensor x, double theta, std::int64_t offset) override;
  void attention_cached(Tensor q, Tensor k_cache, Tensor v_cache, std::int64_t offset,
                        std::int64_t window, Tensor out) override;

  // ---- for the op files ----
  cudaStream_t stream() const { return stream_.get(); }
  int device() const { return device_; }
  int multiprocessors() const { return multiprocessors_; }
  std::size_t max_shared_per_block() const { return max_shared_per_block_; }
  CudaMemoryStats memory_stats() const { return allocator_->stats(); }
  CudaKernelStats kernel_stats() const {
    return {gemm_fallbacks_, epilogue_fallbacks_, cudnn_attention_calls_, own_attention_calls_};
  }
  // Device memory for one op's intermediates; released to the cache when the Buffer goes, which
  // is safe because later work runs after the op on the same stream.
  Buffer scratch(std::size_t bytes) { return allocator_->allocate(bytes); }
  // A flag kernels set (to any non-zero value) when an index is out of range. check_flag records
  // the op without waiting: the flag is read at the next point where the host waits for the
  // stream anyway (copy_to_host, synchronize), so that an MoE layer makes no round trip, and an
  // invalid_argument then names every op checked since the last such point.
  int* index_flag() const { return static_cast<int*>(flag_.get()); }
  void check_flag(const char* op, const char* what);
  // Device cos/sin tables [seq, dim / 2] of the rotary embedding, built as the host backend does.
  const float* rope_table(double theta, std::int64_t seq, std::int64_t dim, bool want_sin);

 private:
  // fastllm's own attention kernels (attention.cu); positions as document_attention_*, or empty.
  void own_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions, std::int64_t window,
                             Tensor out, Tensor lse);
  void own_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout,
                              Tensor positions, std::int64_t window, Tensor dq, Tensor dk,
                              Tensor dv);
  // cuDNN's fused SDPA when chosen and it takes the case (bf16 tensors of consistent shapes, a
  // graph cuDNN supports); false: the caller runs the own kernel.
  bool cudnn_attention_forward(Tensor q, Tensor k, Tensor v, std::int64_t window, Tensor out,
                               Tensor lse);
  bool cudnn_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout,
                                std::int64_t window, Tensor dq, Tensor dk, Tensor dv);

  void gemm_lt(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
               float alpha, Tensor a, Tensor b, float beta, Tensor c);
  // The plan of c = op(a) op(b) with cuBLASLt's epilogue (a cublasLtEpilogue_t) over the vector
  // at `vector` (nullptr for CUBLASLT_EPILOGUE_DEFAULT) of dtype vector_dtype.
  GemmPlan* gemm_plan(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                      const Tensor& a, const Tensor& b, const Tensor& c,
                      cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT,
                      const void* vector = nullptr, DType vector_dtype = DType::F32);
  // cuBLASLt runs c = alpha op(a) op(b) + beta c on the plan; false (the plan marked fallback,
  // with its reason) when it has no algorithm for it.
  bool lt_matmul(GemmPlan& plan, float alpha, const Tensor& a, const Tensor& b, float beta,
                 const Tensor& c, const void* vector);
  // c = op(a) op(b) + beta c with the epilogue over `vector` in one cuBLASLt matmul; false, counted
  // and reported (epilogue_fallback), when it cannot run there and the caller runs the plain GEMM
  // and the bias kernel. mixed_dtypes: why the operands' dtypes rule the epilogue out, or nullptr.
  bool epilogue_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                     const Tensor& a, const Tensor& b, float beta, const Tensor& c,
                     cublasLtEpilogue_t epilogue, const void* vector, DType vector_dtype,
                     const char* mixed_dtypes);

  DType compute_;
  int device_ = 0;
  int multiprocessors_ = 0;
  // Attention on the tensor cores where the kernels take the case (FASTLLM_CUDA_ATTENTION=simt
  // turns them off, for comparison).
  bool tensor_core_attention_ = true;
  AttentionKernel attention_kernel_ = AttentionKernel::Cudnn;
  std::shared_ptr<CudnnAttention> cudnn_;
  std::size_t max_shared_per_block_ = 0;
  std::shared_ptr<CachingAllocator> allocator_;
  std::unique_ptr<CUstream_st, StreamDeleter> stream_;
  std::unique_ptr<cublasLtContext, LtHandleDeleter> lt_;
  std::unique_ptr<void, PinnedDeleter> flag_;
  std::vector<std::string> unchecked_;  // the ops whose index flag is not read yet
  // After the stream was synchronised: throws when an index check of unchecked_ failed.
  void raise_index_errors();
  Buffer gemm_workspace_;
  // Transpositions, m, n, k, dtypes of a, b, c, their pointers' alignments, the epilogue and the
  // alignment of its vector.
  using GemmKey = std::tuple<int, int, std::int64_t, std::int64_t, std::int64_t, int, int, int, int,
                             int, int, int, int>;
  GemmKey gemm_key(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                   const Tensor& a, const Tensor& b, const Tensor& c, cublasLtEpilogue_t epilogue,
                   const void* vector);
  // Counts a GEMM the own kernel runs and reports its shape on stderr the first time.
  void gemm_fallback(const GemmKey& key, const char* why);
  // Counts a linear layer whose bias epilogue cuBLASLt did not take (the plain GEMM and the bias
  // kernel run it) and reports its shape on stderr the first time.
  void epilogue_fallback(const GemmKey& key, const char* why);
  // Bounded: under MoE the row counts change every step, and each would otherwise stay. Held by
  // shared_ptr, whose deleter is fixed where GemmPlan is complete (matmul.cu).
  LruCache<GemmKey, std::shared_ptr<GemmPlan>> gemm_plans_{256};
  LruCache<GemmKey, bool> gemm_fallbacks_reported_{1024};
  std::int64_t gemm_fallbacks_ = 0;
  std::int64_t epilogue_fallbacks_ = 0;
  std::int64_t cudnn_attention_calls_ = 0;
  std::int64_t own_attention_calls_ = 0;
  struct RopeTables {
    double theta = 0;
    std::int64_t seq = 0;
    std::int64_t dim = 0;
    Buffer cos, sin;
  };
  RopeTables rope_;
};

// The backend behind a Backend&, or invalid_argument.
CudaBackend& as_cuda(Backend& backend);

}  // namespace fastllm::cuda
