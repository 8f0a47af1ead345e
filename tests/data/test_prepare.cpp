// prepare_dataset on one rank: every document's ids against SentencePiece's own spm_encode (with
// its BOS and EOS options), in the text, split-lines and JSONL modes, and one clear error per bad
// input.
#include "data/prepare.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <fstream>

#include "data_test_util.h"
#include "io/indexed_dataset.h"
#include "io/tokenizer.h"
#include "prepare_support.h"

namespace fastllm {
namespace {

using test::options_for;
using test::TempDir;
using test::user_error;
using test::write_bytes;
using Ids = std::vector<std::int32_t>;

constexpr std::int32_t kBos = 1;  // --bos_id given to spm_train
constexpr std::int32_t kEos = 2;  // --eos_id given to spm_train

std::vector<Ids> documents(const std::string& prefix) {
  const IndexedDataset ds(prefix);
  std::vector<Ids> docs;
  for (std::int64_t d = 0; d < ds.num_documents(); ++d)
    docs.push_back(ds.document(d));
  return docs;
}

TEST(Prepare, SplitLinesMatchesSpmEncodePerLine) {
  TempDir dir;
  const auto out = (dir / "out" / "corpus").string();
  auto o = options_for({FASTLLM_TEST_CORPUS}, out);
  o.split_lines = true;
  const PrepareStats stats = prepare_dataset(o, MPI_COMM_WORLD);

  std::vector<Ids> expected;
  std::int64_t tokens = 0;
  for (const Ids& line : test::spm_encode_lines(FASTLLM_TEST_CORPUS, "bos:eos")) {
    expected.push_back(line);
    tokens += static_cast<std::int64_t>(line.size());
  }
  EXPECT_EQ(documents(out), expected);
  EXPECT_EQ(stats.documents, static_cast<std::int64_t>(expected.size()));
  EXPECT_EQ(stats.tokens, tokens);
  EXPECT_EQ(stats.skipped, 0);
  EXPECT_EQ(stats.dtype, "uint16");
  EXPECT_EQ(stats.bytes,
            static_cast<std::int64_t>(std::filesystem::file_size(FASTLLM_TEST_CORPUS)));
  // uint16 is Megatron's dtype code 8, at byte 17 of the .idx.
  EXPECT_EQ(test::read_bytes(out + ".idx")[17], 8);
  // Only the dataset is left in the output folder.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir / "out")) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"corpus.bin", "corpus.idx"}));
}

TEST(Prepare, SplitLinesSkipsBlankLinesAndStripsCarriageReturns) {
  TempDir dir;
  write_bytes(dir / "lf.txt", "first line here\n\n   \nsecond line\nlast without newline");
  write_bytes(dir / "crlf.txt",
              "first line here\r\n\r\n   \r\nsecond line\r\nlast without newline");
  auto lf = options_for({(dir / "lf.txt").string()}, (dir / "lf").string());
  lf.split_lines = true;
  const PrepareStats stats = prepare_dataset(lf, MPI_COMM_WORLD);
  auto crlf = options_for({(dir / "crlf.txt").string()}, (dir / "crlf").string());
  crlf.split_lines = true;
  prepare_dataset(crlf, MPI_COMM_WORLD);

  const std::vector<Ids> expected = {test::spm_encode_text("first line here", "bos:eos"),
                                     test::spm_encode_text("second line", "bos:eos"),
                                     test::spm_encode_text("last without newline", "bos:eos")};
  EXPECT_EQ(documents((dir / "lf").string()), expected);
  EXPECT_EQ(documents((dir / "crlf").string()), expected);
  EXPECT_EQ(stats.documents, 3);
  EXPECT_EQ(stats.skipped, 2);
}

TEST(Prepare, TextModeIsOneDocumentPerFileInInputOrder) {
  TempDir dir;
  write_bytes(dir / "b.txt", "The baker opens at seven.");
  write_bytes(dir / "a.txt", "A heron stands in the shallows.");
  write_bytes(dir / "empty.txt", "");
  const auto out = (dir / "text").string();
  const PrepareStats stats = prepare_dataset(
      options_for(
          {(dir / "b.txt").string(), (dir / "empty.txt").string(), (dir / "a.txt").string()}, out),
      MPI_COMM_WORLD);
  EXPECT_EQ(
      documents(out),
      (std::vector<Ids>{test::spm_encode_text("The baker opens at seven.", "bos:eos"),
                        test::spm_encode_text("A heron stands in the shallows.", "bos:eos")}));
  EXPECT_EQ(stats.skipped, 1);
}

TEST(Prepare, FolderInputIsItsFilesSortedByPath) {
  TempDir dir;
  std::filesystem::create_directories(dir / "in" / "sub");
  write_bytes(dir / "in" / "sub" / "c.txt", "Third document.");
  write_bytes(dir / "in" / "b.txt", "Second document.");
  write_bytes(dir / "in" / "a.txt", "First document.");
  write_bytes(dir / "in" / ".hidden", "Left out.");
  const auto out = (dir / "folder").string();
  prepare_dataset(options_for({(dir / "in").string()}, out), MPI_COMM_WORLD);
  EXPECT_EQ(documents(out),
            (std::vector<Ids>{test::spm_encode_text("First document.", "bos:eos"),
                              test::spm_encode_text("Second document.", "bos:eos"),
                              test::spm_encode_text("Third document.", "bos:eos")}));
}

TEST(Prepare, MultiLineTextDocumentDecodesBackToTheFile) {
  TempDir dir;
  const std::string text = "Line one of a letter.\n\nLine three, after a blank one.\n  indented\n";
  write_bytes(dir / "letter.txt", text);
  const auto out = (dir / "letter").string();
  prepare_dataset(options_for({(dir / "letter.txt").string()}, out), MPI_COMM_WORLD);
  const auto docs = documents(out);
  ASSERT_EQ(docs.size(), 1u);
  ASSERT_GE(docs[0].size(), 2u);
  ASSERT_EQ(docs[0].front(), kBos);
  ASSERT_EQ(docs[0].back(), kEos);
  // spm_decode, SentencePiece's own decoder, turns the ids back into the whole file.
  std::string ids;
  for (std::size_t i = 1; i + 1 < docs[0].size(); ++i)
    ids += std::to_string(docs[0][i]) + " ";
  write_bytes(dir / "ids.txt", ids + "\n");
  const auto r =
      test::run_shell(std::string(FASTLLM_SPM_DECODE) + " --model=" + FASTLLM_TEST_TOKENIZER +
                      " --input_format=id < " + (dir / "ids.txt").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, text + "\n");
}

TEST(Prepare, JsonlTakesTheTextKey) {
  TempDir dir;
  write_bytes(dir / "docs.jsonl",
              "{\"text\": \"The river runs past the old mill.\", \"id\": 1}\n"
              "\n"
              "{\"id\": 2, \"text\": \"Caf\\u00e9 \\\"quoted\\\" text\"}\n"
              "{\"text\": \"\"}\n"
              "{\"text\": \"Last one, no newline at the end.\"}");
  const auto out = (dir / "jsonl").string();
  const PrepareStats stats =
      prepare_dataset(options_for({(dir / "docs.jsonl").string()}, out), MPI_COMM_WORLD);
  EXPECT_EQ(
      documents(out),
      (std::vector<Ids>{test::spm_encode_text("The river runs past the old mill.", "bos:eos"),
                        test::spm_encode_text("Caf\xc3\xa9 \"quoted\" text", "bos:eos"),
                        test::spm_encode_text("Last one, no newline at the end.", "bos:eos")}));
  EXPECT_EQ(stats.documents, 3);
  EXPECT_EQ(stats.skipped, 1);
}

TEST(Prepare, JsonlOtherKeyAndForcedFormat) {
  TempDir dir;
  write_bytes(dir / "docs.data", "{\"body\": \"Winter is quiet.\", \"text\": 3}\n");
  auto o = options_for({(dir / "docs.data").string()}, (dir / "body").string());
  o.format = InputFormat::kJsonl;
  o.json_key = "body";
  prepare_dataset(o, MPI_COMM_WORLD);
  EXPECT_EQ(documents((dir / "body").string()),
            (std::vector<Ids>{test::spm_encode_text("Winter is quiet.", "bos:eos")}));
}

TEST(Prepare, BosAndEosAreEachOptional) {
  TempDir dir;
  write_bytes(dir / "a.txt", "No end marker.");
  const std::pair<bool, bool> cases[] = {{true, false}, {false, true}, {false, false}};
  const char* const spm_options[] = {"bos", "eos", ""};
  for (std::size_t c = 0; c < 3; ++c) {
    auto o = options_for({(dir / "a.txt").string()}, (dir / ("out" + std::to_string(c))).string());
    o.prepend_bos = cases[c].first;
    o.append_eos = cases[c].second;
    const PrepareStats stats = prepare_dataset(o, MPI_COMM_WORLD);
    const Ids expected = test::spm_encode_text("No end marker.", spm_options[c]);
    EXPECT_EQ(documents(o.output_prefix), (std::vector<Ids>{expected})) << spm_options[c];
    EXPECT_EQ(stats.tokens, static_cast<std::int64_t>(expected.size())) << spm_options[c];
  }
}

TEST(Prepare, DefaultsFrameEveryDocumentWithBosAndEos) {
  const PrepareOptions defaults;
  EXPECT_TRUE(defaults.prepend_bos);
  EXPECT_TRUE(defaults.append_eos);
  const Ids ids = test::spm_encode_text("The river runs.", "bos:eos");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), kBos);
  EXPECT_EQ(ids.back(), kEos);
}

