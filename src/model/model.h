#pragma once
// The decoder (Mistral, Mixtral and Llama-style), forward and backward on any backend.
//
// Parameters live in one flat buffer (and their gradients in another), each a view with its
// Hugging Face name, so that norms, reductions and the optimizer run over all of them in one pass.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/architecture.h"
#include "kernels/backend.h"

namespace fastllm {

struct Parameter {
  std::string name;                  // Hugging Face checkpoint name
  std::vector<std::int64_t> shape;   // as in the checkpoint, [out, in] for linear layers
  std::int64_t offset = 0;           // elements into the flat buffers
  std::int64_t numel = 0;
  bool decay = false;                // AdamW weight decay applies (2 or more dimensions)
  Tensor weight;                     // compute dtype
  Tensor grad;                       // F32
};

// One micro-batch: batch x seq token ids and next-token targets (negative = not predicted).
struct MicroBatch {
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::vector<std::int32_t> input_ids;  // [batch * seq]
  std::vector<std::int32_t> targets;    // [batch * seq]
};

struct MicroBatchResult {
  double ce_sum = 0;          // sum of cross-entropy over predicted tokens
  std::int64_t predicted = 0;  // number of predicted tokens
  double aux_loss = 0;        // MoE load-balancing loss before its coefficient (0 for dense)
};

class Model {
 public:
  Model(Backend& backend, const Architecture& arch, const RunSettings& run);

  const Architecture& arch() const { return arch_; }
  Backend& backend() const { return backend_; }
  std::vector<Parameter>& parameters() { return parameters_; }
  const Parameter& parameter(const std::string& name) const;
  Tensor flat_weights() const { return flat_weights_; }
  Tensor flat_grads() const { return flat_grads_; }
  std::int64_t parameter_count() const { return flat_weights_.numel(); }

  // Host <-> backend copies of one parameter in F32, whatever the compute dtype.
  void write_weight(const Parameter& p, const float* values);
  std::vector<float> read_weight(const Parameter& p);
  std::vector<float> read_grad(const Parameter& p);

  // Normal(0, std) for matrices, ones for norm weights, zeros for biases, from a seeded generator.
  void initialize(std::uint64_t seed, double std = 0.02);
  void zero_grads();

  // What backward needs of one micro-batch's forward (defined below); freed layer by layer
  // during backward.
  struct ForwardState;
  // Forward of one micro-batch: the result and the activations backward needs. When logits_out is
  // given, it receives the logits [batch * seq, vocab] (F32).
  std::unique_ptr<ForwardState> forward(const MicroBatch& batch, MicroBatchResult& result,
                                        float* logits_out = nullptr);
  // Accumulates (+=) into the gradients the gradient of
  //   ce_scale * sum(cross-entropy) + aux_scale * aux_loss
  // and consumes the state.
  void backward(std::unique_ptr<ForwardState> state, double ce_scale, double aux_scale);

 private:
  // A dense MLP, or one expert of an MoE layer. gate is null when the MLP is not gated.
  struct Mlp {
    const Parameter *gate = nullptr, *up = nullptr, *down = nullptr;
    const Parameter *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
  };
  struct Layer {
    const Parameter *norm1 = nullptr, *norm1_bias = nullptr, *norm2 = nullptr, *norm2_bias = nullptr;
    const Parameter *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
    const Parameter *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
    const Parameter* router = nullptr;  // MoE only
    std::vector<Mlp> mlps;              // one for a dense layer, one per expert for MoE
  };
  struct DeviceArray {
    Buffer buffer;
    Tensor t;
  };
  struct RouterTotals {
    DeviceArray counts;     // [experts] tokens whose top-k holds e, over all layers
    DeviceArray prob_sums;  // [experts] router probability of e summed over all layers' tokens
    std::int64_t tokens = 0;
  };
  // What backward needs of one layer; freed as soon as that layer's backward is done.
  struct LayerActivations {
    DeviceArray h1, mean1, rstd1, q, k, v, attn, lse, x2, h2, mean2, rstd2, x_out;
    // The MLP's rows: all tokens for a dense layer, the tokens x k slots sorted by expert for MoE.
    DeviceArray mlp_in, gate, up, act, mlp_out;
    // MoE routing.
    DeviceArray probs, topk_index, topk_weight, sorted_token, sorted_slot, slot_weight;
    std::vector<std::int64_t> offsets;
  };

 public:
  struct ForwardState {
    std::int64_t batch = 0, seq = 0;
    DeviceArray ids, targets, x0, xf, mean_f, rstd_f, logits, row_max, row_sumexp;
    RouterTotals router;
    std::vector<LayerActivations> layers;
  };

 private:
  void forward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                     LayerActivations& act, RouterTotals& router);
  void backward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                      LayerActivations& act, Tensor dprob_per_expert, Tensor dres);
  void norm_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y, Tensor mean,
                    Tensor rstd);
  void norm_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor mean,
                     Tensor rstd, Tensor dy, Tensor dx);
  void linear_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y);
  // dx = dy W + beta * dx (skipped when dx has no data); weight and bias gradients accumulate.
  void linear_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor dy,
                       Tensor dx, float beta);
  DeviceArray allocate(DType dtype, std::initializer_list<std::int64_t> shape);
  void mlp_forward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor out);
  void mlp_backward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor dout,
                    Tensor dx);

  Backend& backend_;
  Architecture arch_;
  RunSettings run_;
  std::vector<Parameter> parameters_;
  std::vector<Layer> layers_;
  Buffer weights_buffer_, grads_buffer_;
  Tensor flat_weights_, flat_grads_;
  const Parameter* embedding_ = nullptr;
  const Parameter* final_norm_ = nullptr;
  const Parameter* final_norm_bias_ = nullptr;
  const Parameter* lm_head_ = nullptr;  // the embedding when tied
};

}  // namespace fastllm
