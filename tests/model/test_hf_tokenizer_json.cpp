// The tokenizer.json generated for a SentencePiece model: its structure, and, as the independent
// check, a BPE encoder written here from the JSON alone (normalizers, merges by rank, byte
// fallback, the post processor) whose ids equal SentencePiece's. The tokenizer is the data tests'
// spm_train model (BPE, byte fallback, identity normalisation, extra spaces kept, <unk> 0, <s> 1,
// </s> 2); the .vocab file spm_train wrote beside it gives each piece's score.
#include "model/hf_tokenizer_json.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "io/error.h"
#include "support/process.h"

namespace fastllm::test {
namespace {

using nlohmann::json;

const std::string kTokenizer = FASTLLM_TEST_TOKENIZER;

json generated() {
  // Through a dump and a parse, as a reader of the file sees it.
  return json::parse(hf_tokenizer_json(Tokenizer(kTokenizer)).dump());
}

// piece -> score, from the .vocab file.
std::map<std::string, double> vocab_scores() {
  std::ifstream in(FASTLLM_TEST_VOCAB);
  std::map<std::string, double> scores;
  std::string line;
  while (std::getline(in, line)) {
    const auto tab = line.find('\t');
    scores[line.substr(0, tab)] = std::stod(line.substr(tab + 1));
  }
  return scores;
}

std::vector<std::string> utf8_chars(const std::string& text) {
  std::vector<std::string> chars;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (chars.empty() || (static_cast<unsigned char>(text[i]) & 0xc0) != 0x80) chars.emplace_back();
    chars.back() += text[i];
  }
  return chars;
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos;
       at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
  return text;
}

// What `tokenizers` does with this JSON, written from its documented semantics.
class JsonEncoder {
 public:
  explicit JsonEncoder(const json& j) : j_(j) {
    for (const auto& [piece, id] : j["model"]["vocab"].items())
      vocab_[piece] = id.get<std::int32_t>();
    int rank = 0;
    for (const auto& m : j["model"]["merges"]) {
      const std::string merge = m.get<std::string>();
      const auto space = merge.find(' ');
      ranks_[{merge.substr(0, space), merge.substr(space + 1)}] = rank++;
    }
  }

  std::string normalize(std::string text) const {
    for (const auto& step : j_["normalizer"]["normalizers"]) {
      if (step["type"] == "Prepend") {
        if (!text.empty()) text = step["prepend"].get<std::string>() + text;
      } else if (step["type"] == "Replace" && step["pattern"].contains("String")) {
        text = replace_all(text, step["pattern"]["String"], step["content"]);
      } else {
        ADD_FAILURE() << "normalizer step not expected: " << step.dump();
      }
    }
    return text;
  }

  std::vector<std::int32_t> encode(const std::string& text) const {
    // Symbols: pieces being merged, or byte-fallback ids (never merged).
    std::vector<std::string> symbols;
    std::vector<std::int32_t> fixed;
    for (const std::string& c : utf8_chars(normalize(text))) {
      if (vocab_.contains(c)) {
        symbols.push_back(c);
        fixed.push_back(-1);
        continue;
      }
      for (const char byte : c) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned char>(byte));
        symbols.emplace_back();
        fixed.push_back(vocab_.at(name));
      }
    }
    while (true) {
      int best = -1;
      std::size_t at = 0;
      for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
        if (fixed[i] >= 0 || fixed[i + 1] >= 0) continue;
        const auto it = ranks_.find({symbols[i], symbols[i + 1]});
        if (it != ranks_.end() && (best < 0 || it->second < best)) {
          best = it->second;
          at = i;
        }
      }
      if (best < 0) break;
      symbols[at] += symbols[at + 1];
      symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(at) + 1);
      fixed.erase(fixed.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    std::vector<std::int32_t> ids;
    for (const auto& part : j_["post_processor"]["single"]) {
      if (part.contains("SpecialToken")) {
        const std::string name = part["SpecialToken"]["id"];
        for (const auto& id : j_["post_processor"]["special_tokens"][name]["ids"])
          ids.push_back(id.get<std::int32_t>());
        continue;
      }
      for (std::size_t i = 0; i < symbols.size(); ++i)
        ids.push_back(fixed[i] >= 0 ? fixed[i] : vocab_.at(symbols[i]));
    }
    return ids;
  }

  // The decoder Sequence: Replace, ByteFallback, Fuse, Strip.
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::map<std::int32_t, std::string> pieces;
    for (const auto& [piece, id] : vocab_)
      pieces[id] = piece;
    std::string text;
    for (const std::int32_t id : ids) {
      const std::string& piece = pieces.at(id);
      if (piece.size() == 6 && piece.starts_with("<0x") && piece.ends_with(">")) {
        text += static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16));
      } else if (id != j_["post_processor"]["special_tokens"]["<s>"]["ids"][0]) {
        text += replace_all(piece, "\u2581", " ");
      }
    }
    const json& strip = j_["decoder"]["decoders"].back();
    EXPECT_EQ(strip["type"], "Strip");
    if (text.starts_with(' ')) text.erase(0, strip["start"].get<std::size_t>());
    return text;
  }

 private:
  json j_;
  std::map<std::string, std::int32_t> vocab_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
};

