#pragma once
// Megatron-LM's indexed dataset ("MMIDIDX"), byte for byte as megatron/core/datasets/
// indexed_dataset.py writes it, so data prepared by Megatron's tools is read as is and ours is read
// by Megatron.
//
// <prefix>.bin: the tokens of every sequence back to back, in the dataset's dtype, little endian.
// <prefix>.idx: little endian
//   9 bytes   magic "MMIDIDX\0\0"
//   uint64    version, 1
//   uint8     dtype code (Megatron's: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
//             7 float32, 8 uint16)
//   uint64    S, the number of sequences
//   uint64    D, the number of document indices (documents + 1)
//   int32[S]  tokens per sequence
//   int64[S]  byte offset of each sequence in the .bin
//   int64[D]  document indices: document d holds sequences [index[d], index[d + 1]); index[0] = 0
//             and index[D - 1] = S
// fastllm writes one sequence per document. The sampler works on sequences, as Megatron's
// GPTDataset does, so a Megatron dataset made with --split-sentences is read one sentence per
// sample unit.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/file_map.h"

namespace fastllm {

// Megatron's dtype codes.
enum class TokenDtype : std::uint8_t {
  kUint8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUint16 = 8,
};

std::size_t dtype_size(TokenDtype dtype);
std::string_view dtype_name(TokenDtype dtype);
// uint16 when every id of a vocabulary of this size fits in it (vocab_size <= 65536), else int32.
TokenDtype dtype_for_vocab(std::int64_t vocab_size);

// A memory-mapped, validated dataset. Opening checks the whole index against the .bin, so every
// read afterwards is in bounds.
class IndexedDataset {
 public:
  // Throws UserError naming the file, the value found and the value expected for a missing or
  // truncated .idx or .bin, a wrong magic, version or dtype code, document indices out of order,
  // or sizes and pointers that disagree with each other or with the length of the .bin.
  explicit IndexedDataset(std::string prefix);

  const std::string& prefix() const { return prefix_; }
  std::string idx_path() const { return prefix_ + ".idx"; }
  std::string bin_path() const { return prefix_ + ".bin"; }
  TokenDtype dtype() const { return dtype_; }

  std::int64_t num_sequences() const { return num_sequences_; }
  std::int64_t num_documents() const { return num_doc_indices_ - 1; }
  std::int64_t num_tokens() const { return num_tokens_; }

  // The index arrays, read in place from the mapped .idx (where they are not aligned).
  std::int32_t sequence_length(std::int64_t i) const { return load<std::int32_t>(sizes_, i); }
  std::int64_t sequence_pointer(std::int64_t i) const { return load<std::int64_t>(pointers_, i); }
  std::int64_t document_index(std::int64_t d) const { return load<std::int64_t>(doc_index_, d); }
  // Position of sequence i's first token in the token stream (its byte pointer / dtype size).
  std::int64_t sequence_start(std::int64_t i) const {
    return sequence_pointer(i) / static_cast<std::int64_t>(item_size_);
  }

  // Copies out.size() tokens of the stream of all sequences back to back, from `first`, as int32.
  // Throws std::out_of_range past the end.
  void read_tokens(std::int64_t first, std::span<std::int32_t> out) const;
  std::vector<std::int32_t> sequence(std::int64_t i) const;
  // Tokens of all the sequences of document d.
  std::vector<std::int32_t> document(std::int64_t d) const;

  // The largest token id (-1 for an empty dataset).
  std::int64_t max_token() const;
  // Throws UserError naming the .bin, the document and the token when any token id is negative
  // or not below vocab_size.
  void check_vocabulary(std::int64_t vocab_size) const;

  // The raw .bin bytes, for concatenating datasets.
  std::span<const std::byte> bin_bytes() const { return bin_.bytes(); }

 private:
  template <typename T>
  static T load(const std::byte* base, std::int64_t i) {
    T value;
    std::memcpy(&value, base + static_cast<std::size_t>(i) * sizeof(T), sizeof(T));
    return value;
  }

  std::string prefix_;
  FileMap idx_;
  FileMap bin_;
  TokenDtype dtype_ = TokenDtype::kInt32;
  std::size_t item_size_ = 4;
  std::int64_t num_sequences_ = 0;
  std::int64_t num_doc_indices_ = 0;
  std::int64_t num_tokens_ = 0;
  const std::byte* sizes_ = nullptr;
  const std::byte* pointers_ = nullptr;
  const std::byte* doc_index_ = nullptr;
};

// Writes <prefix>.bin and <prefix>.idx through <prefix>.bin.tmp and <prefix>.idx.tmp, renamed into
// place by finalize(); a writer destroyed before finalize() removes its temporary files.
class IndexedDatasetWriter {
 public:
  // dtype: an integer dtype (uint8, int8, int16, int32, int64, uint16).
  IndexedDatasetWriter(std::string prefix, TokenDtype dtype);
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;
  ~IndexedDatasetWriter();

  // One document of one sequence. Throws UserError when a token does not fit the dtype.
  void add_document(std::span<const std::int32_t> tokens);
  // Appends every sequence and document of `other` (same dtype) in order.
  void append(const IndexedDataset& other);
  void finalize();

  std::int64_t num_documents() const { return static_cast<std::int64_t>(doc_index_.size()) - 1; }
  std::int64_t num_tokens() const { return num_tokens_; }
  TokenDtype dtype() const { return dtype_; }

 private:
  struct FileCloser {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  void write_bin(const void* bytes, std::size_t count);

  std::string prefix_;
  TokenDtype dtype_;
  std::unique_ptr<std::FILE, FileCloser> bin_;
  std::vector<std::int32_t> sizes_;
  std::vector<std::int64_t> doc_index_{0};
  std::vector<std::byte> buffer_;
  std::int64_t num_tokens_ = 0;
  bool finalized_ = false;
};

}  // namespace fastllm
