// `fastllm train` under mpiexec in data x tensor x pipeline layouts, ZeRO 0, 1 and 2: the loss
// and gradient norm of each of 12 steps within 1e-5 relative of the single-rank run with the same
// micro-batches (and, for the fixtures' own trajectories, of transformers' losses).
#include <gtest/gtest.h>

#include "io/safetensors.h"
#include "parallel_support.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

constexpr int kSteps = 12;

struct Case {
  std::string name;
  std::string model_flags;
  std::string data;  // the fixture whose trajectory batches are the data, in order
  std::int64_t micro_batch_size = 1;
  Shape shape;
  int zero_stage = 0;
  std::string trajectory;  // the fixture whose transformers trajectory these flags reproduce
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

class TrainLayouts : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { seq_ = write_trajectory_dataset(GetParam().data, data()); }
  std::string data() const { return (dir_ / "data").string(); }
  // The fixtures' optimizer settings (AdamW lr 3e-3, betas (0.9, 0.95), no decay, no clipping).
  std::string train_args(const Case& c, const std::string& save) const {
    return "train " + c.model_flags + " --data_path=" + data() +
           " --data_sampling=document --data_shuffle=0 --split=1,0,0 --sequence_length=" +
           std::to_string(seq_) +
           " --batch_size=2 --micro_batch_size=" + std::to_string(c.micro_batch_size) +
           " --lr=0.003 --lr_decay_style=constant --adam_beta1=0.9 --adam_beta2=0.95 "
           "--adam_eps=1e-8 --weight_decay=0 --clip_grad=0 --log_interval=1 --train_iters=" +
           std::to_string(kSteps) + " --save=" + save;
  }

  TempDir dir_;
  std::int64_t seq_ = 0;
};

TEST_P(TrainLayouts, MatchesOneRank) {
  const Case& c = GetParam();
  const std::string single = (dir_ / "single").string(), layout = (dir_ / "layout").string();
  const CommandResult one = run_fastllm(train_args(c, single));
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const CommandResult r =
      run_mpi(c.shape.ranks(), train_args(c, layout) + c.shape.flags() +
                                   " --zero_stage=" + std::to_string(c.zero_stage));
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("layout data " + std::to_string(c.shape.dp) + " x tensor " +
                       std::to_string(c.shape.tp) + " x pipeline " + std::to_string(c.shape.pp)),
            std::string::npos)
      << r.out;

  const auto expected = metrics(single, "loss"), got = metrics(layout, "loss");
  ASSERT_EQ(expected.size(), static_cast<std::size_t>(kSteps));
  ASSERT_EQ(got.size(), expected.size());
  for (std::size_t s = 0; s < got.size(); ++s) {
    for (const char* key : {"loss", "grad_norm"}) {
      const double a = got[s][key], b = expected[s][key];
      EXPECT_LE(std::fabs(a - b) / std::fabs(b), 1e-5) << key << " of step " << s + 1;
    }
  }
  if (c.trajectory.empty()) return;
  const SafetensorsFile reference =
      SafetensorsFile::open(kFixtureDir + "/" + c.trajectory + "/trajectory.safetensors");
  const std::vector<float> losses = reference.read_f32("losses");
  for (std::size_t s = 0; s < losses.size() && s < got.size(); ++s)
    EXPECT_LE(std::fabs(got[s]["loss"].get<double>() - losses[s]) / losses[s], 1e-5) << s + 1;
}

// The quick cases run by default; the others are labelled slow (FASTLLM_SLOW_CASES selects them).
const std::vector<std::string> kQuick = {
    "mistral_2x1x1_zero1", "mistral_1x2x1",        "mistral_1x1x2",         "mistral_2x2x2_zero1",
    "mistral_1x4x1",       "mixtral_1x1x2",        "mixtral_2x2x2_zero1",   "tied_2x2x2_zero1",
    "biases_2x2x2_zero1",  "moebiases_1x4x1",      "mistralsp_2x2x2_zero1", "mixtralsp_1x2x2",
    "biasessp_1x2x1",      "tp3sp_1x3x1",          "mistral_2x2x2_zero2",   "mixtral_2x2x1_zero2",
    "tied_2x1x2_zero2",    "mistralsp_2x2x1_zero2"};

