#pragma once
// The model's SentencePiece tokenizer (`tokenizer.model`, as Mistral and Llama ship it). Encoding
// adds no BOS and no EOS: callers add them per document (`fastllm prepare --prepend_bos
// --append_eos`). SentencePiece itself stays private to fastllm_io.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fastllm {

// One piece of the vocabulary as the model file stores it, with SentencePiece's piece type.
struct TokenizerPiece {
  enum class Kind { Normal, Unknown, Control, UserDefined, Unused, Byte };
  std::string piece;
  float score = 0;
  Kind kind = Kind::Normal;
};

// What a Hugging Face `tokenizers` serialization of the model needs (model/hf_tokenizer_json.h):
// the algorithm, the pieces and the normalisation SentencePiece applies before segmenting, read
// from the model file's protobuf (fields left out there take the protobuf's defaults).
struct TokenizerSpec {
  enum class Algorithm { Unigram, Bpe, Word, Char };
  Algorithm algorithm = Algorithm::Unigram;
  bool byte_fallback = false;
  std::string unk_piece = "<unk>";
  std::string normalizer_name;
  std::string precompiled_charsmap;  // raw bytes; empty for "identity"
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
  bool treat_whitespace_as_suffix = false;
  std::vector<TokenizerPiece> pieces;  // in id order
};

class Tokenizer {
 public:
  // `path`: a tokenizer.model file, or a folder holding one (a Hugging Face checkpoint folder).
  // Throws UserError naming the file when it is missing or not a SentencePiece model, or has no
  // EOS piece.
  explicit Tokenizer(const std::string& path);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Safe to call from several threads at once.
  std::vector<std::int32_t> encode(std::string_view text) const;
  std::string decode(std::span<const std::int32_t> ids) const;

  std::int32_t eos_id() const { return eos_id_; }
  // -1 when the model has none.
  std::int32_t bos_id() const { return bos_id_; }
  // -1 when the model has none.
  std::int32_t unk_id() const { return unk_id_; }
  // The piece of `id` as the model stores it ("<s>", "\u2581the"); throws UserError outside the
  // vocabulary.
  std::string piece(std::int32_t id) const;
  std::int64_t vocab_size() const { return vocab_size_; }
  // Parsed from the model file on each call; throws UserError when the file's protobuf is not
  // what SentencePiece wrote.
  TokenizerSpec spec() const;
  // The model file read.
  const std::string& path() const { return path_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
  std::int32_t eos_id_ = -1;
  std::int32_t bos_id_ = -1;
  std::int32_t unk_id_ = -1;
  std::int64_t vocab_size_ = 0;
};

}  // namespace fastllm
