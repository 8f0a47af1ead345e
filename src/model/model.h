#pragma once
// The decoder (Mistral, Mixtral and Llama-style), forward and backward on any backend, whole or as
// one rank's part of a tensor- and pipeline-parallel layout (docs/DESIGN.md section 5).
//
// Parameters live in one flat buffer (and their gradients in another), each a view described by
// the parameter table (model/parameters.h), so that norms, reductions and the optimizer run over
// all of them in one pass. Each block (attention, dense MLP, mixture of experts) is a forward and a
// backward function side by side; recompute replays a block's forward with the same kernels.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/architecture.h"
#include "kernels/backend.h"
#include "model/parameters.h"
#include "model/stage_weights.h"

namespace fastllm {

// A tensor with the memory it owns.
struct DeviceArray {
  Buffer buffer;
  Tensor t;
};
DeviceArray device_array(Backend& backend, DType dtype, std::initializer_list<std::int64_t> shape);

// What backward keeps of each layer's forward (docs/DESIGN.md section 7):
//   none:      every activation;
//   selective: all but the norm outputs and the MLP activation product, which are recomputed from
//              the kept inputs and statistics (cheap elementwise work, about a third of the
//              memory);
//   full:      only each layer's input; the whole layer is replayed in backward.
// Every mode computes bit-identical results: recompute replays exactly the same kernels.
enum class Recompute : std::uint8_t { None, Selective, Full };
Recompute parse_recompute(const std::string& text);
const char* recompute_name(Recompute mode);

// ZeRO-2 (docs/DESIGN.md section 5): a model whose partition asks for gradient buckets keeps no
// flat gradient buffer. Each layer's gradients (and each whole-model parameter's) live in a bucket
// during that part's backward of a micro-batch and go to the sink as soon as they are complete.
// Buckets of the tied embedding split over pipeline stages wait for flush_deferred_gradients(),
// after their sum between the first and the last stage.
class GradientSink {
 public:
  virtual ~GradientSink() = default;
  // `grads` is the flat range [flat_begin, flat_begin + grads.numel()) of the rank's parameters,
  // which `params` (their grad views point into it) cover.
  virtual void take(const std::vector<Parameter*>& params, std::int64_t flat_begin,
                    Tensor grads) = 0;
};

// One micro-batch: batch x seq token ids and next-token targets (negative = not predicted).
struct MicroBatch {
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::vector<std::int32_t> input_ids;  // [batch * seq]
  std::vector<std::int32_t> targets;    // [batch * seq]
  // [batch * seq]: each token's position in its document (0 where a document starts), for
  // document-masked attention over packed rows; empty: one document per row (positions 0..seq-1).
  std::vector<std::int32_t> positions;
};

class Model {
 public:
  Model(Backend& backend, const Architecture& arch, const RunSettings& run,
        const ModelPartition& partition = {}, Recompute recompute = Recompute::None);

  const Architecture& arch() const { return arch_; }
  const ModelPartition& partition() const { return partition_; }
  Backend& backend() const { return backend_; }
  Recompute recompute() const { return recompute_; }
  std::vector<Parameter>& parameters() { return parameters_; }
  const std::vector<Parameter>& parameters() const { return parameters_; }
  // The first parameter of that name (the tied embedding's copy on a last stage that is not also
  // the first).
  const Parameter& parameter(const std::string& name) const;
  Tensor flat_weights() const { return flat_weights_; }
  // Empty with gradient buckets (ZeRO-2).
  Tensor flat_grads() const { return flat_grads_; }
  // The same, padded with zeros to a multiple of the partition's flat_alignment.
  Tensor padded_weights() const { return padded_weights_; }
  Tensor padded_grads() const { return padded_grads_; }
  std::int64_t parameter_count() const { return flat_weights_.numel(); }

  bool first_stage() const { return partition_.first_stage(); }
  bool last_stage() const { return partition_.last_stage(); }
  // This rank's rows of the embedding and LM head.
  VocabSlice vocab() const { return vocab_; }

  // Host <-> backend copies of one parameter in F32, whatever the compute dtype.
  void write_weight(const Parameter& p, const float* values);
  std::vector<float> read_weight(const Parameter& p);
  std::vector<float> read_grad(const Parameter& p);
  // Any compute dtype to host F32 (through an F32 staging copy when it is not F32 already).
  void copy_to_host_f32(float* out, Tensor src);

  // Normal(0, std) for matrices, ones for norm weights, zeros for biases. Each parameter has its
  // own generator seeded by (seed, its place in the parameter table), and a rank keeps its part of
  // the whole tensor, so every layout starts from the same weights.
  void initialize(std::uint64_t seed, double std = 0.02);
  void zero_grads();