TEST(HfTokenizerJson, SpecReadFromTheModelFile) {
  const TokenizerSpec spec = Tokenizer(kTokenizer).spec();
  // As tests/data/CMakeLists.txt trains it.
  EXPECT_EQ(spec.algorithm, TokenizerSpec::Algorithm::Bpe);
  EXPECT_TRUE(spec.byte_fallback);
  EXPECT_TRUE(spec.add_dummy_prefix);
  EXPECT_FALSE(spec.remove_extra_whitespaces);
  EXPECT_TRUE(spec.escape_whitespaces);
  EXPECT_EQ(spec.normalizer_name, "identity");
  EXPECT_TRUE(spec.precompiled_charsmap.empty());
  ASSERT_EQ(spec.pieces.size(), 400u);
  using Kind = TokenizerPiece::Kind;
  EXPECT_EQ(spec.pieces[0].kind, Kind::Unknown);
  EXPECT_EQ(spec.pieces[1].kind, Kind::Control);
  EXPECT_EQ(spec.pieces[2].kind, Kind::Control);
  EXPECT_EQ(spec.pieces[3].piece, "<0x00>");
  EXPECT_EQ(spec.pieces[3].kind, Kind::Byte);
  EXPECT_EQ(spec.pieces[258].piece, "<0xFF>");
  const auto scores = vocab_scores();
  for (const TokenizerPiece& p : spec.pieces)
    EXPECT_EQ(p.score, scores.at(p.piece)) << p.piece;
  EXPECT_EQ(spec.pieces[259].kind, Kind::Normal);
}

TEST(HfTokenizerJson, EveryPieceInTheVocabularyWithItsId) {
  const json j = generated();
  const Tokenizer tok(kTokenizer);
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["model"]["byte_fallback"], true);
  EXPECT_EQ(j["model"]["fuse_unk"], true);
  EXPECT_EQ(j["model"]["unk_token"], "<unk>");
  const json& vocab = j["model"]["vocab"];
  ASSERT_EQ(static_cast<std::int64_t>(vocab.size()), tok.vocab_size());
  for (std::int32_t id = 0; id < tok.vocab_size(); ++id)
    EXPECT_EQ(vocab[tok.piece(id)], id) << tok.piece(id);
}

TEST(HfTokenizerJson, MergesFormPiecesInScoreOrder) {
  const json j = generated();
  const json& vocab = j["model"]["vocab"];
  const auto scores = vocab_scores();
  const json& merges = j["model"]["merges"];
  ASSERT_GT(merges.size(), 50u);
  double previous = 1;
  for (const auto& m : merges) {
    const std::string merge = m;
    const auto space = merge.find(' ');
    ASSERT_NE(space, std::string::npos) << merge;
    const std::string left = merge.substr(0, space);
    const std::string right = merge.substr(space + 1);
    EXPECT_TRUE(vocab.contains(left) && vocab.contains(right)) << merge;
    ASSERT_TRUE(vocab.contains(left + right)) << merge;
    EXPECT_FALSE(left.starts_with("<0x") || right.starts_with("<0x")) << merge;
    const double score = scores.at(left + right);
    EXPECT_LE(score, previous) << merge;
    previous = score;
  }
  // Every normal piece longer than one character can be formed.
  std::set<std::string> formed;
  for (const auto& m : merges)
    formed.insert(replace_all(m.get<std::string>(), " ", ""));
  for (const auto& [piece, score] : scores) {
    if (utf8_chars(piece).size() > 1 && !piece.starts_with("<")) {
      EXPECT_TRUE(formed.contains(piece)) << piece;
    }
  }
}

