#include "io/indexed_dataset.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <system_error>
#include <utility>

#include "io/error.h"

namespace fastllm {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the indexed dataset is little endian and is read in place");

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr std::uint64_t kVersion = 1;
// magic, version, dtype code, sequence count, document index count.
constexpr std::size_t kHeaderSize = 9 + 8 + 1 + 8 + 8;

std::string errno_text(int err) {
  return std::system_category().message(err);
}

// Printable form of raw header bytes for an error message.
std::string escape_bytes(const std::byte* bytes, std::size_t count) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < count; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

bool is_integer_dtype(TokenDtype dtype) {
  return dtype != TokenDtype::kFloat32 && dtype != TokenDtype::kFloat64;
}

template <typename T>
void convert_tokens(const std::byte* src, std::size_t count, std::int32_t* out) {
  for (std::size_t i = 0; i < count; ++i) {
    T value;
    std::memcpy(&value, src + i * sizeof(T), sizeof(T));
    out[i] = static_cast<std::int32_t>(value);
  }
}

// Tokens [first, first + count) of a .bin of the given dtype, converted to int32.
void read_converted(TokenDtype dtype, const std::byte* bin, std::int64_t first, std::size_t count,
                    std::int32_t* out) {
  const std::byte* src = bin + static_cast<std::size_t>(first) * dtype_size(dtype);
  switch (dtype) {
    case TokenDtype::kUint8:
      convert_tokens<std::uint8_t>(src, count, out);
      break;
    case TokenDtype::kInt8:
      convert_tokens<std::int8_t>(src, count, out);
      break;
    case TokenDtype::kInt16:
      convert_tokens<std::int16_t>(src, count, out);
      break;
    case TokenDtype::kInt32:
      convert_tokens<std::int32_t>(src, count, out);
      break;
    case TokenDtype::kInt64:
      convert_tokens<std::int64_t>(src, count, out);
      break;
    case TokenDtype::kUint16:
      convert_tokens<std::uint16_t>(src, count, out);
      break;
    case TokenDtype::kFloat32:
    case TokenDtype::kFloat64:
      throw std::logic_error("float token dtype");
  }
}

// Token i of the .bin as a wide integer, so int64 ids beyond int32 are seen as they are.
std::int64_t token_at(TokenDtype dtype, const std::byte* bin, std::int64_t i) {
  const std::byte* src = bin + static_cast<std::size_t>(i) * dtype_size(dtype);
  auto load = [src]<typename T>(T) {
    T value;
    std::memcpy(&value, src, sizeof(T));
    return static_cast<std::int64_t>(value);
  };
  switch (dtype) {
    case TokenDtype::kUint8:
      return load(std::uint8_t{});
    case TokenDtype::kInt8:
      return load(std::int8_t{});
    case TokenDtype::kInt16:
      return load(std::int16_t{});
    case TokenDtype::kInt32:
      return load(std::int32_t{});
    case TokenDtype::kInt64:
      return load(std::int64_t{});
    case TokenDtype::kUint16:
      return load(std::uint16_t{});
    case TokenDtype::kFloat32:
    case TokenDtype::kFloat64:
      break;
  }
  throw std::logic_error("float token dtype");
}

template <typename T>
void minmax_tokens(const std::byte* bin, std::int64_t count, std::int64_t& lo, std::int64_t& hi) {
  std::int64_t local_lo = std::numeric_limits<std::int64_t>::max();
  std::int64_t local_hi = std::numeric_limits<std::int64_t>::min();
#pragma omp parallel for reduction(min : local_lo) reduction(max : local_hi) schedule(static)
  for (std::int64_t i = 0; i < count; ++i) {
    T value;
    std::memcpy(&value, bin + static_cast<std::size_t>(i) * sizeof(T), sizeof(T));
    local_lo = std::min(local_lo, static_cast<std::int64_t>(value));
    local_hi = std::max(local_hi, static_cast<std::int64_t>(value));
  }
  lo = local_lo;
  hi = local_hi;
}

void token_range(TokenDtype dtype, const std::byte* bin, std::int64_t count, std::int64_t& lo,
                 std::int64_t& hi) {
  switch (dtype) {
    case TokenDtype::kUint8:
      return minmax_tokens<std::uint8_t>(bin, count, lo, hi);
    case TokenDtype::kInt8:
      return minmax_tokens<std::int8_t>(bin, count, lo, hi);
    case TokenDtype::kInt16:
      return minmax_tokens<std::int16_t>(bin, count, lo, hi);
    case TokenDtype::kInt32:
      return minmax_tokens<std::int32_t>(bin, count, lo, hi);
    case TokenDtype::kInt64:
      return minmax_tokens<std::int64_t>(bin, count, lo, hi);
    case TokenDtype::kUint16:
      return minmax_tokens<std::uint16_t>(bin, count, lo, hi);
    case TokenDtype::kFloat32:
    case TokenDtype::kFloat64:
      break;
  }
  throw std::logic_error("float token dtype");
}

std::pair<std::int64_t, std::int64_t> dtype_limits(TokenDtype dtype) {
  switch (dtype) {
    case TokenDtype::kUint8:
      return {0, 255};
    case TokenDtype::kInt8:
      return {-128, 127};
    case TokenDtype::kInt16:
      return {-32768, 32767};
    case TokenDtype::kUint16:
      return {0, 65535};
    default:
      return {std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()};
  }
}

// Missing files are reported before FileMap opens them, with what the prefix was.
FileMap open_part(const std::string& prefix, const char* suffix, const char* what) {
  const std::string path = prefix + suffix;
  std::error_code err;
  if (!std::filesystem::exists(path, err)) {
    throw UserError(std::string("dataset ") + what + " '" + path + "' not found (dataset prefix '" +
                    prefix + "', expected " + prefix + ".idx and " + prefix + ".bin)");
  }
  return FileMap(path);
}

}  // namespace