  // Gradient buckets (ZeRO-2): where complete buckets go, set before the first backward; and the
  // deferred buckets handed over at the end of a step.
  bool gradient_buckets() const { return partition_.gradient_buckets; }
  void set_gradient_sink(GradientSink* sink) { sink_ = sink; }
  void flush_deferred_gradients();

  DeviceArray allocate(DType dtype, std::initializer_list<std::int64_t> shape);

  // What backward needs of one micro-batch's forward on this stage (defined below); freed layer by
  // layer during backward.
  struct ForwardState;

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
  // `input`; the others take ownership of it. The last stage ends with the logits of its
  // vocabulary slice, logits(state) [tokens, vocab().rows], and (MoE) the micro-batch's
  // load-balancing loss, aux_loss(state), and each expert's load, expert_load(state). The
  // cross-entropy over the logits is the caller's (vocabulary-parallel, parallel/cross_entropy.h).
  std::unique_ptr<ForwardState> forward_stage(const MicroBatch& batch, StageTensors input);
  Tensor logits(const ForwardState& state) const;
  double aux_loss(const ForwardState& state) const;
  const std::vector<double>& expert_load(const ForwardState& state) const;
  // What forward_stage hands to the next stage (views into the state).
  Tensor stage_output(const ForwardState& state) const;
  Tensor stage_router_sums(const ForwardState& state) const;
  // Backward of this stage, accumulating (+=) into the gradients. On the last stage the caller has
  // written the gradient of the loss over logits(state), and aux_scale is the weight of the
  // load-balancing loss; other stages take `grad` from the next one. Returns what the previous
  // stage needs (nothing on the first stage).
  StageTensors backward_stage(std::unique_ptr<ForwardState> state, StageTensors grad,
                              double aux_scale);

  // The MLP of a dense layer or one expert over rows x: out = down(act(gate(x)) * up(x)), gate
  // unused when the MLP is not gated; and all experts at once, rows [offsets[e], offsets[e + 1])
  // through mlps[e], each projection one grouped op with the offsets on the device. Public for the
  // Generator, whose decoding runs the same forward.
  void expert_forward(const MlpWeights& mlp, Tensor x, Tensor gate, Tensor up, Tensor act,
                      Tensor out);
  void expert_forward(const std::vector<MlpWeights>& mlps, Tensor offsets, Tensor x, Tensor gate,
                      Tensor up, Tensor act, Tensor out);

 private:
  using Mlp = MlpWeights;
  using Layer = LayerWeights;

  // Each block is y = x + f(norm(x)). `h`, the norm's output, is what selective recompute drops.
  struct AttentionActivations {
    DeviceArray h, mean, rstd, q, k, v, out, lse, y;
  };
  struct MlpActivations {
    DeviceArray h, mean, rstd, gate, up, act, y;
    // MoE: the routing, and the MLP's rows (tokens x k slots sorted by expert) in and out.
    DeviceArray probs, topk_index, topk_weight, sorted_token, sorted_slot, slot_weight, rows_in,
        rows_out;
    DeviceArray offsets;  // I32 [experts + 1]: each expert's first sorted row, on the device
  };
  struct LayerActivations {
    AttentionActivations attention;
    MlpActivations mlp;
  };

 public:
  struct ForwardState {
    std::int64_t batch = 0, seq = 0;
    // x0: the stage's input (the embeddings on the first stage).
    DeviceArray ids, x0, xf, mean_f, rstd_f, logits;
    DeviceArray positions;  // [batch, seq] I32 when the micro-batch packs documents
    DeviceArray router;     // [2 * experts]: top-k counts, then probability sums (MoE)
    double aux_loss = 0;
    // MoE: each expert's share of the routed token slots over all layers (sums to 1), over the
    // same tokens as aux_loss.
    std::vector<double> expert_load;
    int aux_replicas = 1;  // data-parallel ranks whose statistics the load-balancing loss is over
    std::vector<LayerActivations> layers;
  };

