// Values of the wrong type or out of their domain, from a YAML config, the command line or a
// checkpoint's config.json, end with exit code 2 and one message naming the key or flag, the value
// and what is allowed, before anything large is allocated.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "support/process.h"

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;
const std::string kFixtures = FASTLLM_FIXTURES;

void expect_user_error(const CommandResult& r, const std::vector<std::string>& parts) {
  EXPECT_EQ(r.exit_code, 2) << r.err;
  for (const std::string& part : parts)
    EXPECT_NE(r.err.find(part), std::string::npos) << "missing '" << part << "' in: " << r.err;
  EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;
}

struct YamlCase {
  const char* yaml;
  std::vector<std::string> parts;
};

TEST(ValueErrors, YamlValueOfTheWrongType) {
  const std::vector<YamlCase> cases = {
      {"lr: [1]\n", {"key 'lr'", "a list [1]", "expected one number value"}},
      {"lr: [[1]]\n", {"key 'lr'", "[[1]]", "expected one number value"}},
      {"lr: {a: 1}\n", {"key 'lr'", "a mapping {a: 1}", "expected one number value"}},
      {"lr:\n", {"key 'lr'", "empty (null)", "expected one number value"}},
      {"lr: ~\n", {"key 'lr'", "empty (null)"}},
      {"num_layers: [2, 3]\n", {"key 'num_layers'", "[2, 3]", "one integer value"}},
      {"lr: abc\n", {"key 'lr'", "--lr=abc", "expected a number"}},
      {"data_path: [[1, x]]\n", {"key 'data_path'", "holds a list [1, x]"}},
      {"data_path: {a: b}\n", {"key 'data_path'", "a mapping", "a list of values"}},
      {"? [a, b]\n: 1\n", {"a key is a list [a, b]", "expected a flag name"}},
  };
  for (const YamlCase& c : cases) {
    TempDir dir;
    std::ofstream(dir / "run.yaml") << c.yaml;
    const std::string path = (dir / "run.yaml").string();
    std::vector<std::string> parts = c.parts;
    parts.push_back(path);
    SCOPED_TRACE(c.yaml);
    expect_user_error(run_fastllm("train --config " + path), parts);
  }
}

TEST(ValueErrors, YamlListFlagStillTakesAList) {
  TempDir dir;
  std::ofstream(dir / "run.yaml") << "data_path: [1.0, " << (dir / "missing").string() << "]\n";
  const CommandResult r =
      run_fastllm("train --config " + (dir / "run.yaml").string() +
                  " --train_iters=1 --batch_size=1 --micro_batch_size=1 --sequence_length=8 "
                  "--num_layers=1 --hidden_size=16 --num_attention_heads=2 --vocab_size=50");
  // Past the YAML: the dataset it names is what is missing.
  expect_user_error(r, {(dir / "missing").string()});
}

TEST(ValueErrors, AbsurdModelSizesAreRefusedBeforeAllocation) {
  expect_user_error(run_fastllm("inspect --num_layers=100000"),
                    {"--num_layers=100000", "fewer than 2^40 = 1099511627776"});
  expect_user_error(run_fastllm("inspect --vocab_size=3000000000"),
                    {"--vocab_size=3000000000", "expected at most 2147483647"});
  expect_user_error(run_fastllm("inspect --hidden_size=4000000000 --num_attention_heads=1"),
                    {"--hidden_size=4000000000", "expected at most 2147483647"});
  // The largest published shapes stay admitted: Llama-3.1-405B.
  const CommandResult llama = run_fastllm(
      "inspect --num_layers=126 --hidden_size=16384 --vocab_size=128256 --num_attention_heads=128 "
      "--head_groups=8 --ffn_hidden_size=53248 --tie_word_embeddings=0");
  EXPECT_EQ(llama.exit_code, 0) << llama.err;
  EXPECT_NE(llama.out.find("405"), std::string::npos) << llama.out;
}

