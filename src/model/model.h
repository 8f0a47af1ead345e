#pragma once
// The decoder (Mistral, Mixtral and Llama-style), forward and backward on any backend, whole or as
// one rank's part of a tensor- and pipeline-parallel layout (DESIGN.md section 5).
//
// Parameters live in one flat buffer (and their gradients in another), each a view with its
// Hugging Face name, so that norms, reductions and the optimizer run over all of them in one pass.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "config/architecture.h"
#include "kernels/backend.h"
#include "parallel/communicator.h"

namespace fastllm {

// How the gradient of a parameter held by several ranks of one model replica is summed.
enum class GradientSync : std::uint8_t {
  None,
  KvReplicas,     // a key/value head replicated over tensor-parallel ranks
  TiedEmbedding,  // the tied embedding, on the first and the last pipeline stage
};

struct Parameter {
  std::string name;                 // Hugging Face checkpoint name
  std::vector<std::int64_t> shape;  // this rank's part, [out, in] for linear layers
  std::int64_t offset = 0;          // elements into the flat buffers
  std::int64_t numel = 0;
  bool decay = false;  // AdamW weight decay applies (2 or more dimensions)
  Tensor weight;       // compute dtype
  Tensor grad;         // F32
  // The whole tensor and where this rank's part sits in it: the entries
  // [split_begin, split_begin + shape[split_axis]) along split_axis (-1: all of it).
  std::vector<std::int64_t> global_shape;
  int split_axis = -1;
  std::int64_t split_begin = 0;
  // This copy is the one that counts in the gradient norm and is written to checkpoints; false
  // for tensor-parallel replicas after the first and for the tied embedding's copy on the last
  // stage.
  bool primary = true;
  GradientSync sync = GradientSync::None;
  std::size_t index = 0;  // its place in parameter_shapes(arch)
};

// Every parameter of an architecture, in the model's order, with its whole Hugging Face shape.
struct ParameterShape {
  std::string name;
  std::vector<std::int64_t> shape;
};
std::vector<ParameterShape> parameter_shapes(const Architecture& arch);

// Which part of the model one rank holds: the layers of its pipeline stage, split over its
// tensor-parallel group.
struct ModelPartition {
  int tensor_parallel = 1;
  int tp_rank = 0;
  int pipeline_parallel = 1;
  int pp_rank = 0;
  Communicator* tensor = nullptr;   // the tensor-parallel group; required when tensor_parallel > 1
  std::int64_t flat_alignment = 1;  // flat buffers padded to a multiple of this (ZeRO shards)
};

// The parameters one rank of a partition holds, in flat order with their offsets, without memory
// (weight and grad are empty).
std::vector<Parameter> partition_parameters(const Architecture& arch,
                                            const ModelPartition& partition);

// This rank's part of a whole tensor laid out as p.global_shape, and back.
std::vector<float> local_part(const Parameter& p, std::span<const float> whole);
void place_part(const Parameter& p, std::span<const float> part, std::span<float> whole);

// One micro-batch: batch x seq token ids and next-token targets (negative = not predicted).
struct MicroBatch {
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::vector<std::int32_t> input_ids;  // [batch * seq]
  std::vector<std::int32_t> targets;    // [batch * seq]
};

struct MicroBatchResult {
  double ce_sum = 0;           // sum of cross-entropy over predicted tokens
  std::int64_t predicted = 0;  // number of predicted tokens
  double aux_loss = 0;         // MoE load-balancing loss before its coefficient (0 for dense)
};

class Model {
 public:
  Model(Backend& backend, const Architecture& arch, const RunSettings& run,
        const ModelPartition& partition = {});

  const Architecture& arch() const { return arch_; }
  const ModelPartition& partition() const { return partition_; }
  Backend& backend() const { return backend_; }
  std::vector<Parameter>& parameters() { return parameters_; }
  const std::vector<Parameter>& parameters() const { return parameters_; }
  // The first parameter of that name (the tied embedding's copy on a last stage that is not also
  // the first).
  const Parameter& parameter(const std::string& name) const;
  Tensor flat_weights() const { return flat_weights_; }
  Tensor flat_grads() const { return flat_grads_; }
  // The same, padded with zeros to a multiple of the partition's flat_alignment.
  Tensor padded_weights() const { return padded_weights_; }
  Tensor padded_grads() const { return padded_grads_; }
  std::int64_t parameter_count() const { return flat_weights_.numel(); }

  bool first_stage() const { return partition_.pp_rank == 0; }
  bool last_stage() const { return partition_.pp_rank == partition_.pipeline_parallel - 1; }
  // This rank's rows [vocab_begin, vocab_begin + vocab_rows) of the embedding and LM head.
  std::int64_t vocab_begin() const { return vocab_begin_; }
  std::int64_t vocab_rows() const { return vocab_rows_; }

  // Host <-> backend copies of one parameter in F32, whatever the compute dtype.
  void write_weight(const Parameter& p, const float* values);
  std::vector<float> read_weight(const Parameter& p);
  std::vector<float> read_grad(const Parameter& p);

  // Normal(0, std) for matrices, ones for norm weights, zeros for biases. Each parameter has its
  // own generator seeded by (seed, its place in parameter_shapes), and a rank keeps its part of
  // the whole tensor, so every layout starts from the same weights.
  void initialize(std::uint64_t seed, double std = 0.02);
  void zero_grads();

