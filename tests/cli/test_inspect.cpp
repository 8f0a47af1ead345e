// `fastllm inspect` from the command line: parameter counts of the published models (figures from
// the models' own documentation), the sources of resolved values, and each bad input's message.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "support/process.h"

namespace fastllm::test {
namespace {

const std::string kFixtures = FASTLLM_FIXTURES;

const std::string kMistralFlags =
    "--num_layers=32 --hidden_size=4096 --vocab_size=32000 --num_attention_heads=32 "
    "--head_groups=8 --add_linear_biases=0 --ffn_hidden_size=14336 --kv_channels=128 "
    "--use_rotary_embeddings=1 --rotary_embedding_scale=-9.210340371976184 --gated=1 "
    "--activation_type=silu --normalization_type=rms_norm --tie_word_embeddings=0";

// A Hugging Face folder holding the given config.json text.
class ConfigFolder {
 public:
  explicit ConfigFolder(const std::string& config_text) {
    std::ofstream(dir_ / "config.json") << config_text;
  }
  static ConfigFolder from_file(const std::string& path) { return ConfigFolder(read_text(path)); }
  std::string path() const { return dir_.path().string(); }

 private:
  TempDir dir_;
};

nlohmann::json inspect_json(const std::string& args) {
  CommandResult r = run_fastllm("inspect --format=json " + args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return nlohmann::json::parse(r.out);
}

// config.json of dev-mistral with one key replaced (or removed when value is null).
std::string edited_config(const std::string& key, const nlohmann::json& value) {
  auto config = nlohmann::json::parse(read_text(kFixtures + "/dev-mistral/config.json"));
  if (value.is_discarded()) {
    config.erase(key);
  } else {
    config[key] = value;
  }
  return config.dump();
}

const nlohmann::json kRemove = nlohmann::json::value_t::discarded;

TEST(Inspect, Mistral7BFromCheckpointConfig) {
  auto folder = ConfigFolder::from_file(kFixtures + "/configs/Mistral-7B-v0.1.config.json");
  auto j = inspect_json("--pretrained_checkpoint_type=huggingface --pretrained_checkpoint_path=" +
                        folder.path());
  EXPECT_EQ(j["parameters"]["total"], 7241732096LL);
  EXPECT_EQ(j["architecture"]["window_size"]["value"], "4096");
  EXPECT_EQ(j["architecture"]["window_size"]["source"], "checkpoint");
  EXPECT_EQ(j["architecture"]["head_groups"]["value"], "8");
  // The text form says the same.
  CommandResult text = run_fastllm("inspect --pretrained_checkpoint_path=" + folder.path());
  EXPECT_NE(text.out.find("7,241,732,096"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("window 4096"), std::string::npos) << text.out;
}

// Issue 9's plan: Mistral-7B on one rank with full recompute, micro-batch 1 x 4096 tokens, fits the
// 139 GiB of an H200; without recompute its activations do not fit the card's 141 GB.
TEST(Inspect, Mistral7BActivationPlan) {
  const std::string base = kMistralFlags + " --micro_batch_size=1 --sequence_length=4096";
  const double gib = 1024.0 * 1024.0 * 1024.0;
  auto full = inspect_json(base + " --recompute=full --device_memory=149.25");
  const auto& stage = full["stages"][0];
  EXPECT_TRUE(stage["fits"].get<bool>()) << stage.dump();
  EXPECT_LT(stage["total_bytes"].get<double>(), 139 * gib);
  // Static state: 18 bytes a parameter; the layer inputs of 32 layers in bf16 (32 x 4096 x 4096 x
  // 2 bytes = 1 GiB) and the last layer whole come on top.
  EXPECT_NEAR(stage["weight_bytes"].get<double>() + stage["gradient_bytes"].get<double>() +
                  stage["optimizer_bytes"].get<double>(),
              18.0 * 7241732096.0, 1.0);
  EXPECT_GT(stage["activation_bytes"].get<double>(), 1.0 * gib);
  EXPECT_LT(stage["activation_bytes"].get<double>(), 2.0 * gib);
  // The logits of 4096 tokens x 32000 in bf16, the final norm's output and the loss statistics.
  EXPECT_NEAR(stage["logits_bytes"].get<double>(), 4096.0 * (32000 * 2 + 4096 * 2 + 5 * 4), 1.0);

  auto none = inspect_json(base + " --recompute=none --device_memory=141");
  EXPECT_FALSE(none["stages"][0]["fits"].get<bool>());
  EXPECT_GT(none["stages"][0]["activation_bytes"].get<double>(),
            10 * stage["activation_bytes"].get<double>());
  auto selective = inspect_json(base + " --recompute=selective");
  EXPECT_LT(selective["stages"][0]["activation_bytes"].get<double>(),
            none["stages"][0]["activation_bytes"].get<double>());
  // The text form says whether it fits.
  const CommandResult text =
      run_fastllm("inspect " + base + " --recompute=none --device_memory=141");
  EXPECT_NE(text.out.find("DOES NOT FIT"), std::string::npos) << text.out;
}

// ZeRO-2 divides the gradients by the data-parallel size (plus the bucket being reduced) and
// sequence parallelism the activations outside the tensor-parallel regions by the tensor size.
TEST(Inspect, Zero2AndSequenceParallelPlans) {
  const std::string base = kMistralFlags +
                           " --tensor_parallel=8 --data_parallel=8 --micro_batch_size=1 "
                           "--sequence_length=4096 --recompute=selective";
  const auto zero1 = inspect_json(base + " --zero_stage=1")["stages"][0];
  const auto zero2 = inspect_json(base + " --zero_stage=2")["stages"][0];
  const double params = zero1["parameters_per_rank"].get<double>();
  EXPECT_DOUBLE_EQ(zero1["gradient_bytes"].get<double>(), 4 * params);
  EXPECT_GT(zero2["gradient_bytes"].get<double>(), 4 * params / 8);
  EXPECT_LT(zero2["gradient_bytes"].get<double>(), 4 * params / 8 + 0.4 * 4 * params);
  EXPECT_EQ(zero2["optimizer_bytes"], zero1["optimizer_bytes"]);
  const auto sp = inspect_json(base + " --zero_stage=1 --sequence_parallel=1")["stages"][0];
  EXPECT_LT(sp["activation_bytes"].get<double>(), zero1["activation_bytes"].get<double>());
  EXPECT_EQ(sp["logits_bytes"].get<double>() < zero1["logits_bytes"].get<double>(), true);
}

TEST(Inspect, Mixtral8x7BFromCheckpointConfig) {
  auto folder = ConfigFolder::from_file(kFixtures + "/configs/Mixtral-8x7B-v0.1.config.json");
  auto j = inspect_json("--pretrained_checkpoint_path=" + folder.path());
  EXPECT_EQ(j["parameters"]["total"], 46702792704LL);
  EXPECT_EQ(j["architecture"]["num_experts"]["value"], "8");
  EXPECT_EQ(j["architecture"]["window_size"]["value"], "0");  // sliding_window: null
  EXPECT_NEAR(j["rope_theta"].get<double>(), 1e6, 1e-3);
}

TEST(Inspect, TutorialFlags) {
  EXPECT_EQ(inspect_json(kMistralFlags)["parameters"]["total"], 7241732096LL);
  auto moe = inspect_json(kMistralFlags + " --num_experts=8 --num_experts_per_token=2");
  EXPECT_EQ(moe["parameters"]["total"], 46702792704LL);
  EXPECT_EQ(moe["architecture"]["num_layers"]["source"], "flag");
}

TEST(Inspect, FlagsWinOverConfigFile) {
  TempDir dir;
  std::ofstream(dir / "run.yaml") << "num_layers: 3\nhidden_size: 256\nnum_attention_heads: 4\n";
  auto j = inspect_json("--config " + (dir / "run.yaml").string() + " --num_layers 5");
  EXPECT_EQ(j["architecture"]["num_layers"]["value"], "5");
  EXPECT_EQ(j["architecture"]["num_layers"]["source"], "flag");
  EXPECT_EQ(j["architecture"]["hidden_size"]["value"], "256");
  EXPECT_EQ(j["architecture"]["hidden_size"]["source"], "config file");
  EXPECT_EQ(j["architecture"]["kv_channels"]["value"], "64");
}

TEST(Inspect, RunSettingFlagOverridesCheckpoint) {
  auto j =
      inspect_json("--pretrained_checkpoint_path=" + kFixtures + "/dev-mistral --window_size=8");
  EXPECT_EQ(j["architecture"]["window_size"]["value"], "8");
  EXPECT_EQ(j["architecture"]["window_size"]["source"], "flag");
}

TEST(Inspect, ArchitectureFlagOverridesWithoutPretrainedWeights) {
  auto j = inspect_json("--pretrained_checkpoint_path=" + kFixtures +
                        "/dev-mistral --load_pretrained_weights=0 --num_layers=3");
  EXPECT_EQ(j["architecture"]["num_layers"]["value"], "3");
  EXPECT_EQ(j["architecture"]["hidden_size"]["source"], "checkpoint");
}

TEST(Inspect, ConfigVariants) {
  // head_dim different from hidden / heads.
  ConfigFolder head_dim(edited_config("head_dim", 32));
  auto j = inspect_json("--pretrained_checkpoint_path=" + head_dim.path());
  EXPECT_EQ(j["architecture"]["kv_channels"]["value"], "32");
  // num_key_value_heads absent: one KV head per query head.
  ConfigFolder no_kv(edited_config("num_key_value_heads", kRemove));
  EXPECT_EQ(inspect_json("--pretrained_checkpoint_path=" +
                         no_kv.path())["architecture"]["head_groups"]["value"],
            "4");
  // Top-level rope_theta as older checkpoints have it.
  auto config = nlohmann::json::parse(edited_config("rope_parameters", kRemove));
  config["rope_theta"] = 500000.0;
  ConfigFolder old_rope(config.dump());
  EXPECT_NEAR(
      inspect_json("--pretrained_checkpoint_path=" + old_rope.path())["rope_theta"].get<double>(),
      500000.0, 1e-6);
  // Llama: no sliding window.
  ConfigFolder llama(edited_config("model_type", "llama"));
  EXPECT_EQ(inspect_json("--pretrained_checkpoint_path=" + llama.path())["parameters"]["total"],
            inspect_json("--pretrained_checkpoint_path=" + kFixtures +
                         "/dev-mistral")["parameters"]["total"]);
  ConfigFolder tied(read_text(kFixtures + "/dev-tied-nowindow/config.json"));
  auto t = inspect_json("--pretrained_checkpoint_path=" + tied.path());
  EXPECT_EQ(t["parameters"]["lm_head"], 0);
  EXPECT_EQ(t["architecture"]["window_size"]["value"], "0");
}

struct BadCase {
  std::string name;
  std::string args;
  std::string message;  // a piece the error must contain
};

class InspectBadInput : public ::testing::TestWithParam<BadCase> {};

TEST_P(InspectBadInput, ClearErrorExitTwo) {
  CommandResult r = run_fastllm("inspect " + GetParam().args);
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find(GetParam().message), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

const std::string kDev = "--pretrained_checkpoint_path=" + kFixtures + "/dev-mistral ";

INSTANTIATE_TEST_SUITE_P(
    Cases, InspectBadInput,
    ::testing::Values(
        BadCase{"UnknownFlag", "--num_layerz=3", "unknown flag --num_layerz"},
        BadCase{"MalformedInt", "--num_layers=abc", "--num_layers=abc: expected an integer"},
        BadCase{"MalformedBool", "--gated=yes", "--gated=yes: expected 0 or 1"},
        BadCase{"BadChoice", "--activation_type=relu", "expected one of silu|gelu"},
        BadCase{"Contradiction", kDev + "--num_layers=3",
                "--num_layers=3 contradicts the checkpoint"},
        BadCase{"ContradictionNamesWayOut", kDev + "--hidden_size=96",
                "--load_pretrained_weights=0"},
        BadCase{"MissingFolder", "--pretrained_checkpoint_path=/nonexistent/folder",
                "/nonexistent/folder: not a folder"},
        BadCase{"HeadsNotDivisible", "--num_attention_heads=6 --head_groups=4",
                "--head_groups=4 must divide --num_attention_heads=6"},
        BadCase{"TensorParallelHeads",
                "--num_attention_heads=6 --hidden_size=96 --tensor_parallel=4",
                "--tensor_parallel=4 does not divide --num_attention_heads=6"},
        BadCase{"StagesAboveLayers", "--num_layers=2 --pipeline_parallel=3",
                "--pipeline_parallel=3 exceeds --num_layers=2"},
        BadCase{"NoRotary", "--use_rotary_embeddings=0", "absolute position embeddings"},
        BadCase{"MissingConfigFile", "--config /nonexistent.yaml",
                "/nonexistent.yaml: file not found"},
        BadCase{"Positional", "model.yaml", "unexpected argument 'model.yaml'"}),
    [](const auto& info) { return info.param.name; });

class InspectBadConfig : public ::testing::TestWithParam<BadCase> {};

TEST_P(InspectBadConfig, ClearErrorExitTwo) {
  const BadCase& c = GetParam();
  ConfigFolder folder(c.args);
  CommandResult r = run_fastllm("inspect --pretrained_checkpoint_path=" + folder.path());
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find(c.message), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("config.json"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, InspectBadConfig,
    ::testing::Values(BadCase{"MissingKey", edited_config("hidden_size", kRemove),
                              "missing required key 'hidden_size'"},
                      BadCase{"UnsupportedModel", edited_config("model_type", "gpt2"),
                              "model_type 'gpt2' is not supported"},
                      BadCase{"RopeScaling",
                              edited_config("rope_parameters",
                                            {{"rope_type", "yarn"}, {"rope_theta", 1e4}}),
                              "only rope_type 'default' is implemented"},
                      BadCase{"OldRopeScaling",
                              edited_config("rope_scaling", {{"type", "linear"}, {"factor", 2}}),
                              "rope scaling is not implemented"},
                      BadCase{"NotJson", "{ not json", "not valid JSON"},
                      BadCase{"WrongType", edited_config("num_hidden_layers", "two"),
                              "'num_hidden_layers' = \"two\", expected a positive integer"},
                      BadCase{"Activation", edited_config("hidden_act", "gelu_pytorch_tanh"),
                              "'hidden_act' = \"gelu_pytorch_tanh\" is not supported"}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
