#include "io/tokenizer.h"

#include <sentencepiece_processor.h>

#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "io/error.h"

namespace fastllm {

namespace {

// A reader of protobuf's wire format, enough for the few fields of sentencepiece_model.proto that
// TokenizerSpec holds: SentencePiece installs no header for its ModelProto.
class ProtoReader {
 public:
  ProtoReader(std::string_view bytes, const std::string& path) : bytes_(bytes), path_(path) {}

  bool done() const { return pos_ == bytes_.size(); }

  // The next field's number; its wire type is kept for the value read after it.
  std::uint64_t field() {
    const std::uint64_t key = varint();
    wire_type_ = static_cast<int>(key & 7);
    return key >> 3;
  }

  std::uint64_t varint() {
    std::uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const auto byte = static_cast<std::uint8_t>(take(1)[0]);
      value |= static_cast<std::uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return value;
    }
    fail("a varint longer than 10 bytes");
  }

  std::string_view bytes() {
    expect(2);
    return take(varint());
  }

  float fixed32_float() {
    expect(5);
    const std::string_view raw = take(4);
    std::uint32_t bits = 0;
    for (int i = 3; i >= 0; --i)
      bits = (bits << 8) | static_cast<std::uint8_t>(raw[static_cast<std::size_t>(i)]);
    float value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  std::uint64_t enum_or_bool() {
    expect(0);
    return varint();
  }

  void skip() {
    switch (wire_type_) {
      case 0:
        varint();
        break;
      case 1:
        take(8);
        break;
      case 2:
        take(varint());
        break;
      case 5:
        take(4);
        break;
      default:
        fail("wire type " + std::to_string(wire_type_));
    }
  }

 private:
  std::string_view take(std::uint64_t n) {
    if (n > bytes_.size() - pos_) fail("a field running past the end");
    const std::string_view out = bytes_.substr(pos_, n);
    pos_ += n;
    return out;
  }

  void expect(int wire_type) {
    if (wire_type_ != wire_type)
      fail("wire type " + std::to_string(wire_type_) + " where " + std::to_string(wire_type) +
           " was expected");
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw UserError("tokenizer '" + path_ + "': unexpected SentencePiece model protobuf (" + what +
                    " at byte " + std::to_string(pos_) + ")");
  }

  std::string_view bytes_;
  const std::string& path_;
  std::size_t pos_ = 0;
  int wire_type_ = 0;
};

// Field numbers and enum values of sentencepiece_model.proto.
TokenizerPiece read_piece(std::string_view bytes, const std::string& path) {
  TokenizerPiece piece;
  ProtoReader r(bytes, path);
  while (!r.done()) {
    switch (r.field()) {
      case 1:
        piece.piece = std::string(r.bytes());
        break;
      case 2:
        piece.score = r.fixed32_float();
        break;
      case 3: {
        using Kind = TokenizerPiece::Kind;
        switch (r.enum_or_bool()) {
          case 2:
            piece.kind = Kind::Unknown;
            break;
          case 3:
            piece.kind = Kind::Control;
            break;
          case 4:
            piece.kind = Kind::UserDefined;
            break;
          case 5:
            piece.kind = Kind::Unused;
            break;
          case 6:
            piece.kind = Kind::Byte;
            break;
          default:
            piece.kind = Kind::Normal;
            break;
        }
        break;
      }
      default:
        r.skip();
    }
  }
  return piece;
}

void read_trainer_spec(std::string_view bytes, const std::string& path, TokenizerSpec& spec) {
  ProtoReader r(bytes, path);
  while (!r.done()) {
    switch (r.field()) {
      case 3: {
        using Algorithm = TokenizerSpec::Algorithm;
        const std::uint64_t type = r.enum_or_bool();
        spec.algorithm = type == 2   ? Algorithm::Bpe
                         : type == 3 ? Algorithm::Word
                         : type == 4 ? Algorithm::Char
                                     : Algorithm::Unigram;
        break;
      }
      case 24:
        spec.treat_whitespace_as_suffix = r.enum_or_bool() != 0;
        break;
      case 35:
        spec.byte_fallback = r.enum_or_bool() != 0;
        break;
      case 45:
        spec.unk_piece = std::string(r.bytes());
        break;
      default:
        r.skip();
    }
  }
}

void read_normalizer_spec(std::string_view bytes, const std::string& path, TokenizerSpec& spec) {
  ProtoReader r(bytes, path);
  while (!r.done()) {
    switch (r.field()) {
      case 1:
        spec.normalizer_name = std::string(r.bytes());
        break;
      case 2:
        spec.precompiled_charsmap = std::string(r.bytes());
        break;
      case 3:
        spec.add_dummy_prefix = r.enum_or_bool() != 0;
        break;
      case 4:
        spec.remove_extra_whitespaces = r.enum_or_bool() != 0;
        break;
      case 5:
        spec.escape_whitespaces = r.enum_or_bool() != 0;
        break;
      default:
        r.skip();
    }
  }
}

}  // namespace

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

TokenizerSpec Tokenizer::spec() const {
  const std::string proto = impl_->processor.serialized_model_proto();
  TokenizerSpec spec;
  ProtoReader r(proto, path_);
  while (!r.done()) {
    switch (r.field()) {
      case 1:
        spec.pieces.push_back(read_piece(r.bytes(), path_));
        break;
      case 2:
        read_trainer_spec(r.bytes(), path_, spec);
        break;
      case 3:
        read_normalizer_spec(r.bytes(), path_, spec);
        break;
      default:
        r.skip();
    }
  }
  if (static_cast<std::int64_t>(spec.pieces.size()) != vocab_size_)
    throw UserError("tokenizer '" + path_ + "': its protobuf holds " +
                    std::to_string(spec.pieces.size()) + " pieces where SentencePiece loaded " +
                    std::to_string(vocab_size_));
  return spec;
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
