// `fastllm export` writes a complete Hugging Face model (tokenizer, special token ids, generation
// config, exact rope theta, the context length) and never mixes it with another model's files.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <span>

#include "io/safetensors.h"
#include "model/hf_export.h"
#include "train/train_support.h"

namespace fastllm::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kTokenizer = FASTLLM_TEST_TOKENIZER;  // spm_train: <unk> 0, <s> 1, </s> 2

std::set<std::string> names_in(const fs::path& folder) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(folder))
    names.insert(e.path().filename().string());
  return names;
}

json read_json(const fs::path& path) {
  return json::parse(read_text(path));
}

// A Hugging Face folder of links to the fixture's files, so that files can be added to it.
fs::path linked_fixture(const TempDir& dir, const std::string& fixture) {
  const fs::path folder = dir / ("src-" + fixture);
  fs::create_directories(folder);
  for (const auto& e : fs::directory_iterator(kFixtures + "/" + fixture))
    fs::create_symlink(e.path(), folder / e.path().filename());
  return folder;
}

std::string convert(const TempDir& dir, const std::string& source) {
  const std::string ckpt = (dir / "ckpt").string();
  const CommandResult r =
      run_fastllm("convert --pretrained_checkpoint_path=" + source + " --save=" + ckpt);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return ckpt;
}

TEST(ExportHf, ExactRopeTheta) {
  // The scales that -ln(10000) and -ln(1e6) round to, as Python's repr writes them.
  EXPECT_EQ(exact_rope_theta(-9.210340371976184), 10000.0);
  EXPECT_EQ(exact_rope_theta(-13.815510557964274), 1000000.0);
  EXPECT_NE(std::exp(9.210340371976184), 10000.0);  // what rounding through the scale gave
  // A scale no round number reproduces: the theta found has exactly that -ln.
  const double theta = exact_rope_theta(-9.21);
  EXPECT_EQ(-std::log(theta), -9.21);
  EXPECT_NEAR(theta, 9996.596859437876, 1e-9);  // Python: math.exp(9.21)
}

