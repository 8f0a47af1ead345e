// `fastllm generate` on one rank: greedy tokens with the key/value cache equal greedy decoding by
// full forwards (`fastllm probe`) and transformers' greedy generate on every fixture, stopping
// where transformers stops; sampling repeats with its seed; a checkpoint
// (--load) generates as the folder it was converted from; text prompts go through the tokenizer
// with BOS first and stop at EOS; each bad input is one clear error.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <span>

#include "cli/generate_support.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"

namespace fastllm::test {
namespace {

constexpr int kNew = 24;  // past the dev fixtures' window of 16 with the prompt of 10
const std::string kNewFlag = "--max_new_tokens=" + std::to_string(kNew);

// A copy of a fixture folder whose generation_config.json says eos_token_id: `eos`.
std::string with_eos(const TempDir& dir, const std::string& fixture, const nlohmann::json& eos) {
  const std::filesystem::path folder = dir / fixture;
  std::filesystem::copy(kFixtures + "/" + fixture, folder);
  std::ifstream in(folder / "generation_config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  config["eos_token_id"] = eos;
  std::ofstream(folder / "generation_config.json") << config.dump();
  return folder.string();
}

TEST(Generate, GreedyEqualsFullForwardsMistralWithWindow) {
  const auto tokens = generate_ids("dev-mistral", kPrompt, kNewFlag);
  ASSERT_EQ(tokens.size(), static_cast<std::size_t>(kNew));
  expect_greedy("dev-mistral", kPrompt, tokens);
}

TEST(Generate, GreedyEqualsFullForwardsMixtral) {
  const auto tokens = generate_ids("dev-mixtral", kPrompt, kNewFlag);
  ASSERT_EQ(tokens.size(), static_cast<std::size_t>(kNew));
  expect_greedy("dev-mixtral", kPrompt, tokens);
}

TEST(Generate, GreedyEqualsFullForwardsTiedWithoutWindow) {
  const auto tokens = generate_ids("dev-tied-nowindow", kPrompt, kNewFlag);
  ASSERT_EQ(tokens.size(), static_cast<std::size_t>(kNew));
  expect_greedy("dev-tied-nowindow", kPrompt, tokens);
}

// transformers' greedy generate, recorded by tests/support/hf_reference.py.
nlohmann::json hf_reference(const std::string& part) {
  std::ifstream in(FASTLLM_HF_REFERENCE);
  return nlohmann::json::parse(in).at(part);
}

TEST(Generate, GreedyEqualsTransformersGenerateOnEveryFixture) {
  const nlohmann::json reference = hf_reference("generate");
  ASSERT_EQ(reference.size(), 3u);
  for (const auto& [name, want] : reference.items()) {
    const auto tokens = generate_ids(name, want["prompt"].get<std::vector<std::int32_t>>(),
                                     "--max_new_tokens=" + want["max_new_tokens"].dump());
    EXPECT_EQ(tokens, want["tokens"].get<std::vector<std::int32_t>>()) << name;
  }
}

// As transformers, generation stops at any of the folder's end tokens (here a list whose second
// token greedy decoding reaches as its eighth).
TEST(Generate, StopsAtTheFoldersEndTokensAsTransformers) {
  const nlohmann::json want = hf_reference("generate_to_eos")["dev-mistral"];
  TempDir dir;
  const std::string folder = with_eos(dir, "dev-mistral", want["eos_token_id"]);
  const auto tokens = generate_ids(folder, want["prompt"].get<std::vector<std::int32_t>>(),
                                   "--max_new_tokens=" + want["max_new_tokens"].dump());
  EXPECT_EQ(tokens, want["tokens"].get<std::vector<std::int32_t>>());
}

TEST(Generate, OneTokenPromptAndOneNewToken) {
  const std::vector<std::int32_t> prompt = {5};
  const auto tokens = generate_ids("dev-mistral", prompt, "--max_new_tokens=1");
  ASSERT_EQ(tokens.size(), 1u);
  expect_greedy("dev-mistral", prompt, tokens);
}

TEST(Generate, SamplingRepeatsWithItsSeedAndDiffersWithAnother) {
  // Without an end token, so that every sample runs to its length.
  TempDir dir;
  const std::string model = with_eos(dir, "dev-mistral", nullptr);
  const std::string flags = kNewFlag + " --temperature=1.5 --top_p=0.95";
  const auto a = generate_ids(model, kPrompt, flags + " --seed=5");
  const auto b = generate_ids(model, kPrompt, flags + " --seed=5");
  const auto c = generate_ids(model, kPrompt, flags + " --seed=6");
  ASSERT_EQ(a.size(), static_cast<std::size_t>(kNew));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // Not the greedy tokens either: sampling at temperature 1.5 over a near-uniform model.
  EXPECT_NE(a, generate_ids("dev-mistral", kPrompt, kNewFlag));
}

TEST(Generate, TinyTopPIsGreedy) {
  // A nucleus of one token (the most probable) whatever the temperature.
  const auto sampled =
      generate_ids("dev-mixtral", kPrompt, kNewFlag + " --temperature=2 --top_p=1e-9 --seed=3");
  EXPECT_EQ(sampled, generate_ids("dev-mixtral", kPrompt, kNewFlag));
}

TEST(Generate, CheckpointGeneratesAsItsHuggingFaceFolder) {
  TempDir dir;
  const CommandResult convert = run_fastllm("convert --pretrained_checkpoint_path=" + kFixtures +
                                            "/dev-mistral --save=" + (dir / "ckpt").string());
  ASSERT_EQ(convert.exit_code, 0) << convert.err;
  const CommandResult r = run_fastllm("generate --load=" + (dir / "ckpt").string() +
                                      " --prompt_ids=" + join_ids(kPrompt) + " " + kNewFlag);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, join_ids(generate_ids("dev-mistral", kPrompt, kNewFlag)) + "\n");
}

// dev-tied-nowindow cut to the test tokenizer's vocabulary (its first rows of the tied embedding),
// with that tokenizer.model in the folder: a model whose every id is text.
std::string tokenizer_model(const TempDir& dir) {
  const Tokenizer tokenizer(FASTLLM_TEST_TOKENIZER);
  const std::int64_t vocab = tokenizer.vocab_size();
  const std::string source = kFixtures + "/dev-tied-nowindow";
  const std::filesystem::path folder = dir / "model";
  std::filesystem::create_directories(folder);
  std::string config = read_text(source + "/config.json");
  const std::string field = "\"vocab_size\": 1000";
  const auto at = config.find(field);
  EXPECT_NE(at, std::string::npos);
  config.replace(at, field.size(), "\"vocab_size\": " + std::to_string(vocab));
  std::ofstream(folder / "config.json") << config;
  std::filesystem::copy_file(FASTLLM_TEST_TOKENIZER, folder / "tokenizer.model");
  const SafetensorsFile weights = SafetensorsFile::open(source + "/model.safetensors");
  std::vector<std::vector<float>> values;
  std::vector<SafetensorsTensor> out;
  values.reserve(weights.tensors().size());
  for (const TensorInfo& t : weights.tensors()) {
    values.push_back(weights.read_f32(t.name));
    std::vector<std::int64_t> shape = t.shape;
    if (t.name == "model.embed_tokens.weight") {
      shape[0] = vocab;
      values.back().resize(static_cast<std::size_t>(vocab * shape[1]));
    }
    out.push_back({t.name, SafetensorsDtype::F32, shape, std::as_bytes(std::span(values.back()))});
  }
  write_safetensors((folder / "model.safetensors").string(), out);
  return folder.string();
}

// A text prompt: BOS + the tokenizer's ids (the folder's tokenizer.model by default), decoded up
// to (not including) EOS. The same ids through --prompt_ids, checked against full forwards, are
// the reference.
TEST(Generate, TextPromptThroughTheFoldersTokenizer) {
  TempDir dir;
  const std::string model = tokenizer_model(dir);
  const Tokenizer tokenizer(FASTLLM_TEST_TOKENIZER);
  ASSERT_EQ(tokenizer.bos_id(), 1);
  for (const std::string text : {"The quick brown fox", "a"}) {
    std::vector<std::int32_t> ids = {tokenizer.bos_id()};
    for (std::int32_t id : tokenizer.encode(text))
      ids.push_back(id);
    const CommandResult direct = run_fastllm("generate --pretrained_checkpoint_path=" + model +
                                             " --prompt_ids=" + join_ids(ids) + " " + kNewFlag);
    ASSERT_EQ(direct.exit_code, 0) << direct.err;
    std::vector<std::int32_t> want = split_ids(direct.out);
    ASSERT_EQ(want.size(), static_cast<std::size_t>(kNew));
    expect_greedy(model, ids, want);
    want.erase(std::find(want.begin(), want.end(), tokenizer.eos_id()), want.end());
    const CommandResult r = run_fastllm("generate --pretrained_checkpoint_path=" + model + " " +
                                        kNewFlag + " '--prompt=" + text + "'");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, tokenizer.decode(want) + "\n") << text;
  }
}

TEST(Generate, PromptFileContinuesEachLine) {
  TempDir dir;
  const std::string model =
      "--pretrained_checkpoint_path=" + tokenizer_model(dir) + " --max_new_tokens=5 ";
  std::ofstream(dir / "prompts.txt") << "the fox\n\nquick\n";
  const CommandResult r =
      run_fastllm("generate " + model + "--prompt_file=" + (dir / "prompts.txt").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const CommandResult first = run_fastllm("generate " + model + "'--prompt=the fox'");
  const CommandResult second = run_fastllm("generate " + model + "--prompt=quick");
  EXPECT_EQ(r.out, first.out + second.out);
}

// ---- bad input: exit code 2 and one message naming what is wrong ----

void expect_error(const std::string& flags, const std::string& message) {
  const CommandResult r = run_fastllm("generate " + flags);
  EXPECT_EQ(r.exit_code, 2) << flags << "\n" << r.err;
  EXPECT_NE(r.err.find(message), std::string::npos) << flags << "\n" << r.err;
  EXPECT_EQ(r.out, "") << flags;
}

const std::string kModel = "--pretrained_checkpoint_path=" + kFixtures + "/dev-mistral ";

TEST(GenerateErrors, NoPrompt) {
  expect_error(kModel, "no prompt: give --prompt=TEXT");
}
TEST(GenerateErrors, TwoKindsOfPrompt) {
  expect_error(kModel + "--prompt=hello --prompt_ids=1,2", "give one of --prompt, --prompt_file");
}
TEST(GenerateErrors, NoModel) {
  expect_error("--prompt_ids=1,2", "generate needs a model");
}
TEST(GenerateErrors, BothModelSources) {
  expect_error(kModel + "--load=/nonexistent --prompt_ids=1,2", "not both");
}
TEST(GenerateErrors, MissingCheckpoint) {
  expect_error("--load=/nonexistent/ckpt --prompt_ids=1,2", "no such file or folder");
}
TEST(GenerateErrors, TextPromptWithoutTokenizer) {
  expect_error(kModel + "--prompt=hello", "no tokenizer: ");
}
TEST(GenerateErrors, MissingTokenizerFile) {
  expect_error(kModel + "--prompt=hello --tokenizer=/nonexistent/tokenizer.model",
               "/nonexistent/tokenizer.model");
}
TEST(GenerateErrors, PromptLongerThanTheModel) {
  // dev-mistral's max_position_embeddings is 512.
  expect_error(kModel + "--prompt_ids=1,2,3 --max_new_tokens=510",
               "--prompt_ids: the prompt has 3 tokens; with --max_new_tokens=510 that is 513 "
               "positions, more than the model's 512");
}
TEST(GenerateErrors, IdOutsideTheVocabulary) {
  expect_error(kModel + "--prompt_ids=1,1000", "token id 1000 is outside the vocabulary [0, 1000)");
}
TEST(GenerateErrors, MalformedIds) {
  expect_error(kModel + "--prompt_ids=1,,2", "--prompt_ids=: expected an integer");
}
TEST(GenerateErrors, BadSamplingSettings) {
  expect_error(kModel + "--prompt_ids=1 --top_p=0", "--top_p=0: expected a number in (0, 1]");
  expect_error(kModel + "--prompt_ids=1 --temperature=-1", "--temperature=-1: expected 0");
  expect_error(kModel + "--prompt_ids=1 --max_new_tokens=0", "--max_new_tokens=0: expected");
}
TEST(GenerateErrors, MalformedEndToken) {
  TempDir dir;
  const std::string folder = with_eos(dir, "dev-mistral", "two");
  expect_error("--pretrained_checkpoint_path=" + folder + " --prompt_ids=1",
               folder +
                   "/generation_config.json: eos_token_id \"two\": expected a token id or "
                   "a list of token ids");
}
TEST(GenerateErrors, EmptyPromptFile) {
  TempDir dir;
  std::ofstream(dir / "empty.txt") << "\n  \n";
  expect_error(kModel + "--prompt_file=" + (dir / "empty.txt").string(), "no prompts");
  expect_error(kModel + "--prompt_file=" + (dir / "missing.txt").string(), "cannot be read");
}

}  // namespace
}  // namespace fastllm::test
