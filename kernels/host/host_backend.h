#pragma once
// The reference backend: fp32 on the CPU, OpenMP loops, GEMMs through OpenBLAS. Each op's forward
// and backward live side by side in one file of this folder (attention.cpp, rmsnorm.cpp, ...).
#include <atomic>
#include <memory>

#include "kernels/backend.h"

namespace fastllm {

class HostBackend final : public Backend {
 public:
  std::string name() const override { return "host"; }
  DType compute_dtype() const override { return DType::F32; }

  // Bytes held by this backend's live buffers (as requested), now and at most since it was made
  // or the peak was last reset: what the memory plan of `fastllm inspect` is checked against.
  std::size_t bytes_in_use() const { return usage_->in_use; }
  std::size_t peak_bytes() const { return usage_->peak; }
  void reset_peak() { usage_->peak = usage_->in_use.load(); }

  Buffer allocate(std::size_t bytes) override;
  void copy_from_host(Tensor dst, const void* src) override;
  void copy_to_host(void* dst, Tensor src) override;
  void copy(Tensor dst, Tensor src) override;
  void fill(Tensor t, float value) override;
  void synchronize() override {}

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

 private:
  struct Usage {
    std::atomic<std::size_t> in_use{0}, peak{0};
  };
  // Shared with the buffers' release functions, which may run after the backend is gone.
  std::shared_ptr<Usage> usage_ = std::make_shared<Usage>();
};

}  // namespace fastllm
