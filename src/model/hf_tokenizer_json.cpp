#include "model/hf_tokenizer_json.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "io/error.h"

namespace fastllm {
namespace {

using nlohmann::ordered_json;
using Kind = TokenizerPiece::Kind;

const std::string kSpace = "\u2581";  // SentencePiece's escaped space

std::string base64(const std::string& bytes) {
  static constexpr char kDigits[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    std::uint32_t chunk = 0;
    const std::size_t n = std::min<std::size_t>(3, bytes.size() - i);
    for (std::size_t k = 0; k < 3; ++k)
      chunk = (chunk << 8) | (k < n ? static_cast<std::uint8_t>(bytes[i + k]) : 0u);
    for (std::size_t k = 0; k < 4; ++k)
      out += k <= n ? kDigits[(chunk >> (18 - 6 * k)) & 63] : '=';
  }
  return out;
}

ordered_json replace(const std::string& pattern, const std::string& content, bool regex = false) {
  return {{"type", "Replace"},
          {"pattern", {{regex ? "Regex" : "String", pattern}}},
          {"content", content}};
}

// SentencePiece's normalisation in its order: the character map, extra spaces removed, the dummy
// prefix, spaces escaped. `tokenizers`' Prepend leaves an empty text empty, as SentencePiece does.
ordered_json normalizer(const TokenizerSpec& spec) {
  ordered_json steps = ordered_json::array();
  if (!spec.precompiled_charsmap.empty())
    steps.push_back(
        {{"type", "Precompiled"}, {"precompiled_charsmap", base64(spec.precompiled_charsmap)}});
  if (spec.remove_extra_whitespaces) {
    // Only the space itself, as SentencePiece: \A and \z because Onig's ^ and $ match at lines.
    steps.push_back(replace("\\A +", "", true));
    steps.push_back(replace(" +\\z", "", true));
    steps.push_back(replace(" {2,}", " ", true));
  }
  if (spec.add_dummy_prefix) steps.push_back({{"type", "Prepend"}, {"prepend", kSpace}});
  if (spec.escape_whitespaces) steps.push_back(replace(" ", kSpace));
  return {{"type", "Sequence"}, {"normalizers", steps}};
}

ordered_json decoder(const TokenizerSpec& spec) {
  ordered_json steps = {replace(kSpace, " "), {{"type", "ByteFallback"}}, {{"type", "Fuse"}}};
  if (spec.add_dummy_prefix)
    steps.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  return {{"type", "Sequence"}, {"decoders", steps}};
}

ordered_json post_processor(const Tokenizer& tokenizer) {
  if (tokenizer.bos_id() < 0) return nullptr;
  const std::string bos = tokenizer.piece(tokenizer.bos_id());
  auto special = [&](int type_id) {
    return ordered_json{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}};
  };
  auto sequence = [](const std::string& id, int type_id) {
    return ordered_json{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  ordered_json special_tokens;
  special_tokens[bos] = {{"id", bos}, {"ids", {tokenizer.bos_id()}}, {"tokens", {bos}}};
  return {{"type", "TemplateProcessing"},
          {"single", {special(0), sequence("A", 0)}},
          {"pair", {special(0), sequence("A", 0), special(1), sequence("B", 1)}},
          {"special_tokens", special_tokens}};
}

// Control and unknown pieces are special (skipped when decoding with skip_special_tokens);
// user-defined ones are text SentencePiece never splits, so they are added but not special.
ordered_json added_tokens(const TokenizerSpec& spec) {
  ordered_json tokens = ordered_json::array();
  for (std::size_t id = 0; id < spec.pieces.size(); ++id) {
    const TokenizerPiece& p = spec.pieces[id];
    if (p.kind != Kind::Control && p.kind != Kind::Unknown && p.kind != Kind::UserDefined) continue;
    ordered_json token = {{"id", id}};
    token.update(added_token(p.piece, p.kind != Kind::UserDefined));
    tokens.push_back(token);
  }
  return tokens;
}

// SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the
// highest-scoring piece: every split of a normal piece into two normal pieces is a merge, ranked by
// the piece's score (highest first), then its id, then the longer left part first, as
// transformers' converter ranks them.
std::vector<std::pair<std::string, std::string>> bpe_merges(const TokenizerSpec& spec) {
  std::unordered_map<std::string, std::size_t> normal;
  for (std::size_t id = 0; id < spec.pieces.size(); ++id)
    if (spec.pieces[id].kind == Kind::Normal) normal.emplace(spec.pieces[id].piece, id);
  struct Merge {
    float score;
    std::size_t id;
    std::size_t left_chars;
    std::size_t split;
  };
  std::vector<Merge> merges;
  for (std::size_t id = 0; id < spec.pieces.size(); ++id) {
    const TokenizerPiece& p = spec.pieces[id];
    if (p.kind != Kind::Normal) continue;
    std::size_t chars = 0;
    for (std::size_t at = 1; at < p.piece.size(); ++at) {
      if ((static_cast<std::uint8_t>(p.piece[at]) & 0xc0) == 0x80) continue;  // inside a char
      ++chars;
      if (normal.contains(p.piece.substr(0, at)) && normal.contains(p.piece.substr(at)))
        merges.push_back({p.score, id, chars, at});
    }
  }
  std::ranges::sort(merges, [](const Merge& a, const Merge& b) {
    return std::tuple(-a.score, a.id, -static_cast<std::int64_t>(a.left_chars)) <
           std::tuple(-b.score, b.id, -static_cast<std::int64_t>(b.left_chars));
  });
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(merges.size());
  for (const Merge& m : merges) {
    const std::string& piece = spec.pieces[m.id].piece;
    out.emplace_back(piece.substr(0, m.split), piece.substr(m.split));
  }
  return out;
}

ordered_json bpe_model(const TokenizerSpec& spec, const std::string& unk) {
  // Built through the object's vector: ordered_json's own insertion searches every key, quadratic
  // in Mistral's 32000 pieces (unique, as SentencePiece requires).
  ordered_json vocab = ordered_json::object();
  using Entries = ordered_json::object_t::Container;
  auto& entries = static_cast<Entries&>(vocab.get_ref<ordered_json::object_t&>());
  for (std::size_t id = 0; id < spec.pieces.size(); ++id)
    entries.emplace_back(spec.pieces[id].piece, id);
  const auto merges = bpe_merges(spec);
  // "left right" strings, as every version of `tokenizers` reads them, unless a part has a space.
  const bool spaced = std::ranges::any_of(merges, [](const auto& m) {
    return m.first.find(' ') != std::string::npos || m.second.find(' ') != std::string::npos;
  });
  ordered_json merge_list = ordered_json::array();
  for (const auto& [left, right] : merges) {
    if (spaced) {
      merge_list.push_back({left, right});
    } else {
      merge_list.push_back(left + " " + right);
    }
  }
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", unk.empty() ? ordered_json(nullptr) : ordered_json(unk)},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", true},
          {"byte_fallback", spec.byte_fallback},
          {"vocab", vocab},
          {"merges", merge_list}};
}

ordered_json unigram_model(const TokenizerSpec& spec, std::int32_t unk_id) {
  ordered_json vocab = ordered_json::array();
  for (const TokenizerPiece& p : spec.pieces)
    vocab.push_back({p.piece, p.score});
  return {{"type", "Unigram"},
          {"unk_id", unk_id < 0 ? ordered_json(nullptr) : ordered_json(unk_id)},
          {"vocab", vocab},
          {"byte_fallback", spec.byte_fallback}};
}

}  // namespace