 private:
  // ---- blocks: forward and backward side by side ----
  // Backward takes dy = dL/dy and leaves dL/dx in it.
  // positions: the micro-batch's positions in documents ([batch, seq] I32), or empty.
  void attention_forward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                         Tensor positions, AttentionActivations& a);
  void attention_backward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                          Tensor positions, AttentionActivations& a, Tensor dy);
  void mlp_forward(const Layer& layer, Tensor x, MlpActivations& a);
  void mlp_backward(const Layer& layer, Tensor x, MlpActivations& a, Tensor dy);
  // router_sums: where the layer's routing statistics are added; empty when replaying.
  void moe_forward(const Layer& layer, Tensor x, MlpActivations& a, Tensor router_sums);
  void moe_backward(const Layer& layer, Tensor x, MlpActivations& a, Tensor dprob_per_expert,
                    Tensor dy);
  // Overwrites gate, up and act with their gradients, then writes dx.
  void expert_backward(const Mlp& mlp, Tensor x, Tensor gate, Tensor up, Tensor act, Tensor dout,
                       Tensor dx);
  void expert_backward(const std::vector<Mlp>& mlps, Tensor offsets, Tensor x, Tensor gate,
                       Tensor up, Tensor act, Tensor dout, Tensor dx);

  // ---- a layer, with what recompute drops and replays ----
  void layer_forward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                     Tensor positions, LayerActivations& a, Tensor router_sums);
  void drop_recomputable(LayerActivations& a);
  void replay_dropped(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                      Tensor positions, LayerActivations& a);
  void layer_backward(const Layer& layer, Tensor x, std::int64_t batch, std::int64_t seq,
                      Tensor positions, LayerActivations& a, Tensor dprob_per_expert, Tensor dy);

  // ---- gradient buckets (ZeRO-2) ----
  struct GradientBucket {
    std::vector<Parameter*> params;
    std::int64_t begin = 0, end = 0;  // flat range
    bool deferred = false;            // the tied embedding split over stages
    DeviceArray grads;
  };
  void make_buckets();
  // Gives the bucket of p (no-op without buckets) zeroed memory for this backward, or hands it to
  // the sink.
  void open_bucket(const Parameter* p);
  void close_bucket(const Parameter* p);
  void release(GradientBucket& bucket);

  // ---- the ends of the model ----
  void head_forward(ForwardState& st);
  // From the gradient of the logits (written over them) to dL/d(stage output) in dres.
  void head_backward(ForwardState& st, Tensor dres);

  // ---- primitives ----
  // Sums partial results over the tensor-parallel group (nothing to do on one rank).
  void tp_sum(Tensor t);
  // Sequence parallelism (Megatron): outside the tensor-parallel regions each rank holds its
  // contiguous 1/T of the token rows. whole_rows: this rank's rows -> every row (an all-gather into
  // `gathered`; x itself without sequence parallelism). reduce_rows: partial sums of every row ->
  // this rank's rows, summed (a reduce-scatter; an all-reduce in place without it).
  bool sequence_parallel() const;
  Tensor whole_rows(Tensor x, DeviceArray& gathered);
  DeviceArray reduce_rows(DeviceArray partial);
  DeviceArray norm_output(Tensor x, const Parameter* weight, const Parameter* bias, Tensor mean,
                          Tensor rstd);
  void norm_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y, Tensor mean,
                    Tensor rstd);
  void norm_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor mean,
                     Tensor rstd, Tensor dy, Tensor dx);
  void linear_forward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y);
  // dx = dy W + beta * dx (skipped when dx has no data); weight and bias gradients accumulate.
  void linear_backward(Tensor x, const Parameter* weight, const Parameter* bias, Tensor dy,
                       Tensor dx, float beta);
  // The bias of a row-parallel layer is added once, by tensor-parallel rank 0, before the sum.
  const Parameter* row_parallel_bias(const Parameter* bias) const {
    return partition_.at.tp == 0 ? bias : nullptr;
  }

  Backend& backend_;
  GradientSink* sink_ = nullptr;
  std::vector<GradientBucket> buckets_;
  std::vector<std::size_t> bucket_of_;  // per parameter, its bucket
  Architecture arch_;
  RunSettings run_;
  ModelPartition partition_;
  Recompute recompute_;
  std::vector<Parameter> parameters_;
  std::vector<Layer> layers_;  // this stage's layers
  Buffer weights_buffer_, grads_buffer_;
  Tensor flat_weights_, flat_grads_, padded_weights_, padded_grads_;
  // This rank's share of the heads, key/value heads and FFN (per expert) rows.
  std::int64_t heads_ = 0, groups_ = 0, ffn_ = 0;
  VocabSlice vocab_;
  const Parameter* embedding_ = nullptr;   // first stage
  const Parameter* final_norm_ = nullptr;  // last stage
  const Parameter* final_norm_bias_ = nullptr;
  const Parameter* lm_head_ = nullptr;  // last stage; the embedding (or its copy) when tied
};

}  // namespace fastllm
