#pragma once
// The compute interface every backend implements: memory, and each op's forward and backward.
//
// Conventions, shared by all backends:
// - Tensors are dense, row-major views of memory owned by a Buffer from the same backend.
// - Sizes are passed explicitly where a tensor's shape alone would be ambiguous.
// - A backward op overwrites the gradients of its inputs (dx, dq, ...) and accumulates (+=) into
//   the gradients of parameters (dw, db, dtable), so gradient accumulation over micro-batches is
//   free.
// - Elementwise ops (activations, gated, add, scale) may write their outputs over their inputs.
// - Integer tensors (token ids, expert indices) are I32. Statistics kept for backward (rstd, lse,
//   softmax maxima) are F32 whatever the compute dtype.
// - Ops are asynchronous with respect to the host on devices that allow it; copy_to_host and
//   synchronize are the points where the host waits.
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace fastllm {

// F16 is an input dtype of the CUDA backend's fused attention only (and of copy, to make such
// inputs): every other op rejects it, and no model computes in it (training in fp16 would need
// loss scaling).
enum class DType : std::uint8_t { F32, BF16, I32, F16 };
std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  std::array<std::int64_t, 4> dims{};
  int rank = 0;

  Tensor() = default;
  Tensor(void* data, DType dtype, std::initializer_list<std::int64_t> shape);

  std::int64_t numel() const;
  std::int64_t size(int axis) const { return dims[axis < 0 ? axis + rank : axis]; }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  // The rows [begin, begin + count) along the first axis.
  Tensor rows(std::int64_t begin, std::int64_t count) const;
  // The same memory seen with another shape of the same element count.
  Tensor view(std::initializer_list<std::int64_t> shape) const;
  template <class T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

// Owns one allocation on a backend; freed by the backend that made it.
class Buffer {
 public:
  Buffer() = default;
  Buffer(void* data, std::size_t bytes, std::function<void(void*)> release)
      : data_(data, std::move(release)), bytes_(bytes) {}
  void* data() const { return data_.get(); }
  std::size_t bytes() const { return bytes_; }
  Tensor tensor(DType dtype, std::initializer_list<std::int64_t> shape) const;

 private:
  std::unique_ptr<void, std::function<void(void*)>> data_{nullptr, [](void*) {}};
  std::size_t bytes_ = 0;
};

enum class Activation { SiLU, GeLU };

// Elements [begin, begin + count) of a flat buffer.
struct FlatRange {
  std::int64_t begin = 0;
  std::int64_t count = 0;
};

// A run of parameters of a flat buffer updated with one weight decay (0 for the ones without).
struct AdamWRange {
  std::int64_t begin = 0;
  std::int64_t count = 0;
  float weight_decay = 0;
};

// The scalars of one AdamW update at step t (from 1); gradients are multiplied by grad_scale first.
struct AdamWStepScalars {
  float lr = 0, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  std::int64_t step = 1;
  float grad_scale = 1;
};

// Which attention kernel a CUDA backend runs: cuDNN's fused SDPA (bf16 or f16 inputs; fp32
// compute takes the own kernel) or the backend's own FlashAttention-style kernel (f32 or bf16).
// The host backend has one.
enum class AttentionKernel { Cudnn, Own };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // The dtype activations and weights are computed in (F32 on the host, BF16 or F32 on CUDA).
  virtual DType compute_dtype() const = 0;

  // ---- memory ----
  virtual Buffer allocate(std::size_t bytes) = 0;
  virtual void copy_from_host(Tensor dst, const void* src) = 0;
  virtual void copy_to_host(void* dst, Tensor src) = 0;
  // Same shape; converts F32 <-> BF16, and on CUDA F16 <-> F32 or BF16.
  virtual void copy(Tensor dst, Tensor src) = 0;
  virtual void fill(Tensor t, float value) = 0;
  virtual void synchronize() = 0;

  // ---- elementwise and reductions ----
  virtual void add(Tensor y, Tensor x, float alpha) = 0;  // y += alpha * x
  virtual void scale(Tensor y, float alpha) = 0;          // y *= alpha
  virtual double sum_squares(Tensor x) = 0;               // sum of x^2 in double, to the host
  // The sum over the ranges of x's sum_squares, as one reduction (ranges may be empty; they must
  // lie within x).
  virtual double sum_squares_ranges(Tensor x, const std::vector<FlatRange>& ranges) = 0;

  // ---- dense layers ----
  // c[m,n] = alpha * op(a) op(b) + beta * c; op(a) is [m,k] (a stored [k,m] when trans_a),
  // op(b) is [k,n] (b stored [n,k] when trans_b).
  virtual void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                    float alpha, Tensor a, Tensor b, float beta, Tensor c) = 0;
  virtual void add_bias(Tensor y, Tensor bias) = 0;         // y[r,n] += bias[n]
  virtual void bias_backward(Tensor dy, Tensor dbias) = 0;  // dbias[n] += sum_r dy[r,n]
  // A linear layer as one op, so that a backend can fuse the bias into the GEMM (cuBLASLt's
  // epilogues): weight [out, in], x [rows, in] (any shape of rows * in elements), y [rows, out];
  // bias [out] or an empty tensor for no bias.
  // y = x weight^T + bias.
  virtual void linear_forward(Tensor x, Tensor weight, Tensor bias, Tensor y) = 0;
  // dweight += dy^T x and dbias += the sum of dy's rows (dbias empty: no bias); dy [rows, out],
  // dweight [out, in] and dbias [out] F32, as every parameter gradient.
  virtual void linear_backward_weight(Tensor x, Tensor dy, Tensor dweight, Tensor dbias) = 0;

  // ---- token embedding (vocab-parallel: this rank holds rows [vocab_offset, vocab_offset + V))
  // ---- out[t] = table[ids[t] - vocab_offset], or 0 when the id is not in this rank's rows.
  virtual void embedding_forward(Tensor ids, Tensor table, std::int64_t vocab_offset,
                                 Tensor out) = 0;
  virtual void embedding_backward(Tensor ids, Tensor dout, std::int64_t vocab_offset,
                                  Tensor dtable) = 0;

  // ---- normalisation over the last axis of x [rows, dim] ----
  virtual void rmsnorm_forward(Tensor x, Tensor weight, float eps, Tensor y, Tensor rstd) = 0;
  virtual void rmsnorm_backward(Tensor x, Tensor weight, Tensor rstd, Tensor dy, Tensor dx,
                                Tensor dweight) = 0;
  virtual void layernorm_forward(Tensor x, Tensor weight, Tensor bias, float eps, Tensor y,
                                 Tensor mean, Tensor rstd) = 0;
  virtual void layernorm_backward(Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dy,
                                  Tensor dx, Tensor dweight, Tensor dbias) = 0;

  // ---- rotary embedding, half-split convention, in place on x [batch, seq, heads, head_dim] ----
  // Position of x[b, s] is s. inverse = true rotates by the negative angle (the backward).
  virtual void rope(Tensor x, double theta, bool inverse) = 0;
  // rope with x[b, s] at position positions[b, s] (I32 [batch, seq], 0 <= positions[b, s] <= s):
  // packed documents whose positions restart at 0 at each document's first token.
  virtual void rope_positions(Tensor x, Tensor positions, double theta, bool inverse) = 0;

  // ---- causal grouped-query attention ----
  // q, out [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim];
  // lse [batch, heads, seq] (F32) keeps the log-sum-exp of each query row for backward.
  // On CUDA, q, k, v, out and their gradients may also be F16 (cuDNN's fused SDPA only; the
  // document variants below take no F16).
  // window > 0: query i sees keys j with i - window < j <= i; window = 0: all j <= i.
  virtual void attention_forward(Tensor q, Tensor k, Tensor v, std::int64_t window, Tensor out,
                                 Tensor lse) = 0;
  virtual void attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout,
                                  std::int64_t window, Tensor dq, Tensor dk, Tensor dv) = 0;
  // The same over packed documents: positions (I32 [batch, seq]) is each token's position in its
  // document, 0 at a document's first token and the previous token's + 1 otherwise, and query i
  // sees only the keys of its own document, max(i - positions[i], i - window + 1) <= j <= i. An
  // empty positions tensor (no data) is one document per row: the ops above.
  virtual void document_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions,
                                          std::int64_t window, Tensor out, Tensor lse) = 0;
  virtual void document_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                           Tensor dout, Tensor positions, std::int64_t window,
                                           Tensor dq, Tensor dk, Tensor dv) = 0;

  // ---- MLP activations ----
  virtual void activation_forward(Activation kind, Tensor x, Tensor y) = 0;
  virtual void activation_backward(Activation kind, Tensor x, Tensor dy, Tensor dx) = 0;
  // y = act(gate) * up
  virtual void gated_forward(Activation kind, Tensor gate, Tensor up, Tensor y) = 0;
  virtual void gated_backward(Activation kind, Tensor gate, Tensor up, Tensor dy, Tensor dgate,
                              Tensor dup) = 0;

  // ---- cross-entropy over a (possibly vocab-parallel) slice of logits [rows, V_local] ----
  // Per row: the slice's maximum, sum(exp(logit - that maximum)) and the target's logit (0 when
  // the target is outside [vocab_offset, vocab_offset + V_local) or negative, i.e. ignored).
  virtual void cross_entropy_stats(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                                   Tensor row_max, Tensor row_sumexp, Tensor target_logit) = 0;
  // dlogits = (softmax(logits) - onehot(target)) * grad_scale with the global row_max and
  // row_sumexp; rows with a negative target get 0. dlogits may be logits itself.
  virtual void cross_entropy_backward(Tensor logits, Tensor targets, std::int64_t vocab_offset,
                                      Tensor row_max, Tensor row_sumexp, float grad_scale,
                                      Tensor dlogits) = 0;
  // Vocab-parallel softmax: row_sumexp[r] *= exp(slice_max[r] - global_max[r]) (in double), so
  // that the slices' sums, each at its own maximum, can be added at the global one.
  virtual void cross_entropy_rescale(Tensor row_sumexp, Tensor slice_max, Tensor global_max) = 0;
  // Sum over the rows with a target >= 0 of log(row_sumexp) + row_max - target_logit, in double,
  // to the host.
  virtual double cross_entropy_loss(Tensor row_max, Tensor row_sumexp, Tensor target_logit,
                                    Tensor targets) = 0;

  // ---- mixture of experts ----
  // probs = softmax(logits) [tokens, experts] in F32; topk_index/topk_weight [tokens, k]: the k
  // most probable experts (ties to the lower index), weights renormalised to sum to 1.
  virtual void router_forward(Tensor logits, int top_k, Tensor probs, Tensor topk_index,
                              Tensor topk_weight) = 0;
  // Gradient of the router logits from the gradient of the renormalised top-k weights and a
  // per-expert gradient added to every token's probability (the load-balancing loss).
  virtual void router_backward(Tensor probs, Tensor topk_index, Tensor dtopk_weight,
                               Tensor dprob_per_expert, Tensor dlogits) = 0;
  // counts[e] += tokens whose top-k holds e; prob_sums[e] += sum over tokens of probs[t,e].
  virtual void router_statistics(Tensor probs, Tensor topk_index, Tensor counts,
                                 Tensor prob_sums) = 0;
  // dst[i] = src[index[i]] for rows of width src.size(-1).
  virtual void gather_rows(Tensor src, Tensor index, Tensor dst) = 0;
  // dst[index[i]] += weight[i] * src[i]; weight may be an empty tensor (all ones).
  virtual void scatter_add_rows(Tensor src, Tensor index, Tensor weight, Tensor dst) = 0;
  // y[i, :] *= weight[i]
  virtual void scale_rows(Tensor y, Tensor weight) = 0;
  // out[i] = dot(a[i], b[index[i]])
  virtual void dot_rows_gathered(Tensor a, Tensor b, Tensor index, Tensor out) = 0;
  // Sorts the tokens x k slots by expert (stable by slot): sorted_slot[i] = t * k + j,
  // sorted_token[i] = t; offsets I32 [experts + 1], each expert's first sorted row, stay in the
  // backend's memory for the grouped linear ops, with no copy to the host.
  virtual void moe_permute_offsets(Tensor topk_index, int experts, Tensor sorted_token,
                                   Tensor sorted_slot, Tensor offsets) = 0;

  // ---- the experts' linear layers, all experts in one op: rows [offsets[e], offsets[e + 1]) of
  // ---- the row tensors belong to expert e (offsets I32 [experts + 1], nondecreasing from 0, in
  // ---- the backend's memory, as moe_permute_offsets writes them; rows past the last offset are
  // ---- left alone). weights[e] is W_e [n, k]; biases and dbiases are empty or one per expert,
  // ---- an empty tensor standing for no bias.
  // y[rows of e] = x[rows of e] W_e^T + b_e: x [rows, k], y [rows, n].
  virtual void grouped_linear_forward(Tensor x, const std::vector<Tensor>& weights,
                                      const std::vector<Tensor>& biases, Tensor offsets,
                                      Tensor y) = 0;
  // dx[rows of e] = dy[rows of e] W_e + beta * dx[rows of e]: dy [rows, n], dx [rows, k].
  virtual void grouped_linear_backward_data(Tensor dy, const std::vector<Tensor>& weights,
                                            Tensor offsets, float beta, Tensor dx) = 0;
  // dW_e += dy[rows of e]^T x[rows of e] and db_e += the sum of dy's rows of e.
  virtual void grouped_linear_backward_weight(Tensor x, Tensor dy, Tensor offsets,
                                              const std::vector<Tensor>& dweights,
                                              const std::vector<Tensor>& dbiases) = 0;

  // ---- optimizer ----
  // PyTorch AdamW on F32 master weights at step t (from 1); gradients are multiplied by
  // grad_scale first (clipping). weight_decay is applied as p *= 1 - lr * weight_decay.
  // Over each range of the flat F32 buffers param, grad, exp_avg and exp_avg_sq (indexed alike)
  // with the range's weight decay, in one pass that also writes the new param to `weights` (in its
  // dtype, e.g. the bf16 compute copy; skipped when weights is empty) and, when zero_grad, sets
  // the consumed gradients to 0. Elements outside the ranges are left alone.
  virtual void adamw_ranges(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq,
                            Tensor weights, const std::vector<AdamWRange>& ranges,
                            const AdamWStepScalars& scalars, bool zero_grad) = 0;
  // The same over the whole of the buffers, one weight decay, no weights copy.
  void adamw(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq, float lr, float beta1,
             float beta2, float eps, float weight_decay, std::int64_t step, float grad_scale) {
    adamw_ranges(param, grad, exp_avg, exp_avg_sq, Tensor(), {{0, param.numel(), weight_decay}},
                 {lr, beta1, beta2, eps, step, grad_scale}, false);
  }

  // ---- incremental decoding with a key/value cache (inference only: these ops have no
  // ---- backward, generation never differentiates through them)
  // rope with x[b, s] at the absolute position offset + s (rope() is rope_at with offset 0).
  virtual void rope_at(Tensor x, double theta, std::int64_t offset) = 0;
  // Causal grouped-query attention of the queries at positions [offset, offset + q_len) against
  // a key/value cache holding positions [0, offset + q_len) in its first rows:
  // q, out [batch, q_len, heads, head_dim]; k_cache, v_cache [batch, capacity, kv_heads, head_dim]
  // with capacity >= offset + q_len (rows past that are not read). Query position i sees the
  // keys j with i - window < j <= i (window = 0: all j <= i).
  virtual void attention_cached(Tensor q, Tensor k_cache, Tensor v_cache, std::int64_t offset,
                                std::int64_t window, Tensor out) = 0;
};

}  // namespace fastllm
