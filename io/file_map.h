#pragma once
// A whole file mapped read-only into memory, so that checkpoints larger than RAM are paged in
// only where a tensor is actually read.
#include <cstddef>
#include <filesystem>
#include <span>
#include <string>

namespace fastllm {

class FileMap {
 public:
  // Throws UserError naming the path when it cannot be opened or mapped.
  explicit FileMap(const std::filesystem::path& path);
  FileMap(FileMap&& other) noexcept;
  FileMap& operator=(FileMap&& other) noexcept;
  FileMap(const FileMap&) = delete;
  FileMap& operator=(const FileMap&) = delete;
  ~FileMap();

  std::span<const std::byte> bytes() const { return {data_, size_}; }
  std::size_t size() const { return size_; }

 private:
  void release() noexcept;

  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace fastllm