std::size_t dtype_size(TokenDtype dtype) {
  switch (dtype) {
    case TokenDtype::kUint8:
    case TokenDtype::kInt8:
      return 1;
    case TokenDtype::kInt16:
    case TokenDtype::kUint16:
      return 2;
    case TokenDtype::kInt32:
    case TokenDtype::kFloat32:
      return 4;
    case TokenDtype::kInt64:
    case TokenDtype::kFloat64:
      return 8;
  }
  throw std::logic_error("unknown token dtype");
}

std::string_view dtype_name(TokenDtype dtype) {
  switch (dtype) {
    case TokenDtype::kUint8:
      return "uint8";
    case TokenDtype::kInt8:
      return "int8";
    case TokenDtype::kInt16:
      return "int16";
    case TokenDtype::kInt32:
      return "int32";
    case TokenDtype::kInt64:
      return "int64";
    case TokenDtype::kFloat64:
      return "float64";
    case TokenDtype::kFloat32:
      return "float32";
    case TokenDtype::kUint16:
      return "uint16";
  }
  throw std::logic_error("unknown token dtype");
}

TokenDtype dtype_for_vocab(std::int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDtype::kUint16 : TokenDtype::kInt32;
}

// ---------------------------------------------------------------------------------------------
// IndexedDataset