TEST(ValueErrors, ModelBeyondTheMachinesMemoryIsRefusedBeforeTraining) {
  // 4000 layers of width 1024: 6.7e10 parameters, a terabyte of fp32 training state.
  const CommandResult r = run_fastllm(
      "train --num_layers=4000 --train_iters=1 --batch_size=1 --micro_batch_size=1 "
      "--sequence_length=8 --data_path=unused");
  expect_user_error(r, {"--num_layers=4000", "GiB per rank on the host backend", "this machine"});
}

const std::string kTrain =
    "train --train_iters=1 --batch_size=1 --micro_batch_size=1 --sequence_length=8 "
    "--num_layers=1 --hidden_size=16 --num_attention_heads=2 --vocab_size=50 --data_path=unused ";

TEST(ValueErrors, OptimizerAndEvaluationValuesOutOfDomain) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"--lr=-1", {"--lr=-1", "expected >= 0"}},
      {"--min_lr=-0.5", {"--min_lr=-0.5", "expected >= 0"}},
      {"--adam_beta1=1.5", {"--adam_beta1=1.5", "[0, 1)"}},
      {"--adam_beta1=-0.1", {"--adam_beta1=-0.1", "[0, 1)"}},
      {"--adam_beta2=1", {"--adam_beta2=1", "[0, 1)"}},
      {"--adam_eps=0", {"--adam_eps=0", "expected > 0"}},
      {"--clip_grad=-1", {"--clip_grad=-1", "expected >= 0"}},
      {"--weight_decay=-0.1", {"--weight_decay=-0.1", "expected >= 0"}},
      {"--eval_interval=10 --eval_iters=0",
       {"--eval_iters=0", "expected >= 1", "--eval_interval=10"}},
      {"--eval_interval=-1", {"--eval_interval=-1", "expected >= 0"}},
      {"--eval_interval=5 --split=100,0,0", {"--split=100,0,0", "validation", "--eval_interval=5"}},
  };
  for (const auto& [flags, parts] : cases) {
    SCOPED_TRACE(flags);
    expect_user_error(run_fastllm(kTrain + flags), parts);
  }
}

// dev-mistral-bf16 (one file, 2 layers, untied, vocabulary 1000, hidden 64) beside an edited
// config.json.
class EditedConfig {
 public:
  template <class Edit>
  explicit EditedConfig(Edit edit) {
    const std::string source = kFixtures + "/dev-mistral-bf16";
    nlohmann::json config = nlohmann::json::parse(read_text(source + "/config.json"));
    edit(config);
    std::ofstream(dir_ / "config.json") << config.dump(2);
    fs::create_symlink(source + "/model.safetensors", dir_ / "model.safetensors");
  }
  std::string path() const { return dir_.path().string(); }

 private:
  TempDir dir_;
};

TEST(ValueErrors, ConfigDisagreeingWithTheWeightsIsFoundFromTheHeaders) {
  EditedConfig config([](nlohmann::json& c) { c["vocab_size"] = 30'000'000; });
  expect_user_error(run_fastllm("inspect --pretrained_checkpoint_path=" + config.path()),
                    {config.path(), "model.embed_tokens.weight has shape [1000, 64]",
                     "the architecture expects [30000000, 64]"});
}

TEST(ValueErrors, CheckpointTensorTheArchitectureDoesNotUse) {
  EditedConfig fewer_layers([](nlohmann::json& c) { c["num_hidden_layers"] = 1; });
  expect_user_error(run_fastllm("inspect --pretrained_checkpoint_path=" + fewer_layers.path()),
                    {fewer_layers.path(), "tensor model.layers.1.",
                     "is not used by the architecture", "layer 1 but the config has num_layers 1"});
  EditedConfig tied([](nlohmann::json& c) { c["tie_word_embeddings"] = true; });
  expect_user_error(
      run_fastllm("inspect --pretrained_checkpoint_path=" + tied.path()),
      {tied.path(), "tensor lm_head.weight [1000, 64] is not used", "tie_word_embeddings true"});
}

}  // namespace
}  // namespace fastllm::test