TEST(ExportHf, CompleteFolderWithTokenizer) {
  TempDir dir;
  const std::string ckpt = convert(dir, kFixtures + "/dev-mistral");
  const fs::path out = dir / "hf";
  const CommandResult r = run_fastllm("export --load=" + ckpt + " --output=" + out.string() +
                                      " --dtype=fp32 --tokenizer=" + kTokenizer);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(names_in(out),
            (std::set<std::string>{"config.json", "generation_config.json", "model.safetensors",
                                   "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                   "tokenizer_config.json"}));
  EXPECT_EQ(read_text(out / "tokenizer.model"), read_text(kTokenizer));
  // Generated from tokenizer.model (tests/model/test_hf_tokenizer_json.cpp checks its content).
  const json tokenizer_json = read_json(out / "tokenizer.json");
  EXPECT_EQ(tokenizer_json["model"]["type"], "BPE");
  EXPECT_EQ(tokenizer_json["post_processor"]["special_tokens"]["<s>"]["ids"], json::array({1}));

  const json config = read_json(out / "config.json");
  EXPECT_EQ(config["bos_token_id"], 1);
  EXPECT_EQ(config["eos_token_id"], 2);
  EXPECT_EQ(config["max_position_embeddings"], 512);  // dev-mistral's config.json
  EXPECT_EQ(config["sliding_window"], 16);
  EXPECT_EQ(config["rope_theta"].get<double>(), 10000.0);
  EXPECT_NE(read_text(out / "config.json").find("\"rope_theta\": 10000.0,"), std::string::npos);

  EXPECT_EQ(read_json(out / "generation_config.json"),
            json::parse(R"({"bos_token_id": 1, "eos_token_id": 2})"));

  const json tok = read_json(out / "tokenizer_config.json");
  EXPECT_EQ(tok["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(tok["add_bos_token"], true);
  EXPECT_EQ(tok["add_eos_token"], false);
  EXPECT_EQ(tok["bos_token"], "<s>");
  EXPECT_EQ(tok["eos_token"], "</s>");
  EXPECT_EQ(tok["unk_token"], "<unk>");
  EXPECT_TRUE(tok["pad_token"].is_null());
  EXPECT_EQ(tok["model_max_length"], 512);
  EXPECT_EQ(tok["legacy"], true);
  EXPECT_EQ(tok["added_tokens_decoder"]["0"]["content"], "<unk>");
  EXPECT_EQ(tok["added_tokens_decoder"]["1"]["content"], "<s>");
  EXPECT_EQ(tok["added_tokens_decoder"]["2"]["content"], "</s>");
  EXPECT_EQ(tok["added_tokens_decoder"]["2"]["special"], true);

  const json map = read_json(out / "special_tokens_map.json");
  EXPECT_EQ(map["bos_token"]["content"], "<s>");
  EXPECT_EQ(map["eos_token"]["content"], "</s>");
  EXPECT_EQ(map["unk_token"]["content"], "<unk>");
}

TEST(ExportHf, TokenizerOfTheSourceFolderByDefault) {
  TempDir dir;
  const fs::path source = linked_fixture(dir, "dev-mixtral");
  fs::copy_file(kTokenizer, source / "tokenizer.model");
  const std::string ckpt = convert(dir, source.string());
  const fs::path out = dir / "hf";
  const CommandResult r = run_fastllm("export --load=" + ckpt + " --output=" + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(read_text(out / "tokenizer.model"), read_text(kTokenizer));
  EXPECT_TRUE(fs::exists(out / "tokenizer_config.json"));
  const json config = read_json(out / "config.json");
  EXPECT_EQ(config["model_type"], "mixtral");
  EXPECT_EQ(config["bos_token_id"], 1);
  EXPECT_EQ(config["eos_token_id"], 2);
}

// A Hugging Face folder's tokenizer.json (the upstream's) is shipped as it is, whether the folder
// is
// --tokenizer or the one the run was converted from; a lone tokenizer.model gets a generated one.
TEST(ExportHf, UpstreamTokenizerJsonIsShippedAsItIs) {
  TempDir dir;
  const fs::path source = linked_fixture(dir, "dev-mistral");
  fs::copy_file(kTokenizer, source / "tokenizer.model");
  const std::string upstream = R"({"version": "1.0", "model": {"type": "upstream"}})";
  { std::ofstream(source / "tokenizer.json") << upstream; }
  const std::string ckpt = convert(dir, source.string());
  for (const std::string& flag : {std::string(), " --tokenizer=" + source.string(),
                                  " --tokenizer=" + (source / "tokenizer.model").string()}) {
    const fs::path out = dir / "hf";
    fs::remove_all(out);
    const CommandResult r =
        run_fastllm("export --load=" + ckpt + " --output=" + out.string() + flag);
    ASSERT_EQ(r.exit_code, 0) << flag << r.err;
    EXPECT_EQ(read_text(out / "tokenizer.json"), upstream) << flag;
  }
  const fs::path out = dir / "hf-lone";
  const CommandResult r = run_fastllm("export --load=" + ckpt + " --output=" + out.string() +
                                      " --tokenizer=" + kTokenizer);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(read_json(out / "tokenizer.json")["model"]["type"], "BPE");
}

TEST(ExportHf, WithoutTokenizerMistralIdsAndANote) {
  TempDir dir;
  const std::string ckpt = convert(dir, kFixtures + "/dev-tied-nowindow");
  const fs::path out = dir / "hf";
  const CommandResult r = run_fastllm("export --load=" + ckpt + " --output=" + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("no tokenizer"), std::string::npos) << r.err;
  EXPECT_EQ(names_in(out),
            (std::set<std::string>{"config.json", "generation_config.json", "model.safetensors"}));
  const json config = read_json(out / "config.json");
  EXPECT_EQ(config["bos_token_id"], 1);
  EXPECT_EQ(config["eos_token_id"], 2);
  EXPECT_TRUE(config["sliding_window"].is_null());
}

TEST(ExportHf, InvalidTokenizerIsRefusedBeforeWriting) {
  TempDir dir;
  const std::string ckpt = convert(dir, kFixtures + "/dev-mistral");
  const CommandResult r =
      run_fastllm("export --load=" + ckpt + " --output=" + (dir / "hf").string() +
                  " --tokenizer=" + kFixtures + "/dev-mistral/config.json");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("not a SentencePiece model"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "hf"));
}

// A model trained from scratch: the context is the trained --sequence_length, and the theta of
// --rotary_embedding_scale comes out round.
TEST(ExportHf, ScratchModelTakesTheTrainedSequenceLength) {
  TempDir dir;
  const std::string data = (dir / "data").string();
  write_trajectory_dataset("dev-mistral", data);
  const std::string run = (dir / "run").string();
  const CommandResult t = run_fastllm(
      "train --num_layers=1 --hidden_size=32 --num_attention_heads=2 --vocab_size=1000 "
      "--ffn_hidden_size=64 --rotary_embedding_scale=-13.815510557964274 --data_path=" +
      data + " --split=1,0,0 --sequence_length=24 --batch_size=2 --train_iters=1 --save=" + run);
  ASSERT_EQ(t.exit_code, 0) << t.err;
  const fs::path out = dir / "hf";
  const CommandResult r = run_fastllm("export --load=" + run + " --output=" + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json config = read_json(out / "config.json");
  EXPECT_EQ(config["max_position_embeddings"], 24);
  EXPECT_EQ(config["rope_theta"].get<double>(), 1000000.0);
  EXPECT_NE(read_text(out / "config.json").find("\"rope_theta\": 1000000.0,"), std::string::npos);
}

class ExportTarget : public ::testing::Test {
 protected:
  void SetUp() override { ckpt_ = convert(dir_, kFixtures + "/dev-mistral"); }
  CommandResult export_to(const fs::path& out, const std::string& extra = "") {
    return run_fastllm("export --load=" + ckpt_ + " --output=" + out.string() +
                       " --dtype=fp32 --max_shard_size=100KB " + extra);
  }
  // Nothing but `expected` in the temp folder: no staging or old folder was left behind.
  void expect_only(const std::set<std::string>& expected) {
    EXPECT_EQ(names_in(dir_.path()), expected);
  }
  TempDir dir_;
  std::string ckpt_;
};

TEST_F(ExportTarget, NonEmptyFolderIsRefusedWithoutOverwrite) {
  const fs::path out = dir_ / "hf";
  fs::create_directories(out);
  std::ofstream(out / "model.safetensors") << "an older model";
  const CommandResult r = export_to(out);
  EXPECT_EQ(r.exit_code, 2);
  for (const char* part : {"not empty", "model.safetensors", "--overwrite=1"})
    EXPECT_NE(r.err.find(part), std::string::npos) << part << " not in " << r.err;
  EXPECT_EQ(read_text(out / "model.safetensors"), "an older model");
  expect_only({"ckpt", "hf"});
}

TEST_F(ExportTarget, OverwriteKeepsNothingOfTheOldModel) {
  const fs::path out = dir_ / "hf";
  fs::create_directories(out / "sub");
  std::ofstream(out / "model.safetensors") << "an older model";
  std::ofstream(out / "sub" / "notes.txt") << "old";
  const CommandResult r = export_to(out, "--overwrite=1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto names = names_in(out);
  EXPECT_EQ(names.count("model.safetensors"), 0u);
  EXPECT_EQ(names.count("sub"), 0u);
  EXPECT_EQ(names.count("model.safetensors.index.json"), 1u);
  const SafetensorsCheckpoint exported = SafetensorsCheckpoint::open(out);
  EXPECT_EQ(exported.names(), SafetensorsCheckpoint::open(kFixtures + "/dev-mistral").names());
  expect_only({"ckpt", "hf"});
}

TEST_F(ExportTarget, EmptyFolderAndTrailingSlashAreFine) {
  fs::create_directories(dir_ / "hf");
  const CommandResult r = export_to((dir_ / "hf").string() + "/");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(dir_ / "hf" / "config.json"));
  expect_only({"ckpt", "hf"});
}

TEST_F(ExportTarget, OverwriteNeverDeletesTheCheckpoint) {
  const CommandResult r = export_to(dir_.path(), "--overwrite=1");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("holds the checkpoint"), std::string::npos) << r.err;
  expect_only({"ckpt"});
}

TEST_F(ExportTarget, OutputThatIsAFileIsRefused) {
  std::ofstream(dir_ / "file") << "x";
  const CommandResult r = export_to(dir_ / "file");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("not a folder"), std::string::npos) << r.err;
  EXPECT_EQ(read_text(dir_ / "file"), "x");
}

// A failure after some shards were written (a NaN in the last tensor) leaves no output, and an
// old model that was to be overwritten stays as it was.
TEST(ExportFailure, NonFiniteWeightLeavesNoPartialOutput) {
  TempDir dir;
  const fs::path source = dir / "nan-model";
  write_model_with_nan(source, 7);
  const std::string ckpt = convert(dir, source.string());

  const fs::path out = dir / "hf";
  CommandResult r = run_fastllm("export --load=" + ckpt + " --output=" + out.string() +
                                " --dtype=fp32 --max_shard_size=50KB");
  EXPECT_EQ(r.exit_code, 2);
  for (const char* part : {"lm_head.weight", "NaN", "element 7"})
    EXPECT_NE(r.err.find(part), std::string::npos) << part << " not in " << r.err;
  EXPECT_EQ(names_in(dir.path()), (std::set<std::string>{"ckpt", "nan-model"}));

  fs::create_directories(out);
  std::ofstream(out / "model.safetensors") << "the model before";
  r = run_fastllm("export --load=" + ckpt + " --output=" + out.string() +
                  " --dtype=fp32 --max_shard_size=50KB --overwrite=1");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(names_in(out), (std::set<std::string>{"model.safetensors"}));
  EXPECT_EQ(read_text(out / "model.safetensors"), "the model before");
  EXPECT_EQ(names_in(dir.path()), (std::set<std::string>{"ckpt", "hf", "nan-model"}));
}

}  // namespace
}  // namespace fastllm::test