IndexedDataset::IndexedDataset(std::string prefix)
    : prefix_(std::move(prefix)),
      idx_(open_part(prefix_, ".idx", "index")),
      bin_(open_part(prefix_, ".bin", "tokens")) {
  const std::string idx_name = idx_path();
  const std::byte* idx = idx_.bytes().data();
  if (idx_.size() < kHeaderSize) {
    throw UserError("dataset index '" + idx_name +
                    "' is truncated: " + std::to_string(idx_.size()) +
                    " bytes, the header alone is " + std::to_string(kHeaderSize));
  }
  if (std::memcmp(idx, kMagic, sizeof kMagic) != 0) {
    throw UserError("'" + idx_name + "' is not a Megatron indexed dataset: magic '" +
                    escape_bytes(idx, sizeof kMagic) + "' found, 'MMIDIDX\\x00\\x00' expected");
  }
  std::uint64_t version = 0;
  std::memcpy(&version, idx + 9, 8);
  if (version != kVersion) {
    throw UserError("dataset index '" + idx_name + "': version " + std::to_string(version) +
                    " found, 1 expected");
  }
  const auto code = static_cast<unsigned>(static_cast<std::uint8_t>(idx[17]));
  if (code < 1 || code > 8) {
    throw UserError("dataset index '" + idx_name + "': dtype code " + std::to_string(code) +
                    " found, expected one of Megatron's codes 1 to 8");
  }
  dtype_ = static_cast<TokenDtype>(code);
  if (!is_integer_dtype(dtype_)) {
    throw UserError("dataset index '" + idx_name + "': dtype code " + std::to_string(code) + " (" +
                    std::string(dtype_name(dtype_)) +
                    ") found, token ids need an integer dtype (codes 1 to 5 or 8)");
  }
  item_size_ = dtype_size(dtype_);

  std::uint64_t num_sequences = 0;
  std::uint64_t num_doc_indices = 0;
  std::memcpy(&num_sequences, idx + 18, 8);
  std::memcpy(&num_doc_indices, idx + 26, 8);
  // Bounded by the file size first, so the expected size below cannot overflow.
  const std::uint64_t room = idx_.size() - kHeaderSize;
  if (num_sequences > room / 12 || num_doc_indices > room / 8) {
    throw UserError("dataset index '" + idx_name + "' is truncated: it declares " +
                    std::to_string(num_sequences) + " sequences and " +
                    std::to_string(num_doc_indices) + " document indices, " +
                    std::to_string(idx_.size()) + " bytes cannot hold them");
  }
  const std::uint64_t expected = kHeaderSize + 12 * num_sequences + 8 * num_doc_indices;
  if (idx_.size() != expected) {
    throw UserError("dataset index '" + idx_name + "' is " + std::to_string(idx_.size()) +
                    " bytes, " + std::to_string(expected) + " expected for " +
                    std::to_string(num_sequences) + " sequences and " +
                    std::to_string(num_doc_indices) + " document indices" +
                    (idx_.size() < expected ? " (truncated)" : ""));
  }
  num_sequences_ = static_cast<std::int64_t>(num_sequences);
  num_doc_indices_ = static_cast<std::int64_t>(num_doc_indices);
  sizes_ = idx + kHeaderSize;
  pointers_ = sizes_ + 4 * num_sequences;
  doc_index_ = pointers_ + 8 * num_sequences;

  if (num_doc_indices_ < 1 || document_index(0) != 0 ||
      document_index(num_doc_indices_ - 1) != num_sequences_) {
    throw UserError("dataset index '" + idx_name + "': document indices run from " +
                    (num_doc_indices_ < 1
                         ? std::string("nothing")
                         : std::to_string(document_index(0)) + " to " +
                               std::to_string(document_index(num_doc_indices_ - 1))) +
                    ", expected 0 to the sequence count " + std::to_string(num_sequences_));
  }
  for (std::int64_t d = 1; d < num_doc_indices_; ++d) {
    if (document_index(d) < document_index(d - 1)) {
      throw UserError("dataset index '" + idx_name + "': document index " + std::to_string(d) +
                      " is " + std::to_string(document_index(d)) + ", below the one before it (" +
                      std::to_string(document_index(d - 1)) + ")");
    }
  }

  const auto item = static_cast<std::int64_t>(item_size_);
  std::int64_t expected_pointer = 0;
  for (std::int64_t i = 0; i < num_sequences_; ++i) {
    const std::int32_t length = sequence_length(i);
    if (length < 0) {
      throw UserError("dataset index '" + idx_name + "': sequence " + std::to_string(i) + " has " +
                      std::to_string(length) + " tokens, expected a count >= 0");
    }
    if (sequence_pointer(i) != expected_pointer) {
      throw UserError("dataset index '" + idx_name + "': sequence " + std::to_string(i) +
                      " starts at byte " + std::to_string(sequence_pointer(i)) + ", " +
                      std::to_string(expected_pointer) +
                      " expected from the sizes of the sequences before it");
    }
    expected_pointer += length * item;
  }
  if (static_cast<std::uint64_t>(expected_pointer) != bin_.size()) {
    throw UserError("dataset tokens '" + bin_path() + "' are " + std::to_string(bin_.size()) +
                    " bytes, but the sizes in '" + idx_name + "' add up to " +
                    std::to_string(expected_pointer / item) + " " +
                    std::string(dtype_name(dtype_)) +
                    " tokens = " + std::to_string(expected_pointer) + " bytes");
  }
  num_tokens_ = expected_pointer / item;
}

void IndexedDataset::read_tokens(std::int64_t first, std::span<std::int32_t> out) const {
  const auto count = static_cast<std::int64_t>(out.size());
  if (first < 0 || count > num_tokens_ || first > num_tokens_ - count) {
    throw std::out_of_range("tokens [" + std::to_string(first) + ", " +
                            std::to_string(first + count) + ") of '" + bin_path() + "' with " +
                            std::to_string(num_tokens_) + " tokens");
  }
  if (out.empty()) return;
  read_converted(dtype_, bin_.bytes().data(), first, out.size(), out.data());
}

std::vector<std::int32_t> IndexedDataset::sequence(std::int64_t i) const {
  if (i < 0 || i >= num_sequences_) {
    throw std::out_of_range("sequence " + std::to_string(i) + " of '" + prefix_ + "' with " +
                            std::to_string(num_sequences_));
  }
  std::vector<std::int32_t> out(static_cast<std::size_t>(sequence_length(i)));
  read_tokens(sequence_start(i), out);
  return out;
}

std::vector<std::int32_t> IndexedDataset::document(std::int64_t d) const {
  if (d < 0 || d >= num_documents()) {
    throw std::out_of_range("document " + std::to_string(d) + " of '" + prefix_ + "' with " +
                            std::to_string(num_documents()));
  }
  const std::int64_t begin = document_index(d);
  const std::int64_t end = document_index(d + 1);
  if (begin == end) return {};
  const std::int64_t first = sequence_start(begin);
  const std::int64_t last = sequence_start(end - 1) + sequence_length(end - 1);
  std::vector<std::int32_t> out(static_cast<std::size_t>(last - first));
  read_tokens(first, out);
  return out;
}

std::int64_t IndexedDataset::max_token() const {
  if (num_tokens_ == 0) return -1;
  std::int64_t lo = 0;
  std::int64_t hi = 0;
  token_range(dtype_, bin_.bytes().data(), num_tokens_, lo, hi);
  return hi;
}

void IndexedDataset::check_vocabulary(std::int64_t vocab_size) const {
  if (num_tokens_ == 0) return;
  std::int64_t lo = 0;
  std::int64_t hi = 0;
  token_range(dtype_, bin_.bytes().data(), num_tokens_, lo, hi);
  if (lo >= 0 && hi < vocab_size) return;
  // Rare path: find the first offending token, to name where it is.
  std::int64_t position = 0;
  std::int64_t token = 0;
  for (; position < num_tokens_; ++position) {
    token = token_at(dtype_, bin_.bytes().data(), position);
    if (token < 0 || token >= vocab_size) break;
  }
  // The sequence holding `position`: the last one starting at or before it.
  std::int64_t lo_seq = 0;
  std::int64_t hi_seq = num_sequences_;
  while (hi_seq - lo_seq > 1) {
    const std::int64_t mid = (lo_seq + hi_seq) / 2;
    if (sequence_start(mid) <= position) {
      lo_seq = mid;
    } else {
      hi_seq = mid;
    }
  }
  std::int64_t document = 0;
  {
    std::int64_t lo_doc = 0;
    std::int64_t hi_doc = num_doc_indices_ - 1;
    while (hi_doc - lo_doc > 1) {
      const std::int64_t mid = (lo_doc + hi_doc) / 2;
      if (document_index(mid) <= lo_seq) {
        lo_doc = mid;
      } else {
        hi_doc = mid;
      }
    }
    document = lo_doc;
  }
  throw UserError("dataset tokens '" + bin_path() + "': document " + std::to_string(document) +
                  " (token " + std::to_string(position - sequence_start(lo_seq)) + " of sequence " +
                  std::to_string(lo_seq) + ") holds token id " + std::to_string(token) +
                  ", expected ids 0 to " + std::to_string(vocab_size - 1) + " of a vocabulary of " +
                  std::to_string(vocab_size));
}