ordered_json added_token(const std::string& content, std::optional<bool> special) {
  ordered_json t = {{"content", content},
                    {"lstrip", false},
                    {"normalized", false},
                    {"rstrip", false},
                    {"single_word", false}};
  if (special) t["special"] = *special;
  return t;
}

ordered_json hf_tokenizer_json(const Tokenizer& tokenizer) {
  const TokenizerSpec spec = tokenizer.spec();
  const std::string where = "export: tokenizer '" + tokenizer.path() + "'";
  using Algorithm = TokenizerSpec::Algorithm;
  if (spec.algorithm == Algorithm::Word || spec.algorithm == Algorithm::Char)
    throw UserError(where + " is a SentencePiece " +
                    (spec.algorithm == Algorithm::Word ? "WORD" : "CHAR") +
                    " model, which has no tokenizer.json equivalent; expected a BPE or Unigram "
                    "model");
  if (spec.treat_whitespace_as_suffix)
    throw UserError(where +
                    " treats whitespace as a suffix, which has no tokenizer.json equivalent; "
                    "expected a model trained with --treat_whitespace_as_suffix=false");
  const std::int32_t unk_id = tokenizer.unk_id();
  const std::string unk = unk_id >= 0 ? tokenizer.piece(unk_id) : "";
  ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = added_tokens(spec);
  j["normalizer"] = normalizer(spec);
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = post_processor(tokenizer);
  j["decoder"] = decoder(spec);
  j["model"] =
      spec.algorithm == Algorithm::Bpe ? bpe_model(spec, unk) : unigram_model(spec, unk_id);
  return j;
}

}  // namespace fastllm
