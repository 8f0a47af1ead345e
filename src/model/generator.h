#pragma once
// Text generation with a key/value cache: the prompt in one forward (the prefill), then one token
// per step, each step attending to the cached keys and values of the positions before it. Built
// from a Model's parameters by their role, on this rank's part of any tensor/pipeline layout:
// each tensor-parallel rank computes its heads and FFN rows and the partial sums are all-reduced
// as in Model's forward; pipeline stages pass each step's activations on; the last stage's
// tensor-parallel ranks gather the logits of their vocabulary slices, tensor-parallel rank 0 there
// picks the token and every rank of the model replica receives it.
#include <cstdint>
#include <vector>

#include "kernels/communicator.h"
#include "model/model.h"
#include "model/stage_weights.h"

namespace fastllm {

struct GenerationSettings {
  std::int64_t max_new_tokens = 64;
  double temperature = 0;  // 0: greedy (the most probable token, the lowest id on a tie)
  double top_p = 1;        // sampling keeps the most probable tokens up to this probability mass
  std::uint64_t seed = 0;  // of the sampling
  // Generation stops after any of these tokens (none: runs to max_new_tokens).
  std::vector<std::int32_t> eos_ids;
};

// The next token from the logits of the whole vocabulary: argmax at temperature 0, else a sample
// of softmax(logits / temperature) restricted to the top-p nucleus. `uniform` in [0, 1).
std::int32_t choose_token(const std::vector<float>& logits, double temperature, double top_p,
                          double uniform);

class Generator {
 public:
  // stages: the pipeline-parallel group (its rank the stage's index); null for one stage. The
  // tensor-parallel group is the model partition's.
  Generator(Model& model, const RunSettings& run, Communicator* stages);

  // Collective over the model's tensor and pipeline groups, which all pass the same prompt and
  // settings and all return the same new tokens (without the prompt; ending with an EOS token
  // when one was generated).
  std::vector<std::int32_t> generate(const std::vector<std::int32_t>& prompt,
                                     const GenerationSettings& settings);

 private:
  struct Layer : LayerWeights {
    DeviceArray k_cache, v_cache;  // [1, capacity, kv heads of this rank, head_dim]
  };

  // Runs `ids` (at positions [offset, offset + n)) through this stage; on the last stage returns
  // the whole vocabulary's logits of the last position (on every tensor-parallel rank there).
  std::vector<float> step(const std::vector<std::int32_t>& ids, std::int64_t offset);
  void attention(Layer& layer, Tensor x, std::int64_t offset);
  void mlp(const Layer& layer, Tensor x);
  void moe(const Layer& layer, Tensor x);
  DeviceArray norm(Tensor x, const Parameter* weight, const Parameter* bias);
  void linear(Tensor x, const Parameter* weight, const Parameter* bias, Tensor y);
  void tp_sum(Tensor t);
  const Parameter* row_parallel_bias(const Parameter* bias) const;
  DeviceArray allocate(DType dtype, std::initializer_list<std::int64_t> shape);
  // Every rank of the replica gets `token` from tensor rank 0 of the last stage.
  std::int32_t share_token(std::int32_t token);

  Model& model_;
  Backend& backend_;
  Architecture arch_;
  RunSettings run_;
  ModelPartition partition_;
  Communicator* stages_;
  int stage_count_ = 1, stage_ = 0;
  std::int64_t heads_ = 0, groups_ = 0;
  std::vector<Layer> layers_;
  const Parameter* embedding_ = nullptr;
  const Parameter* final_norm_ = nullptr;
  const Parameter* final_norm_bias_ = nullptr;
  const Parameter* lm_head_ = nullptr;
};

}  // namespace fastllm
