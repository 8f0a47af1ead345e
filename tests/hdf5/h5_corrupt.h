#pragma once
// Corrupts a stored dataset the way a failing disk or a bad copy would: one byte of its data
// changed in place, found through the raw HDF5 C API (H5Dget_offset), not through H5File.
#include <hdf5.h>

#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>

namespace fastllm::test {

// Flips the bits of `mask` in byte `byte` of the contiguous data of `dataset` in `path`.
inline void flip_stored_byte(const std::string& path, const std::string& dataset,
                             std::uint64_t byte, unsigned char mask = 0x10) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t data = file < 0 ? -1 : H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  const haddr_t offset = data < 0 ? HADDR_UNDEF : H5Dget_offset(data);
  if (data >= 0) H5Dclose(data);
  if (file >= 0) H5Fclose(file);
  if (offset == HADDR_UNDEF)
    throw std::runtime_error("no contiguous dataset " + dataset + " in " + path);
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  io.seekg(static_cast<std::streamoff>(offset + byte));
  char value = 0;
  io.get(value);
  value = static_cast<char>(value ^ static_cast<char>(mask));
  io.seekp(static_cast<std::streamoff>(offset + byte));
  io.put(value);
  if (!io) throw std::runtime_error("cannot change byte " + std::to_string(byte) + " of " + path);
}

}  // namespace fastllm::test
