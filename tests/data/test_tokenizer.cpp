// The SentencePiece wrapper against SentencePiece's own spm_encode and the .vocab file spm_train
// wrote next to the model.
#include "io/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "data_test_util.h"

namespace fastllm {
namespace {

using test::TempDir;
using test::user_error;

// Piece names in id order, from the .vocab file.
std::vector<std::string> vocab_pieces() {
  std::ifstream in(FASTLLM_TEST_VOCAB);
  std::vector<std::string> pieces;
  std::string line;
  while (std::getline(in, line))
    pieces.push_back(line.substr(0, line.find('\t')));
  return pieces;
}

TEST(Tokenizer, VocabularyAndSpecialIds) {
  const Tokenizer tok(FASTLLM_TEST_TOKENIZER);
  const auto pieces = vocab_pieces();
  EXPECT_EQ(tok.vocab_size(), static_cast<std::int64_t>(pieces.size()));
  ASSERT_GT(pieces.size(), 3u);
  EXPECT_EQ(pieces[static_cast<std::size_t>(tok.eos_id())], "</s>");
  EXPECT_EQ(pieces[static_cast<std::size_t>(tok.bos_id())], "<s>");
  EXPECT_EQ(tok.path(), FASTLLM_TEST_TOKENIZER);
}

TEST(Tokenizer, EncodesEveryCorpusLineAsSpmEncode) {
  const Tokenizer tok(FASTLLM_TEST_TOKENIZER);
  const auto expected = test::spm_encode_lines(FASTLLM_TEST_CORPUS);
  std::ifstream in(FASTLLM_TEST_CORPUS);
  std::string line;
  std::size_t n = 0;
  while (std::getline(in, line)) {
    ASSERT_LT(n, expected.size());
    EXPECT_EQ(tok.encode(line), expected[n]) << line;
    ++n;
  }
  EXPECT_EQ(n, expected.size());
  EXPECT_GT(n, 50u);
}

TEST(Tokenizer, UnseenTextFallsBackToBytesAsSpmEncode) {
  const Tokenizer tok(FASTLLM_TEST_TOKENIZER);
  for (const std::string text :
       {"Zebras quizzically jump 9876543210 times.", "  two  leading spaces\tand a tab",
        "naïve café — 😀 ok", "x", "UPPER lower MiXeD"}) {
    const auto ids = tok.encode(text);
    EXPECT_EQ(ids, test::spm_encode_text(text)) << text;
    EXPECT_EQ(tok.decode(ids), text);
  }
  EXPECT_TRUE(tok.encode("").empty());
}

TEST(Tokenizer, FolderStandsForItsTokenizerModel) {
  TempDir dir;
  std::filesystem::copy_file(FASTLLM_TEST_TOKENIZER, dir / "tokenizer.model");
  const Tokenizer tok(dir.path().string());
  EXPECT_EQ(tok.path(), (dir / "tokenizer.model").string());
  EXPECT_EQ(tok.encode("The river runs."), test::spm_encode_text("The river runs."));
}

TEST(Tokenizer, MissingModel) {
  TempDir dir;
  test::expect_contains(user_error([&] { Tokenizer t((dir / "none.model").string()); }),
                        {(dir / "none.model").string(), "not found"});
  test::expect_contains(user_error([&] { Tokenizer t(dir.path().string()); }),
                        {(dir / "tokenizer.model").string(), "not found"});
}

TEST(Tokenizer, NotAModel) {
  TempDir dir;
  test::write_bytes(dir / "bad.model", "this is not a protobuf");
  test::expect_contains(user_error([&] { Tokenizer t((dir / "bad.model").string()); }),
                        {(dir / "bad.model").string(), "not a SentencePiece model"});
}

TEST(Tokenizer, DecodeRejectsIdsOutsideVocabulary) {
  const Tokenizer tok(FASTLLM_TEST_TOKENIZER);
  const std::vector<std::int32_t> ids = {5, static_cast<std::int32_t>(tok.vocab_size())};
  test::expect_contains(user_error([&] { tok.decode(ids); }),
                        {std::to_string(tok.vocab_size()), "outside the vocabulary"});
}

}  // namespace
}  // namespace fastllm
