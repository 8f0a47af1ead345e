#pragma once
// One HDF5 file shared by the ranks of an MPI communicator: the checkpoint format of docs/DESIGN.md
// section 6. HDF5 types stay in hdf5_file.cpp, so users of this header need no HDF5 headers.
//
// Two builds, one API:
// - Parallel HDF5 (FASTLLM_PARALLEL_HDF5): the file is opened by all ranks with the MPI-IO driver;
//   write_slab is a collective transfer.
// - Serial HDF5: reading, every rank opens the file read-only on its own. Writing is funnelled:
//   rank 0 holds the file and writes its own slabs at once; the other ranks keep copies of theirs
//   and, in a "round", take turns (rank 1, 2, ... passing a token) opening the file, writing and
//   closing it while rank 0 has it closed. A round runs when any rank's kept slabs would pass
//   funnel_buffer_bytes, and in flush() and commit(); so memory stays bounded, and a one-rank run
//   never closes and reopens the file. The funnel itself is io/hdf5_funnel.h.
//
// Calls marked collective must be made by every rank of the communicator, in the same order, with
// the same arguments (checked: a mismatch throws on every rank). A failure inside a collective call
// is thrown on every rank, with the message of the lowest failing rank, so ranks never hang in a
// later collective. Failures are fastllm::UserError when the file is at fault (missing, truncated,
// not HDF5, lacking a dataset or attribute, holding another dtype or shape) and
// std::runtime_error otherwise (misuse, I/O errors); messages name the file and the dataset.
//
// Writes are atomic: create() writes to `path + ".tmp"`, commit() renames it to `path` once all
// ranks are done and the data is on disk. An H5File destroyed without commit() gives the space of
// the ".tmp" back before closing it (so that closing cannot meet a full disk) and removes it.
//
// Checksums: every dataset that the ranks wrote whole (each element once) gets chunk checksums
// (io/checksum.h) in commit(), stored as the dataset "/.checksums" + its name; every read of a
// dataset that has them verifies the chunks it touches (reading whole chunks when a slab cuts
// one) and throws a UserError naming the dataset, the slab, the elements and the file on a
// mismatch. The group "/.checksums" is reserved: list_datasets leaves it out.
// Consumers of this header need MPI's include path (it takes an MPI_Comm).
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fastllm {

// Element types of stored datasets. BF16 is stored bit for bit as little-endian uint16 with the
// dataset attribute dtype = "bfloat16", since HDF5 1.10 has no bfloat16 type.
enum class H5DType : std::uint8_t { F32, F64, I64, I32, BF16 };
std::size_t h5_dtype_size(H5DType dtype);
const char* h5_dtype_name(H5DType dtype);  // float32, float64, int64, int32, bfloat16

class H5File {
 public:
  static constexpr std::size_t kDefaultFunnelBufferBytes = std::size_t{512} << 20;

  // Collective. Creates (truncating) `path + ".tmp"` for writing. funnel_buffer_bytes bounds the
  // memory each rank uses to hold slabs in the serial build (see above); ignored when parallel.
  static H5File create(const std::string& path, MPI_Comm comm,
                       std::size_t funnel_buffer_bytes = kDefaultFunnelBufferBytes);
  // Collective. Opens `path` read-only; UserError naming the file when it is missing, truncated or
  // not an HDF5 file.
  static H5File open_read(const std::string& path, MPI_Comm comm);

  H5File(H5File&&) noexcept;
  H5File& operator=(H5File&&) noexcept;
  // Collective in the parallel build (HDF5 closes an MPI-IO file collectively). An uncommitted
  // written file is closed and its ".tmp" removed.
  ~H5File();

  const std::string& path() const;  // the final path, also while writing to the ".tmp"
  bool writable() const;

  // ---- writing (files from create) ----
  // Collective. Makes a contiguous dataset of the global shape (rank >= 1), creating the groups
  // of its path ("/model/layers/q": groups /model and /model/layers).
  void define_dataset(const std::string& name, H5DType dtype,
                      const std::vector<std::int64_t>& shape);
  // Collective over the ranks (same name and dtype everywhere). Writes this rank's hyperslab
  // [offset, offset + count) from `data`, dense row-major of the count's shape. A rank with nothing
  // to write passes a count holding a 0. Ranks' hyperslabs should not overlap.
  void write_slab(const std::string& name, H5DType dtype, const std::vector<std::int64_t>& offset,
                  const std::vector<std::int64_t>& count, const void* data);
  // Collective. Sets (or replaces) an attribute on "/" (the root), a dataset or a group made by
  // define_dataset. Strings may be of any length (JSON text of megabytes).
  void set_attr_string(const std::string& object, const std::string& key, std::string_view value);
  void set_attr_int(const std::string& object, const std::string& key, std::int64_t value);
  void set_attr_double(const std::string& object, const std::string& key, double value);
  // Collective. Makes sure `bytes` fit in the file's folder before anything is written: a
  // UserError naming the folder, the bytes needed and those available when they do not, and
  // otherwise the blocks allocated to the ".tmp" (where the file system allows), so that no write
  // meets a full disk half-way.
  void reserve(std::uint64_t bytes);
  // Collective. Puts everything written so far into the file on disk (a funnel round when serial).
  void flush();
  // Collective. Flushes, closes, fsyncs and renames the ".tmp" to the final path (replacing an
  // older file there), then fsyncs the directory. The H5File is closed afterwards.
  void commit();

  // ---- reading (files from open_read); independent, any rank at any time ----
  // Reads the hyperslab [offset, offset + count) into `out`, dense row-major. UserError when the
  // dataset is missing, holds another dtype, or the slab is outside its shape.
  void read_slab(const std::string& name, H5DType dtype, const std::vector<std::int64_t>& offset,
                 const std::vector<std::int64_t>& count, void* out);
  // Collective: every rank reads its hyperslab of the same dataset in one call (a rank with nothing
  // to read passes a count holding a 0), as one collective MPI-IO transfer with parallel HDF5 and
  // as read_slab with serial HDF5. A failure on any rank is thrown on every rank.
  void read_slab_collective(const std::string& name, H5DType dtype,
                            const std::vector<std::int64_t>& offset,
                            const std::vector<std::int64_t>& count, void* out);
  std::string attr_string(const std::string& object, const std::string& key) const;
  std::int64_t attr_int(const std::string& object, const std::string& key) const;
  double attr_double(const std::string& object, const std::string& key) const;
  bool has_attr(const std::string& object, const std::string& key) const;
  // Whether a dataset has checksums (reads of it are verified).
  bool has_checksums(const std::string& name);
  // Bytes of dataset elements this rank has read with read_slab (the slabs asked for; the rest of
  // a chunk read to verify a slab that cuts it is not counted).
  std::uint64_t bytes_read() const;

  // ---- both modes (when writing: from what define_dataset was given) ----
  bool has(const std::string& name) const;  // a dataset of that name exists
  std::vector<std::int64_t> dataset_shape(const std::string& name) const;
  H5DType dataset_dtype(const std::string& name) const;
  // Full names ("/model/layers/q") of every dataset below `group` ("/" for all), sorted.
  std::vector<std::string> list_datasets(const std::string& group) const;

 private:
  struct Impl;
  explicit H5File(std::unique_ptr<Impl> impl);
  void store_checksums();
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastllm
