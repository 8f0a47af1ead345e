#pragma once
// Hugging Face safetensors: one file (SafetensorsFile), a checkpoint folder that may be sharded
// (SafetensorsCheckpoint), and a writer. Files are memory-mapped, so opening a checkpoint larger
// than RAM costs only its headers; a tensor's bytes are paged in when it is read.
//
// Opening validates everything the reference implementation validates: the 8-byte little-endian
// header length (at most 100,000,000, within the file), a JSON object header, known dtypes, shapes,
// and data_offsets that, sorted, tile the data section exactly. Every problem is a UserError naming
// the file, the tensor or field, what was found and what was expected.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/file_map.h"

namespace fastllm {

enum class SafetensorsDtype : std::uint8_t {
  BOOL,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  F64,
  I64,
  U64,
};
std::size_t safetensors_dtype_size(SafetensorsDtype dtype);
const char* safetensors_dtype_name(SafetensorsDtype dtype);
// The dtype spelled as in a header ("F32", "BF16", ...), or nothing when unknown.
std::optional<SafetensorsDtype> parse_safetensors_dtype(std::string_view name);

struct TensorInfo {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<std::int64_t> shape;  // empty for a scalar
  // Byte range [begin, end) relative to the start of the data section (after the header).
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  std::int64_t numel() const;
  std::uint64_t bytes() const { return end - begin; }
};

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::string& path() const { return path_; }
  // In file order (ascending data offsets).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The header's __metadata__ (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when the file has no such tensor.
  const TensorInfo* find(std::string_view name) const;
  // Throws UserError naming the file and tensor when absent.
  const TensorInfo& info(std::string_view name) const;
  // The stored bytes, little-endian, valid while this object lives; no alignment is promised.
  std::span<const std::byte> raw(std::string_view name) const;
  // F32 as is; BF16 and F16 widened exactly; F64 rounded to nearest. Other dtypes: UserError.
  std::vector<float> read_f32(std::string_view name) const;
  // As read_f32, into out, whose size must equal the tensor's element count.
  void read_f32_into(std::string_view name, std::span<float> out) const;
  // I64 as is, I32 widened. Other dtypes: UserError.
  std::vector<std::int64_t> read_i64(std::string_view name) const;

 private:
  SafetensorsFile(std::string path, FileMap map) : path_(std::move(path)), map_(std::move(map)) {}

  std::string path_;
  FileMap map_;
  std::size_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// A Hugging Face checkpoint: a folder holding model.safetensors, or shards listed by the
// weight_map of model.safetensors.index.json (model.safetensors wins when both exist, as in
// transformers), or a single .safetensors file. All files are opened and validated up front,
// and every tensor the index names must be in the shard it names.
class SafetensorsCheckpoint {
 public:
  static SafetensorsCheckpoint open(const std::filesystem::path& folder_or_file);

  const std::string& path() const { return path_; }
  bool has(std::string_view name) const { return where_.find(name) != where_.end(); }
  // Sorted.
  std::vector<std::string> names() const;
  // These throw UserError naming the tensor and the checkpoint when it is in no file.
  const TensorInfo& info(std::string_view name) const;
  const SafetensorsFile& file_of(std::string_view name) const;
  std::span<const std::byte> raw(std::string_view name) const;
  std::vector<float> read_f32(std::string_view name) const;
  void read_f32_into(std::string_view name, std::span<float> out) const;
  std::vector<std::int64_t> read_i64(std::string_view name) const;

 private:
  std::string path_;
  std::string listing_;  // what lists the tensors, for messages: the index or the single file
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t, std::less<>> where_;  // tensor -> index into files_
};

// One tensor to write; data must hold numel(shape) * dtype size bytes, little-endian.
struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;
};

// Writes a file the reference implementation reads: header keys sorted, tensor data in header
// order, header padded with spaces to a multiple of 8 bytes. The file is written to path + ".tmp",
// synced and renamed, so an error never leaves a partial file at path.
void write_safetensors(const std::filesystem::path& path,
                       std::span<const SafetensorsTensor> tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace fastllm