// ---------------------------------------------------------------------------------------------
// IndexedDatasetWriter

IndexedDatasetWriter::IndexedDatasetWriter(std::string prefix, TokenDtype dtype)
    : prefix_(std::move(prefix)), dtype_(dtype) {
  if (!is_integer_dtype(dtype_)) {
    throw UserError("dataset '" + prefix_ + "': dtype " + std::string(dtype_name(dtype_)) +
                    " cannot hold token ids, expected an integer dtype");
  }
  const std::string tmp = prefix_ + ".bin.tmp";
  bin_.reset(std::fopen(tmp.c_str(), "wb"));
  if (!bin_) throw UserError("cannot create '" + tmp + "': " + errno_text(errno));
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (finalized_) return;
  bin_.reset();
  std::error_code ignored;
  std::filesystem::remove(prefix_ + ".bin.tmp", ignored);
  std::filesystem::remove(prefix_ + ".idx.tmp", ignored);
}

void IndexedDatasetWriter::write_bin(const void* bytes, std::size_t count) {
  if (count == 0) return;
  if (std::fwrite(bytes, 1, count, bin_.get()) != count) {
    throw UserError("cannot write '" + prefix_ + ".bin.tmp': " + errno_text(errno));
  }
}

void IndexedDatasetWriter::add_document(std::span<const std::int32_t> tokens) {
  if (finalized_) throw std::logic_error("add_document after finalize");
  if (tokens.size() > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max())) {
    throw UserError("dataset '" + prefix_ + "': document " + std::to_string(num_documents()) +
                    " has " + std::to_string(tokens.size()) +
                    " tokens, a sequence holds at most 2147483647");
  }
  const auto [lo, hi] = dtype_limits(dtype_);
  const std::size_t item = dtype_size(dtype_);
  buffer_.resize(tokens.size() * item);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const std::int64_t t = tokens[i];
    if (t < lo || t > hi) {
      throw UserError("dataset '" + prefix_ + "': document " + std::to_string(num_documents()) +
                      " token " + std::to_string(i) + " is " + std::to_string(t) + ", a " +
                      std::string(dtype_name(dtype_)) + " holds " + std::to_string(lo) + " to " +
                      std::to_string(hi));
    }
    std::byte* dst = buffer_.data() + i * item;
    switch (dtype_) {
      case TokenDtype::kUint8:
        *dst = static_cast<std::byte>(t);
        break;
      case TokenDtype::kInt8:
        *dst = static_cast<std::byte>(static_cast<std::int8_t>(t));
        break;
      case TokenDtype::kInt16: {
        const auto v = static_cast<std::int16_t>(t);
        std::memcpy(dst, &v, 2);
        break;
      }
      case TokenDtype::kUint16: {
        const auto v = static_cast<std::uint16_t>(t);
        std::memcpy(dst, &v, 2);
        break;
      }
      case TokenDtype::kInt32: {
        const auto v = static_cast<std::int32_t>(t);
        std::memcpy(dst, &v, 4);
        break;
      }
      default:
        std::memcpy(dst, &t, 8);
        break;
    }
  }
  write_bin(buffer_.data(), buffer_.size());
  sizes_.push_back(static_cast<std::int32_t>(tokens.size()));
  doc_index_.push_back(static_cast<std::int64_t>(sizes_.size()));
  num_tokens_ += static_cast<std::int64_t>(tokens.size());
}