TEST(Prepare, CommandLineFlagsSetBosAndEos) {
  TempDir dir;
  write_bytes(dir / "a.txt", "Flags from the command line.");
  const std::string base = std::string(FASTLLM_BINARY) + " prepare --input " +
                           (dir / "a.txt").string() + " --tokenizer " + FASTLLM_TEST_TOKENIZER;
  auto r = test::run_shell(base + " --output " + (dir / "default").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(documents((dir / "default").string()),
            (std::vector<Ids>{test::spm_encode_text("Flags from the command line.", "bos:eos")}));
  r = test::run_shell(base + " --prepend_bos=0 --append_eos=0 --output " + (dir / "bare").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(documents((dir / "bare").string()),
            (std::vector<Ids>{test::spm_encode_text("Flags from the command line.")}));
}

class PrepareError : public ::testing::Test {
 protected:
  std::string error_of(const std::string& jsonl) {
    write_bytes(dir_ / "bad.jsonl", jsonl);
    const std::string message = user_error([&] {
      prepare_dataset(options_for({(dir_ / "bad.jsonl").string()}, (dir_ / "bad").string()),
                      MPI_COMM_WORLD);
    });
    EXPECT_FALSE(std::filesystem::exists(dir_ / "bad.bin"));
    EXPECT_FALSE(std::filesystem::exists(dir_ / "bad.idx"));
    EXPECT_FALSE(std::filesystem::exists(dir_ / "bad.bin.tmp"));
    return message;
  }
  TempDir dir_;
};

TEST_F(PrepareError, MalformedJsonNamesFileAndLine) {
  const std::string message =
      error_of("{\"text\": \"fine\"}\n{\"text\": \"fine too\"}\n\n{\"text\": \"broken\n");
  test::expect_contains(message, {(dir_ / "bad.jsonl").string(), "line 4", "not valid JSON"});
}

TEST_F(PrepareError, MissingKeyNamesFileLineAndKey) {
  const std::string message = error_of("{\"text\": \"fine\"}\n{\"body\": \"no text key\"}\n");
  test::expect_contains(message, {(dir_ / "bad.jsonl").string(), "line 2", "\"text\"", "\"body\""});
}

TEST_F(PrepareError, NonStringValue) {
  const std::string message = error_of("{\"text\": [1, 2]}\n");
  test::expect_contains(message, {"line 1", "\"text\" is an array", "expected a string"});
}

TEST_F(PrepareError, NotAnObject) {
  const std::string message = error_of("{\"text\": \"ok\"}\n\"just a string\"\n");
  test::expect_contains(message, {"line 2", "a string", "expected an object"});
}

TEST(PrepareInputs, MissingInputFile) {
  TempDir dir;
  test::expect_contains(user_error([&] {
                          prepare_dataset(
                              options_for({(dir / "nope.txt").string()}, (dir / "out").string()),
                              MPI_COMM_WORLD);
                        }),
                        {(dir / "nope.txt").string(), "not found"});
}

TEST(PrepareInputs, MissingTokenizer) {
  TempDir dir;
  write_bytes(dir / "a.txt", "text");
  auto o = options_for({(dir / "a.txt").string()}, (dir / "out").string());
  o.tokenizer = (dir / "missing.model").string();
  test::expect_contains(user_error([&] { prepare_dataset(o, MPI_COMM_WORLD); }),
                        {(dir / "missing.model").string(), "not found"});
}

TEST(PrepareInputs, BosWithoutBosPieceIsAnError) {
  TempDir dir;
  write_bytes(dir / "a.txt", "text");
  auto o = options_for({(dir / "a.txt").string()}, (dir / "out").string());
  o.tokenizer = FASTLLM_TEST_TOKENIZER_NO_BOS;
  test::expect_contains(user_error([&] { prepare_dataset(o, MPI_COMM_WORLD); }),
                        {FASTLLM_TEST_TOKENIZER_NO_BOS, "no BOS", "--prepend_bos=0"});
  EXPECT_FALSE(std::filesystem::exists(dir / "out.bin"));
  o.prepend_bos = false;
  prepare_dataset(o, MPI_COMM_WORLD);
  EXPECT_EQ(documents((dir / "out").string()).size(), 1u);
}

TEST(PrepareInputs, NoInputs) {
  TempDir dir;
  test::expect_contains(
      user_error([&] { prepare_dataset(options_for({}, (dir / "out").string()), MPI_COMM_WORLD); }),
      {"no input"});
}

TEST(PrepareInputs, ProgressGoesToStderr) {
  TempDir dir;
  write_bytes(dir / "a.txt", "Some text.");
  auto o = options_for({(dir / "a.txt").string()}, (dir / "out").string());
  o.progress = true;
  ::testing::internal::CaptureStderr();
  prepare_dataset(o, MPI_COMM_WORLD);
  const std::string err = ::testing::internal::GetCapturedStderr();
  test::expect_contains(err, {"1 documents", "uint16", (dir / "out").string()});
}

}  // namespace
}  // namespace fastllm

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  MPI_Finalize();
  return result;
}
