// The parameter table (model/parameters.h) against independent sources: the closed-form counts of
// each architecture written out by hand, the tensors of the Hugging Face fixtures, and, for many
// layouts, the partition every rank's Model actually allocates against what `inspect` plans.
#include <gtest/gtest.h>

#include <map>
#include <stdexcept>

#include "io/safetensors.h"
#include "kernels/host/host_backend.h"
#include "model/model.h"
#include "model/parameters.h"

namespace fastllm::test {
namespace {

Architecture arch(bool moe, bool biases, bool layer_norm, bool tied, bool gated) {
  Architecture a;
  a.num_layers = 5;
  a.hidden_size = 24;
  a.vocab_size = 53;
  a.num_attention_heads = 4;
  a.head_groups = 2;
  a.kv_channels = 8;
  a.ffn_hidden_size = 40;
  a.add_linear_biases = biases;
  a.gated = gated;
  a.normalization = layer_norm ? NormType::LayerNorm : NormType::RMSNorm;
  a.tie_word_embeddings = tied;
  if (moe) {
    a.num_experts = 3;
    a.num_experts_per_token = 2;
  }
  return a;
}

std::vector<Architecture> architectures() {
  std::vector<Architecture> out;
  for (int bits = 0; bits < 32; ++bits)
    out.push_back(arch(bits & 1, bits & 2, bits & 4, bits & 8, !(bits & 16)));
  return out;
}

// The count written out from the architecture's definition, independently of the table.
std::int64_t closed_form(const Architecture& a) {
  const std::int64_t h = a.hidden_size, f = a.ffn_hidden_size, q = a.q_size(), kv = a.kv_size();
  const std::int64_t norm = a.normalization == NormType::LayerNorm ? 2 * h : h;
  std::int64_t attention = 2 * h * q + 2 * h * kv;
  if (a.add_linear_biases) attention += q + 2 * kv + h;
  std::int64_t mlp = (a.gated ? 3 : 2) * h * f;
  if (a.add_linear_biases) mlp += (a.gated ? 2 : 1) * f + h;
  if (a.is_moe()) mlp = a.num_experts * mlp + a.num_experts * h;
  return (a.tie_word_embeddings ? 1 : 2) * a.vocab_size * h +
         a.num_layers * (attention + mlp + 2 * norm) + norm;
}

// Stands in for a tensor-parallel group: the Model only keeps it for its forward pass.
class UnusedCommunicator final : public Communicator {
 public:
  explicit UnusedCommunicator(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  void all_reduce(Tensor, ReduceOp) override { fail(); }
  void reduce_scatter(Tensor, Tensor, ReduceOp) override { fail(); }
  void reduce(Tensor, int, ReduceOp) override { fail(); }
  void all_gather(Tensor, Tensor) override { fail(); }
  void broadcast(Tensor, int) override { fail(); }
  void send(Tensor, int) override { fail(); }
  void recv(Tensor, int) override { fail(); }
  void send_recv(Tensor, int, Tensor, int) override { fail(); }

 private:
  static void fail() { throw std::logic_error("no collective in this test"); }
  int size_;
};

TEST(ParameterTable, CountsEqualTheClosedForm) {
  for (const Architecture& a : architectures()) {
    const ParameterCount c = count_parameters(a);
    EXPECT_EQ(c.total, closed_form(a)) << architecture_to_json(a);
    EXPECT_EQ(c.embedding, a.vocab_size * a.hidden_size);
    EXPECT_EQ(c.lm_head, a.tie_word_embeddings ? 0 : a.vocab_size * a.hidden_size);
    EXPECT_EQ(c.total, c.embedding + c.lm_head + a.num_layers * c.per_layer + c.final_norm);
  }
}

// The fixtures' architectures as their README describes them.
Architecture fixture_architecture(bool moe, bool tied) {
  Architecture a;
  a.num_layers = 2;
  a.hidden_size = 64;
  a.vocab_size = 1000;
  a.num_attention_heads = 4;
  a.head_groups = 2;
  a.kv_channels = 16;
  a.ffn_hidden_size = 160;
  a.tie_word_embeddings = tied;
  if (moe) {
    a.num_experts = 4;
    a.num_experts_per_token = 2;
  }
  return a;
}

TEST(ParameterTable, NamesAndShapesAreTheFixtures) {
  const std::pair<const char*, Architecture> fixtures[] = {
      {"dev-mistral", fixture_architecture(false, false)},
      {"dev-mixtral", fixture_architecture(true, false)},
      {"dev-tied-nowindow", fixture_architecture(false, true)}};
  for (const auto& [fixture, a] : fixtures) {
    // transformers' gradient of every checkpoint tensor, under its name and with its shape.
    const SafetensorsFile ref = SafetensorsFile::open(std::string(FASTLLM_FIXTURES) + "/" +
                                                      fixture + "/reference.safetensors");
    std::map<std::string, std::vector<std::int64_t>> expected;
    for (const TensorInfo& t : ref.tensors()) {
      if (t.name.rfind("grad.", 0) == 0) expected[t.name.substr(5)] = t.shape;
    }
    std::map<std::string, std::vector<std::int64_t>> table;
    for (const ParameterSpec& p : parameter_table(a))
      table[p.name] = p.shape;
    EXPECT_EQ(table, expected) << fixture;
  }
}

struct LayoutCase {
  int tp, pp;
};

TEST(ParameterTable, EveryRankAllocatesWhatInspectPlans) {
  HostBackend backend;
  for (const Architecture& a : architectures()) {
    for (const LayoutCase lc : {LayoutCase{1, 1}, LayoutCase{2, 1}, LayoutCase{4, 1},
                                LayoutCase{1, 2}, LayoutCase{2, 3}, LayoutCase{4, 5}}) {
      Layout layout;
      layout.tensor_parallel = lc.tp;
      layout.pipeline_parallel = lc.pp;
      layout.validate(a);
      UnusedCommunicator tensor(lc.tp);
      std::int64_t primary = 0;
      for (int pp = 0; pp < lc.pp; ++pp) {
        for (int tp = 0; tp < lc.tp; ++tp) {
          ModelPartition partition;
          partition.layout = layout;
          partition.at.tp = tp;
          partition.at.pp = pp;
          partition.tensor = &tensor;
          const Model model(backend, a, RunSettings{}, partition);
          // inspect plans tensor rank 0, whose vocabulary slice is the largest.
          if (tp == 0) {
            EXPECT_EQ(model.parameter_count(), rank_parameters(a, layout, pp));
          }
          EXPECT_LE(model.parameter_count(), rank_parameters(a, layout, pp));
          for (const Parameter& p : model.parameters())
            primary += p.primary ? p.numel : 0;
        }
      }
      // Every element of the model is held by exactly one primary part.
      EXPECT_EQ(primary, closed_form(a)) << "tp " << lc.tp << " pp " << lc.pp;
    }
  }
}

}  // namespace
}  // namespace fastllm::test