std::vector<Case> cases() {
  const std::vector<std::pair<Shape, int>> all = {{{2, 1, 1}, 0}, {{2, 1, 1}, 1}, {{1, 2, 1}, 0},
                                                  {{1, 1, 2}, 0}, {{1, 1, 2}, 1}, {{2, 2, 1}, 0},
                                                  {{2, 2, 1}, 1}, {{1, 2, 2}, 0}, {{2, 2, 2}, 0},
                                                  {{2, 2, 2}, 1}, {{1, 4, 1}, 0}};
  std::vector<Case> out;
  auto add = [&](const std::string& name, const std::string& flags, const std::string& data,
                 std::int64_t micro, const std::string& trajectory,
                 const std::vector<std::pair<Shape, int>>& shapes) {
    for (const auto& [shape, zero] : shapes)
      out.push_back({name + "_" + shape.name() + (zero ? "_zero" + std::to_string(zero) : ""),
                     flags, data, micro, shape, zero, trajectory});
  };
  // The fixture's trajectory (two micro-batches of one sequence per step).
  add("mistral", fixture_model("dev-mistral"), "dev-mistral", 1, "dev-mistral", all);
  // Mixtral on its trajectory's batches (their 8 steps, then again from the first), one sequence
  // per micro-batch: its load-balancing loss is per micro-batch, so every layout runs the same
  // micro-batches as the single rank.
  add("mixtral", fixture_model("dev-mixtral"), "dev-mixtral", 1, "", all);
  // Both sequences in one micro-batch, as transformers computed its loss: layouts without data
  // parallelism.
  add("mixtralbatch2", fixture_model("dev-mixtral"), "dev-mixtral", 2, "dev-mixtral",
      {{{1, 2, 1}, 0}, {{1, 1, 2}, 0}, {{1, 2, 2}, 0}, {{1, 4, 1}, 0}});
  add("tied", fixture_model("dev-tied-nowindow"), "dev-mistral", 1, "",
      {{{1, 1, 2}, 0}, {{2, 2, 2}, 1}, {{1, 4, 1}, 0}});
  // From scratch: LayerNorm, biases (the row-parallel ones added once), ungated GeLU and a
  // vocabulary no TP size divides; after the first update every bias is non-zero.
  add("biases",
      fixture_model("dev-mistral") +
          " --load_pretrained_weights=0 --vocab_size=1001 --add_linear_biases=1 "
          "--normalization_type=layer_norm --gated=0 --activation_type=gelu",
      "dev-mistral", 1, "", {{{1, 2, 1}, 0}, {{2, 2, 2}, 1}, {{1, 4, 1}, 0}, {{1, 2, 2}, 0}});
  add("moebiases",
      fixture_model("dev-mixtral") +
          " --load_pretrained_weights=0 --vocab_size=1001 "
          "--add_linear_biases=1",
      "dev-mixtral", 1, "", {{{1, 2, 1}, 0}, {{2, 2, 2}, 1}, {{1, 4, 1}, 0}});
  // Sequence parallelism: the same steps within 1e-5, dense and MoE, norms with biases (whose
  // gradients come from each rank's tokens), and tensor-parallel sizes 2, 3 and 4.
  const std::string sp = " --sequence_parallel=1";
  add("mistralsp", fixture_model("dev-mistral") + sp, "dev-mistral", 1, "dev-mistral",
      {{{2, 2, 2}, 1}, {{1, 4, 1}, 0}, {{1, 2, 2}, 0}});
  add("mixtralsp", fixture_model("dev-mixtral") + sp, "dev-mixtral", 1, "",
      {{{1, 2, 2}, 0}, {{2, 2, 1}, 1}, {{1, 4, 1}, 0}});
  add("biasessp",
      fixture_model("dev-mistral") +
          " --load_pretrained_weights=0 --add_linear_biases=1 --normalization_type=layer_norm" + sp,
      "dev-mistral", 1, "", {{{1, 2, 1}, 0}, {{2, 2, 2}, 1}});
  add("tp3sp",
      fixture_model("dev-mistral") +
          " --load_pretrained_weights=0 --num_attention_heads=6 --head_groups=3 "
          "--ffn_hidden_size=192 --vocab_size=1001" +
          sp,
      "dev-mistral", 1, "", {{{1, 3, 1}, 0}, {{2, 3, 1}, 1}});
  // ZeRO-2: gradients reduced into each shard bucket by bucket during backward, with pipeline
  // stages (the tied embedding's buckets wait for the end of the step), MoE, sequence parallelism
  // and key/value heads replicated over tensor-parallel ranks.
  add("mistral", fixture_model("dev-mistral"), "dev-mistral", 1, "dev-mistral",
      {{{2, 1, 1}, 2}, {{2, 2, 2}, 2}});
  add("mixtral", fixture_model("dev-mixtral"), "dev-mixtral", 1, "", {{{2, 2, 1}, 2}});
  add("tied", fixture_model("dev-tied-nowindow"), "dev-mistral", 1, "", {{{2, 1, 2}, 2}});
  add("mistralsp", fixture_model("dev-mistral") + sp, "dev-mistral", 1, "dev-mistral",
      {{{2, 2, 1}, 2}});
  add("kvreplicas", fixture_model("dev-mistral"), "dev-mistral", 1, "dev-mistral",
      {{{2, 4, 1}, 2}});
  std::erase_if(out, [](const Case& c) {
    const bool quick = std::find(kQuick.begin(), kQuick.end(), c.name) != kQuick.end();
    return quick == static_cast<bool>(FASTLLM_SLOW_CASES);
  });
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, TrainLayouts, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