  struct DeviceArray {
    Buffer buffer;
    Tensor t;
  };
  DeviceArray allocate(DType dtype, std::initializer_list<std::int64_t> shape);
  // Any compute dtype to host F32 (through an F32 staging copy when it is not F32 already).
  void copy_to_host_f32(float* out, Tensor src);

  // What backward needs of one micro-batch's forward (defined below); freed layer by layer
  // during backward.
  struct ForwardState;

  // ---- the whole model on one stage ----
  // Forward of one micro-batch: the result and the activations backward needs. When logits_out is
  // given, it receives the logits [batch * seq, vocab_rows()] (F32) of this rank's vocabulary.
  std::unique_ptr<ForwardState> forward(const MicroBatch& batch, MicroBatchResult& result,
                                        float* logits_out = nullptr);
  // Accumulates (+=) into the gradients the gradient of
  //   ce_scale * sum(cross-entropy) + aux_scale * aux_loss
  // and consumes the state.
  void backward(std::unique_ptr<ForwardState> state, double ce_scale, double aux_scale);

  // ---- one pipeline stage ----
  // What flows between stages with one micro-batch: forward, the activations [tokens, hidden]
  // and (MoE) the running router sums [2 * experts] (per-expert top-k counts, then probability
  // sums, over the layers so far); backward, the gradient of those activations and (MoE) the
  // load-balancing gradient per expert [experts], which only the last stage can compute.
  struct StageTensors {
    DeviceArray x;
    DeviceArray router;
  };
  // Buffers of the right shapes for receiving a micro-batch of `tokens` tokens.
  StageTensors stage_input_buffers(std::int64_t tokens);
  StageTensors stage_grad_buffers(std::int64_t tokens);
  // Forward of this stage's layers. The first stage embeds the micro-batch's ids and ignores
  // `input`; the others take ownership of it. The last stage computes the loss into `result`.
  std::unique_ptr<ForwardState> forward_stage(const MicroBatch& batch, StageTensors input,
                                              MicroBatchResult& result,
                                              float* logits_out = nullptr);
  // What forward_stage hands to the next stage (views into the state).
  Tensor stage_output(const ForwardState& state) const;
  Tensor stage_router_sums(const ForwardState& state) const;
  // Backward of this stage; the last stage ignores `grad`. Returns what the previous stage needs
  // (nothing on the first stage).
  StageTensors backward_stage(std::unique_ptr<ForwardState> state, StageTensors grad,
                              double ce_scale, double aux_scale);

 private:
  // A dense MLP, or one expert of an MoE layer. gate is null when the MLP is not gated.
  struct Mlp {
    const Parameter *gate = nullptr, *up = nullptr, *down = nullptr;
    const Parameter *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
  };
  struct Layer {
    const Parameter *norm1 = nullptr, *norm1_bias = nullptr, *norm2 = nullptr,
                    *norm2_bias = nullptr;
    const Parameter *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
    const Parameter *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
    const Parameter* router = nullptr;  // MoE only
    std::vector<Mlp> mlps;              // one for a dense layer, one per expert for MoE
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
    // x0: the stage's input (the embeddings on the first stage).
    DeviceArray ids, targets, x0, xf, mean_f, rstd_f, logits, row_max, row_sumexp;
    DeviceArray router;  // [2 * experts]: top-k counts, then probability sums (MoE)
    std::vector<LayerActivations> layers;
  };

 private:
  void forward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                     LayerActivations& act, Tensor router_sums);
  void backward_layer(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                      LayerActivations& act, Tensor dprob_per_expert, Tensor dres);
  void loss_forward(ForwardState& st, const MicroBatch& mb, MicroBatchResult& result,
                    float* logits_out);
  // Sums partial results over the tensor-parallel group (nothing to do on one rank).
  void tp_sum(Tensor t);
  void norm_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y, Tensor mean,
                    Tensor rstd);
  void norm_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor mean,
                     Tensor rstd, Tensor dy, Tensor dx);
  void linear_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y);
  // dx = dy W + beta * dx (skipped when dx has no data); weight and bias gradients accumulate.
  void linear_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor dy,
                       Tensor dx, float beta);
  void mlp_forward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor out);
  void mlp_backward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor dout,
                    Tensor dx);
  // The bias of a row-parallel layer is added once, by tensor-parallel rank 0, before the sum.
  const Parameter* row_parallel_bias(const Parameter* bias) const {
    return partition_.tp_rank == 0 ? bias : nullptr;
  }

  Backend& backend_;
  Architecture arch_;
  RunSettings run_;
  ModelPartition partition_;
  std::vector<Parameter> parameters_;
  std::vector<Layer> layers_;  // this stage's layers
  Buffer weights_buffer_, grads_buffer_;
  Tensor flat_weights_, flat_grads_, padded_weights_, padded_grads_;
  // This rank's share of the heads, key/value heads and FFN (per expert) rows.
  std::int64_t heads_ = 0, groups_ = 0, ffn_ = 0;
  std::int64_t vocab_begin_ = 0, vocab_rows_ = 0;
  const Parameter* embedding_ = nullptr;   // first stage
  const Parameter* final_norm_ = nullptr;  // last stage
  const Parameter* final_norm_bias_ = nullptr;
  const Parameter* lm_head_ = nullptr;  // last stage; the embedding (or its copy) when tied
};

}  // namespace fastllm
