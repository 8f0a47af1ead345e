#include "io/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>
#include <stdexcept>

#include "io/error.h"

namespace fastllm {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor processor;
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  std::error_code err;
  if (std::filesystem::is_directory(path, err)) {
    path_ = (std::filesystem::path(path) / "tokenizer.model").string();
  }
  if (!std::filesystem::exists(path_, err)) {
    throw UserError("tokenizer '" + path_ +
                    "' not found, expected a SentencePiece tokenizer.model");
  }
  const auto status = impl_->processor.Load(path_);
  if (!status.ok()) {
    throw UserError("tokenizer '" + path_ +
                    "' is not a SentencePiece model: " + std::string(status.message()));
  }
  vocab_size_ = impl_->processor.GetPieceSize();
  eos_id_ = impl_->processor.eos_id();
  bos_id_ = impl_->processor.bos_id();
  unk_id_ = impl_->processor.unk_id();
  if (eos_id_ < 0 || eos_id_ >= vocab_size_) {
    throw UserError("tokenizer '" + path_ + "' has no EOS piece (eos id " +
                    std::to_string(eos_id_) + "), expected one to end each document");
  }
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<std::int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = impl_->processor.Encode(text, &ids);
  if (!status.ok()) {
    throw UserError("tokenizer '" + path_ + "' cannot encode a text of " +
                    std::to_string(text.size()) + " bytes: " + std::string(status.message()));
  }
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::piece(std::int32_t id) const {
  if (id < 0 || id >= vocab_size_) {
    throw UserError("tokenizer '" + path_ + "': token id " + std::to_string(id) +
                    " is outside the vocabulary of " + std::to_string(vocab_size_));
  }
  return impl_->processor.IdToPiece(id);
}

std::string Tokenizer::decode(std::span<const std::int32_t> ids) const {
  std::vector<int> in;
  in.reserve(ids.size());
  for (std::int32_t id : ids) {
    if (id < 0 || id >= vocab_size_) {
      throw UserError("tokenizer '" + path_ + "': token id " + std::to_string(id) +
                      " is outside the vocabulary of " + std::to_string(vocab_size_));
    }
    in.push_back(id);
  }
  std::string text;
  const auto status = impl_->processor.Decode(in, &text);
  if (!status.ok()) {
    throw UserError("tokenizer '" + path_ + "' cannot decode: " + std::string(status.message()));
  }
  return text;
}

}  // namespace fastllm