void IndexedDatasetWriter::append(const IndexedDataset& other) {
  if (finalized_) throw std::logic_error("append after finalize");
  if (other.dtype() != dtype_) {
    throw UserError("cannot append dataset '" + other.prefix() + "' of dtype " +
                    std::string(dtype_name(other.dtype())) + " to '" + prefix_ + "' of dtype " +
                    std::string(dtype_name(dtype_)));
  }
  const std::span<const std::byte> bytes = other.bin_bytes();
  write_bin(bytes.data(), bytes.size());
  const auto offset = static_cast<std::int64_t>(sizes_.size());
  for (std::int64_t i = 0; i < other.num_sequences(); ++i)
    sizes_.push_back(other.sequence_length(i));
  for (std::int64_t d = 1; d <= other.num_documents(); ++d) {
    doc_index_.push_back(offset + other.document_index(d));
  }
  num_tokens_ += other.num_tokens();
}

void IndexedDatasetWriter::finalize() {
  if (finalized_) throw std::logic_error("finalize called twice");
  const std::string bin_tmp = prefix_ + ".bin.tmp";
  const std::string idx_tmp = prefix_ + ".idx.tmp";
  if (std::fflush(bin_.get()) != 0) {
    throw UserError("cannot write '" + bin_tmp + "': " + errno_text(errno));
  }
  if (std::fclose(bin_.release()) != 0) {
    throw UserError("cannot close '" + bin_tmp + "': " + errno_text(errno));
  }

  std::unique_ptr<std::FILE, FileCloser> idx(std::fopen(idx_tmp.c_str(), "wb"));
  if (!idx) throw UserError("cannot create '" + idx_tmp + "': " + errno_text(errno));
  auto put = [&](const void* bytes, std::size_t count) {
    if (count != 0 && std::fwrite(bytes, 1, count, idx.get()) != count) {
      throw UserError("cannot write '" + idx_tmp + "': " + errno_text(errno));
    }
  };
  const std::uint64_t version = kVersion;
  const auto code = static_cast<std::uint8_t>(dtype_);
  const auto num_sequences = static_cast<std::uint64_t>(sizes_.size());
  const auto num_doc_indices = static_cast<std::uint64_t>(doc_index_.size());
  put(kMagic, sizeof kMagic);
  put(&version, 8);
  put(&code, 1);
  put(&num_sequences, 8);
  put(&num_doc_indices, 8);
  put(sizes_.data(), sizes_.size() * sizeof(std::int32_t));
  // Pointers in blocks, so a large index needs no second full-size array.
  const auto item = static_cast<std::int64_t>(dtype_size(dtype_));
  std::vector<std::int64_t> block;
  block.reserve(1 << 16);
  std::int64_t pointer = 0;
  for (std::int32_t length : sizes_) {
    block.push_back(pointer);
    pointer += length * item;
    if (block.size() == block.capacity()) {
      put(block.data(), block.size() * sizeof(std::int64_t));
      block.clear();
    }
  }
  put(block.data(), block.size() * sizeof(std::int64_t));
  put(doc_index_.data(), doc_index_.size() * sizeof(std::int64_t));
  if (std::fflush(idx.get()) != 0) {
    throw UserError("cannot write '" + idx_tmp + "': " + errno_text(errno));
  }
  if (std::fclose(idx.release()) != 0) {
    throw UserError("cannot close '" + idx_tmp + "': " + errno_text(errno));
  }

  std::error_code err;
  std::filesystem::rename(bin_tmp, prefix_ + ".bin", err);
  if (!err) std::filesystem::rename(idx_tmp, prefix_ + ".idx", err);
  if (err) throw UserError("cannot rename '" + prefix_ + "' into place: " + err.message());
  finalized_ = true;
}

}  // namespace fastllm