TEST(HfTokenizerJson, SpecialTokensAndBosFirst) {
  const json j = generated();
  ASSERT_EQ(j["added_tokens"].size(), 3u);
  const std::vector<std::string> names{"<unk>", "<s>", "</s>"};
  for (int id = 0; id < 3; ++id) {
    EXPECT_EQ(j["added_tokens"][id]["id"], id);
    EXPECT_EQ(j["added_tokens"][id]["content"], names[static_cast<std::size_t>(id)]);
    EXPECT_EQ(j["added_tokens"][id]["special"], true);
    EXPECT_EQ(j["added_tokens"][id]["normalized"], false);
  }
  const json& post = j["post_processor"];
  EXPECT_EQ(post["type"], "TemplateProcessing");
  EXPECT_EQ(post["single"][0]["SpecialToken"]["id"], "<s>");
  EXPECT_EQ(post["single"][1]["Sequence"]["id"], "A");
  EXPECT_EQ(post["special_tokens"]["<s>"]["ids"], json::array({1}));
  EXPECT_TRUE(j["pre_tokenizer"].is_null());
  std::vector<std::string> decoders;
  for (const auto& d : j["decoder"]["decoders"])
    decoders.push_back(d["type"]);
  EXPECT_EQ(decoders, (std::vector<std::string>{"Replace", "ByteFallback", "Fuse", "Strip"}));
}

// Corpus lines, each from its second and third word on, pairs of lines joined by a newline, and
// the edges SentencePiece's normalisation and byte fallback meet.
std::vector<std::string> texts() {
  std::vector<std::string> lines;
  std::ifstream in(FASTLLM_TEST_CORPUS);
  std::string line;
  while (std::getline(in, line))
    lines.push_back(line);
  std::vector<std::string> out = lines;
  for (const std::string& l : lines) {
    std::size_t at = l.find(' ');
    for (int k = 0; k < 2 && at != std::string::npos; ++k, at = l.find(' ', at + 1))
      out.push_back(l.substr(at));
  }
  for (std::size_t i = 0; i + 1 < lines.size(); ++i)
    out.push_back(lines[i] + "\n" + lines[i + 1]);
  for (const char* edge : {"",
                           " ",
                           "   ",
                           " leading space",
                           "   three leading",
                           "trailing  ",
                           "many     spaces",
                           "a\nb",
                           "\n",
                           "\n\nline\n",
                           "tab\there",
                           "0123456789 and 3.14159",
                           "12 345 6789",
                           "naïve café crème brûlée",
                           "Ünïcödé ÀÉÎÕÜ ß",
                           "emoji 😀 needs bytes",
                           "🧪🤖",
                           "日本語のテキスト",
                           "x",
                           "The hacker",
                           " The hacker"})
    out.emplace_back(edge);
  return out;
}

TEST(HfTokenizerJson, EncoderFromTheJsonGivesSentencePiecesIds) {
  const Tokenizer tok(kTokenizer);
  const JsonEncoder encoder(generated());
  const auto all = texts();
  ASSERT_GT(all.size(), 250u);
  for (const std::string& text : all) {
    std::vector<std::int32_t> want{tok.bos_id()};
    for (const std::int32_t id : tok.encode(text))
      want.push_back(id);
    const auto got = encoder.encode(text);
    EXPECT_EQ(got, want) << "'" << text << "'";
    EXPECT_EQ(encoder.decode(got), tok.decode(std::span(want).subspan(1))) << "'" << text << "'";
  }
}

TEST(HfTokenizerJson, CharModelIsRefused) {
  TempDir dir;
  const std::string prefix = (dir / "char").string();
  const CommandResult r =
      run_shell(std::string(FASTLLM_SPM_TRAIN) + " --input=" + FASTLLM_TEST_CORPUS +
                " --model_prefix=" + prefix + " --model_type=char --vocab_size=60 --minloglevel=2");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  try {
    hf_tokenizer_json(Tokenizer(prefix + ".model"));
    ADD_FAILURE() << "a CHAR model was accepted";
  } catch (const UserError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(prefix + ".model"), std::string::npos) << message;
    EXPECT_NE(message.find("CHAR"), std::string::npos) << message;
    EXPECT_NE(message.find("expected a BPE or Unigram"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace fastllm::test
