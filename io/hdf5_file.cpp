#include "io/hdf5_file.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <stdexcept>
#include <utility>

#include "io/checksum.h"
#include "io/error.h"
#include "io/hdf5_funnel.h"

#if !H5_VERSION_GE(1, 10, 2)
#error "fastllm needs HDF5 1.10.2 or newer"
#endif

namespace fastllm {
namespace {

constexpr const char* kBf16Attr = "dtype";
constexpr const char* kBf16Name = "bfloat16";
// The checksums of dataset NAME are the int64 dataset kChecksumGroup + NAME (uint64 bits), one per
// chunk, with the chunk's element count in its attribute kChunkAttr (io/checksum.h).
constexpr const char* kChecksumGroup = "/.checksums";
constexpr const char* kChunkAttr = "chunk_elements";

bool reserved_name(const std::string& full) {
  return full == kChecksumGroup || full.starts_with(std::string(kChecksumGroup) + "/");
}

// Owns one HDF5 identifier; closing it is the destructor's job unless close() reports a failure.
class Id {
 public:
  using Closer = herr_t (*)(hid_t);
  Id() = default;
  Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  Id(Id&& other) noexcept
      : id_(std::exchange(other.id_, H5I_INVALID_HID)), closer_(other.closer_) {}
  Id& operator=(Id&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
      closer_ = other.closer_;
    }
    return *this;
  }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  ~Id() { reset(); }

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset() { static_cast<void>(close()); }
  bool close() {
    const bool ok = id_ < 0 || closer_(id_) >= 0;
    id_ = H5I_INVALID_HID;
    return ok;
  }
  // Forgets the identifier without closing it (HDF5 is already shut down).
  void release() { id_ = H5I_INVALID_HID; }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// The innermost message of HDF5's error stack (the most specific one), which is then cleared.
std::string h5_detail() {
  std::string detail;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* error, void* out) -> herr_t {
        if (error->desc != nullptr && error->desc[0] != '\0') {
          *static_cast<std::string*>(out) = error->desc;
        }
        return 0;
      },
      &detail);
  H5Eclear2(H5E_DEFAULT);
  return detail.empty() ? std::string("no detail from HDF5") : detail;
}

void quiet_hdf5() {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

hid_t file_type(H5DType dtype) {
  switch (dtype) {
    case H5DType::F32:
      return H5T_IEEE_F32LE;
    case H5DType::F64:
      return H5T_IEEE_F64LE;
    case H5DType::I64:
      return H5T_STD_I64LE;
    case H5DType::I32:
      return H5T_STD_I32LE;
    case H5DType::BF16:
      return H5T_STD_U16LE;
  }
  throw std::runtime_error("unknown H5DType");
}

hid_t memory_type(H5DType dtype) {
  switch (dtype) {
    case H5DType::F32:
      return H5T_NATIVE_FLOAT;
    case H5DType::F64:
      return H5T_NATIVE_DOUBLE;
    case H5DType::I64:
      return H5T_NATIVE_INT64;
    case H5DType::I32:
      return H5T_NATIVE_INT32;
    case H5DType::BF16:
      return H5T_NATIVE_UINT16;
  }
  throw std::runtime_error("unknown H5DType");
}

std::string format_dims(const std::vector<std::int64_t>& dims) {
  std::string text = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(dims[i]);
  }
  return text + "]";
}

std::string in_quotes(const std::string& text) {
  return "'" + text + "'";
}

// "/a/b" for "a/b", "/a//b/" and "/a/b"; "/" for "" and "/".
std::string normalize(const std::string& name) {
  std::string result;
  for (char c : name) {
    if (c != '/' || result.empty() || result.back() != '/') result += c;
  }
  if (result.empty() || result.front() != '/') result.insert(result.begin(), '/');
  if (result.size() > 1 && result.back() == '/') result.pop_back();
  return result;
}

std::vector<hsize_t> to_hsize(const std::vector<std::int64_t>& dims) {
  return std::vector<hsize_t>(dims.begin(), dims.end());
}

// Checks [offset, offset + count) against shape; returns the element count. `what` names the
// dataset and file for the message.
template <class Error>
std::int64_t check_slab(const std::string& what, const std::vector<std::int64_t>& shape,
                        const std::vector<std::int64_t>& offset,
                        const std::vector<std::int64_t>& count) {
  std::int64_t elements = 1;
  bool inside = offset.size() == shape.size() && count.size() == shape.size();
  for (std::size_t i = 0; inside && i < shape.size(); ++i) {
    inside = offset[i] >= 0 && count[i] >= 0 && offset[i] + count[i] <= shape[i];
    elements *= count[i];
  }
  if (!inside) {
    throw Error("slab at offset " + format_dims(offset) + " of count " + format_dims(count) +
                " does not fit " + what + " of shape " + format_dims(shape));
  }
  return elements;
}

// Selects the slab in a dataset's file space and makes the matching memory space; an empty slab
// selects nothing in both, which collective transfers need from ranks without data.
std::pair<Id, Id> slab_spaces(hid_t dataset, const std::vector<std::int64_t>& offset,
                              const std::vector<std::int64_t>& count, std::int64_t elements) {
  Id file_space(H5Dget_space(dataset), H5Sclose);
  if (!file_space.valid()) return {};
  if (elements == 0) {
    const hsize_t one = 1;
    Id memory_space(H5Screate_simple(1, &one, nullptr), H5Sclose);
    if (!memory_space.valid() || H5Sselect_none(memory_space.get()) < 0 ||
        H5Sselect_none(file_space.get()) < 0) {
      return {};
    }
    return {std::move(file_space), std::move(memory_space)};
  }
  const std::vector<hsize_t> start = to_hsize(offset);
  const std::vector<hsize_t> size = to_hsize(count);
  Id memory_space(H5Screate_simple(static_cast<int>(size.size()), size.data(), nullptr), H5Sclose);
  if (!memory_space.valid() || H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(),
                                                   nullptr, size.data(), nullptr) < 0) {
    return {};
  }
  return {std::move(file_space), std::move(memory_space)};
}

Id string_type(std::size_t length) {
  Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  // HDF5 refuses zero-length string types; an empty value is one padding byte.
  if (!type.valid() || H5Tset_size(type.get(), std::max<std::size_t>(length, 1)) < 0 ||
      H5Tset_strpad(type.get(), H5T_STR_NULLPAD) < 0 ||
      H5Tset_cset(type.get(), H5T_CSET_UTF8) < 0) {
    return {};
  }
  return type;
}

// Writes a scalar attribute, replacing one of the same name. Returns false on an HDF5 failure.
bool put_attribute(hid_t object, const std::string& key, hid_t type, hid_t memory,
                   const void* value) {
  const htri_t exists = H5Aexists(object, key.c_str());
  if (exists < 0 || (exists > 0 && H5Adelete(object, key.c_str()) < 0)) return false;
  Id space(H5Screate(H5S_SCALAR), H5Sclose);
  if (!space.valid()) return false;
  Id attribute(H5Acreate2(object, key.c_str(), type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
               H5Aclose);
  return attribute.valid() && H5Awrite(attribute.get(), memory, value) >= 0 && attribute.close();
}

bool put_string_attribute(hid_t object, const std::string& key, std::string_view value) {
  Id type = string_type(value.size());
  const char empty = '\0';
  return type.valid() &&
         put_attribute(object, key, type.get(), type.get(), value.empty() ? &empty : value.data());
}

// Reads a scalar string attribute, fixed or variable length. Returns false when it is not one.
bool get_string_attribute(hid_t attribute, std::string& value) {
  Id type(H5Aget_type(attribute), H5Tclose);
  Id space(H5Aget_space(attribute), H5Sclose);
  if (!type.valid() || !space.valid() || H5Tget_class(type.get()) != H5T_STRING ||
      H5Sget_simple_extent_npoints(space.get()) != 1) {
    return false;
  }
  const htri_t variable = H5Tis_variable_str(type.get());
  if (variable < 0) return false;
  if (variable > 0) {
    Id memory(H5Tcopy(H5T_C_S1), H5Tclose);
    char* text = nullptr;
    if (!memory.valid() || H5Tset_size(memory.get(), H5T_VARIABLE) < 0 ||
        H5Aread(attribute, memory.get(), &text) < 0) {
      return false;
    }
    value = text == nullptr ? std::string() : std::string(text);
    H5free_memory(text);
    return true;
  }
  const std::size_t size = H5Tget_size(type.get());
  Id memory = string_type(size);
  value.assign(size, '\0');
  if (!memory.valid() || H5Aread(attribute, memory.get(), value.data()) < 0) return false;
  value.resize(value.find_last_not_of('\0') + 1);
  return true;
}

// Whether every link along `name` exists and the last one is an object of `type`.
bool object_is(hid_t file, const std::string& name, H5I_type_t type) {
  if (name == "/") return type == H5I_GROUP;
  for (std::size_t slash = name.find('/', 1);; slash = name.find('/', slash + 1)) {
    const std::string prefix = name.substr(0, slash);
    if (H5Lexists(file, prefix.c_str(), H5P_DEFAULT) <= 0) {
      H5Eclear2(H5E_DEFAULT);
      return false;
    }
    if (slash == std::string::npos) break;
  }
  Id object(H5Oopen(file, name.c_str(), H5P_DEFAULT), H5Oclose);
  if (!object.valid()) {
    H5Eclear2(H5E_DEFAULT);
    return false;
  }
  return H5Iget_type(object.get()) == type;
}

// Collects the full names of the datasets below a group, depth first. The link-info argument's
// type differs between HDF5 versions, hence the template.
struct Listing {
  std::string prefix;
  std::vector<std::string>* names;
};

template <class LinkInfo>
herr_t list_link(hid_t group, const char* name, const LinkInfo*, void* data) {
  const auto* listing = static_cast<Listing*>(data);
  Id object(H5Oopen(group, name, H5P_DEFAULT), H5Oclose);
  if (!object.valid()) return -1;
  const std::string full = listing->prefix + name;
  const H5I_type_t type = H5Iget_type(object.get());
  if (type == H5I_DATASET) listing->names->push_back(full);
  if (type == H5I_GROUP) {
    Listing inner{full + "/", listing->names};
    return H5Literate(object.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr, &list_link, &inner);
  }
  return 0;
}

Id file_access(MPI_Comm comm, bool writing) {
  Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (!fapl.valid()) return {};
  // Object headers of the 1.8 format keep attributes over 64 KiB (JSON configs) in dense storage;
  // nothing newer than 1.10 so that HDF5 1.10 tools read the files.
  bool ok = H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_V110) >= 0;
  // Large datasets start on 1 MiB boundaries, which parallel file systems stripe on.
  ok = ok && H5Pset_alignment(fapl.get(), hsize_t{1} << 20, hsize_t{1} << 20) >= 0;
#ifdef FASTLLM_PARALLEL_HDF5
  ok = ok && H5Pset_fapl_mpio(fapl.get(), comm, MPI_INFO_NULL) >= 0;
  if (writing) ok = ok && H5Pset_coll_metadata_write(fapl.get(), 1) >= 0;
#else
  static_cast<void>(comm);
  static_cast<void>(writing);
#if H5_VERSION_GE(1, 12, 1) || (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7)
  // Cluster file systems without flock() must not make every open fail.
  ok = ok && H5Pset_file_locking(fapl.get(), 1, 1) >= 0;
#endif
#endif
  return ok ? std::move(fapl) : Id();
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0 || ::fsync(fd) != 0) {
    const std::string reason = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("cannot fsync " + in_quotes(path) + ": " + reason);
  }
  ::close(fd);
}

struct DatasetInfo {
  H5DType dtype;
  std::vector<std::int64_t> shape;
  // This rank's part of the chunk checksums and the elements it wrote (io/checksum.h).
  std::vector<std::uint64_t> sums = {};
  std::uint64_t written = 0;
};

std::int64_t volume(const std::vector<std::int64_t>& dims) {
  std::int64_t v = 1;
  for (std::int64_t d : dims)
    v *= d;
  return v;
}

// Calls fn(flat index, length, position in the dense slab) for each run of consecutive elements
// of the slab [offset, offset + count) in a dataset of `shape`, in row-major order.
template <class Fn>
void for_each_run(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& offset,
                  const std::vector<std::int64_t>& count, Fn&& fn) {
  const std::size_t rank = shape.size();
  if (rank == 0 || volume(count) == 0) return;
  // The trailing axes the slab covers whole merge into the run.
  std::size_t outer = rank - 1;
  std::int64_t run = count[outer];
  while (outer > 0 && count[outer] == shape[outer]) {
    --outer;
    run *= count[outer];
  }
  std::vector<std::int64_t> stride(rank, 1);
  for (std::size_t a = rank - 1; a-- > 0;)
    stride[a] = stride[a + 1] * shape[a + 1];
  std::vector<std::int64_t> index(outer, 0);
  for (std::int64_t done = 0, total = volume(count); done < total; done += run) {
    std::int64_t flat = offset[outer] * stride[outer];
    for (std::size_t a = 0; a < outer; ++a)
      flat += (offset[a] + index[a]) * stride[a];
    fn(flat, run, done);
    for (std::size_t a = outer; a-- > 0;) {
      if (++index[a] < count[a]) break;
      index[a] = 0;
    }
  }
}

// Adds the elements [begin, end) of the flat index space of `shape` to the selection of `space`,
// as at most 2 x rank boxes.
bool select_flat_range(hid_t space, const std::vector<std::int64_t>& shape, std::size_t axis,
                       std::vector<hsize_t>& start, std::int64_t begin, std::int64_t end) {
  if (begin >= end) return true;
  std::int64_t stride = 1;
  for (std::size_t a = axis + 1; a < shape.size(); ++a)
    stride *= shape[a];
  const std::int64_t first = (begin + stride - 1) / stride, last = end / stride;
  if (first >= last) {  // inside one index of this axis
    start[axis] = static_cast<hsize_t>(begin / stride);
    return select_flat_range(space, shape, axis + 1, start, begin % stride,
                             begin % stride + end - begin);
  }
  std::vector<hsize_t> box(shape.begin(), shape.end());
  for (std::size_t a = 0; a < axis; ++a)
    box[a] = 1;
  box[axis] = static_cast<hsize_t>(last - first);
  std::vector<hsize_t> at = start;
  at[axis] = static_cast<hsize_t>(first);
  for (std::size_t a = axis + 1; a < shape.size(); ++a)
    at[a] = 0;
  if (H5Sselect_hyperslab(space, H5S_SELECT_OR, at.data(), nullptr, box.data(), nullptr) < 0)
    return false;
  if (begin < first * stride) {
    start[axis] = static_cast<hsize_t>(first - 1);
    if (!select_flat_range(space, shape, axis + 1, start, begin - (first - 1) * stride, stride))
      return false;
  }
  if (end > last * stride) {
    start[axis] = static_cast<hsize_t>(last);
    if (!select_flat_range(space, shape, axis + 1, start, 0, end - last * stride)) return false;
  }
  return true;
}

using Slab = WriteSlab;

}  // namespace

std::size_t h5_dtype_size(H5DType dtype) {
  switch (dtype) {
    case H5DType::F32:
    case H5DType::I32:
      return 4;
    case H5DType::F64:
    case H5DType::I64:
      return 8;
    case H5DType::BF16:
      return 2;
  }
  throw std::runtime_error("unknown H5DType");
}

const char* h5_dtype_name(H5DType dtype) {
  switch (dtype) {
    case H5DType::F32:
      return "float32";
    case H5DType::F64:
      return "float64";
    case H5DType::I64:
      return "int64";
    case H5DType::I32:
      return "int32";
    case H5DType::BF16:
      return kBf16Name;
  }
  throw std::runtime_error("unknown H5DType");
}

struct H5File::Impl {
  std::string path;
  std::string tmp_path;
  bool writing = false;
  bool created = false;
  bool committed = false;
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  // Open on every rank, except in a funnelled write where only rank 0 holds it between rounds.
  Id file;
  std::map<std::string, DatasetInfo> defined;
  std::unique_ptr<WriteFunnel> funnel;  // writing with serial HDF5
  std::uint64_t bytes_read = 0;
  std::map<std::string, std::int64_t> chunk_of;  // reading: checksum_chunk's answers
  bool storing_checksums = false;                // commit() is writing the reserved group
  bool reserved = false;                         // reserve() allocated the file's blocks (rank 0)

  Impl(const std::string& file_path, MPI_Comm parent, bool write)
      : path(file_path), writing(write) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized)
      throw std::runtime_error("H5File of " + in_quotes(path) + " needs MPI_Init first");
    MPI_Comm_dup(parent, &comm);
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    tmp_path = path + ".tmp";
    quiet_hdf5();
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  ~Impl() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // Parallel HDF5 shuts itself down in MPI_Finalize, and the identifiers go with it.
    if (finalized && parallel()) file.release();
    // An abandoned write (a full disk, another rank's failure) gives its space back first, so
    // that the metadata HDF5 writes while closing finds room and every rank's close completes.
    if (writing && created && !committed && rank == 0)
      static_cast<void>(::truncate(tmp_path.c_str(), 0));
    file.reset();
    if (writing && created && !committed && rank == 0) {
      std::error_code ignored;
      std::filesystem::remove(tmp_path, ignored);
    }
    if (!finalized) MPI_Comm_free(&comm);
  }

  // Adds the terms of a slab this rank writes to its part of the dataset's chunk checksums.
  void add_checksums(const std::string& full, const Slab& slab) {
    DatasetInfo& info = defined.at(full);
    const std::int64_t chunk = checksum_chunk_elements(info.shape);
    if (info.sums.empty())
      info.sums.assign(static_cast<std::size_t>((volume(info.shape) + chunk - 1) / chunk), 0);
    const std::size_t size = h5_dtype_size(slab.dtype);
    const auto* bytes = static_cast<const std::byte*>(slab.data);
    for_each_run(info.shape, slab.offset, slab.count,
                 [&](std::int64_t flat, std::int64_t n, std::int64_t done) {
                   add_checksum_terms(info.sums.data(), 0, chunk, flat, n,
                                      bytes + done * static_cast<std::int64_t>(size), size);
                 });
    info.written += static_cast<std::uint64_t>(slab.elements);
  }

  static Impl& live(const std::unique_ptr<Impl>& impl, const char* call) {
    if (!impl) throw std::runtime_error(std::string("H5File::") + call + " on a moved-from H5File");
    if (impl->committed) {
      throw std::runtime_error(std::string("H5File::") + call + " on " + in_quotes(impl->path) +
                               " after commit()");
    }
    return *impl;
  }

  static Impl& writer(const std::unique_ptr<Impl>& impl, const char* call) {
    Impl& file = live(impl, call);
    if (!file.writing) {
      throw std::runtime_error(std::string("H5File::") + call + " on " + in_quotes(file.path) +
                               ", which was opened for reading");
    }
    return file;
  }

  static Impl& reader(const std::unique_ptr<Impl>& impl, const char* call) {
    Impl& file = live(impl, call);
    if (file.writing) {
      throw std::runtime_error(std::string("H5File::") + call + " on " + in_quotes(file.path) +
                               ", which is being written");
    }
    file.require_file();
    return file;
  }

  bool parallel() const {
#ifdef FASTLLM_PARALLEL_HDF5
    return true;
#else
    return false;
#endif
  }
  // Whether this rank has the file open while writing (always, when reading).
  bool holds_file() const {
    return !writing || parallel() || rank == 0;
  }

  const std::string& disk_path() const {
    return writing ? tmp_path : path;
  }
  std::string in_file() const {
    return " in " + in_quotes(disk_path());
  }

  // Reads one hyperslab with the given transfer properties; with a collective transfer an empty
  // slab still takes part (selecting nothing).
  void read_hyperslab(const std::string& name, H5DType dtype,
                      const std::vector<std::int64_t>& offset,
                      const std::vector<std::int64_t>& count, void* out, hid_t transfer) {
    const std::string full = normalize(name);
    Id dataset = open_dataset(full);
    const H5DType stored = stored_dtype(dataset.get(), full);
    if (stored != dtype) {
      throw UserError("dataset " + in_quotes(full) + in_file() + " holds " + h5_dtype_name(stored) +
                      ", expected " + h5_dtype_name(dtype));
    }
    const std::vector<std::int64_t> shape = stored_shape(dataset.get(), full);
    const std::int64_t elements =
        check_slab<UserError>("dataset " + in_quotes(full) + in_file(), shape, offset, count);
    if (elements == 0 && transfer == H5P_DEFAULT) return;
    const std::int64_t chunk = elements > 0 ? checksum_chunk(full) : 0;
    // The chunks the slab touches, as merged ranges [first, last), and whether it covers them all.
    std::vector<std::pair<std::int64_t, std::int64_t>> chunks;
    bool whole_chunks = true;
    if (chunk > 0) {
      const std::int64_t total = volume(shape);
      for_each_run(shape, offset, count, [&](std::int64_t flat, std::int64_t n, std::int64_t) {
        whole_chunks =
            whole_chunks && flat % chunk == 0 && ((flat + n) % chunk == 0 || flat + n == total);
        const std::int64_t first = flat / chunk, last = (flat + n - 1) / chunk + 1;
        if (!chunks.empty() && first <= chunks.back().second) {
          chunks.back().second = std::max(chunks.back().second, last);
        } else {
          chunks.emplace_back(first, last);
        }
      });
    }
    std::byte placeholder{};  // HDF5 wants a buffer even when nothing is selected
    const std::size_t element_size = h5_dtype_size(dtype);
    std::vector<std::byte> covering;  // whole chunks, when the slab cuts some
    Id file_space, memory_space;
    if (whole_chunks) {
      std::tie(file_space, memory_space) = slab_spaces(dataset.get(), offset, count, elements);
    } else {
      file_space = Id(H5Dget_space(dataset.get()), H5Sclose);
      std::vector<hsize_t> start(shape.size(), 0);
      std::int64_t held = 0;
      bool ok = file_space.valid() && H5Sselect_none(file_space.get()) >= 0;
      for (const auto& [first, last] : chunks) {
        const std::int64_t end = std::min(last * chunk, volume(shape));
        ok = ok && select_flat_range(file_space.get(), shape, 0, start, first * chunk, end);
        held += end - first * chunk;
      }
      const hsize_t size = static_cast<hsize_t>(held);
      memory_space = Id(H5Screate_simple(1, &size, nullptr), H5Sclose);
      if (!ok || !memory_space.valid()) file_space = Id();
      covering.resize(static_cast<std::size_t>(held) * element_size);
    }
    void* target = !covering.empty() ? covering.data() : out != nullptr ? out : &placeholder;
    if (!file_space.valid() || H5Dread(dataset.get(), memory_type(dtype), memory_space.get(),
                                       file_space.get(), transfer, target) < 0) {
      throw UserError("cannot read the slab at " + format_dims(offset) + " of dataset " +
                      in_quotes(full) + in_file() + ": " + h5_detail());
    }
    bytes_read += static_cast<std::uint64_t>(elements) * element_size;
    if (chunk == 0) return;
    verify(full, shape, chunk, chunks, offset, count, covering.empty() ? out : covering.data(),
           !covering.empty(), element_size);
    if (covering.empty()) return;
    // Each run of the slab lies inside one merged range of chunks.
    std::vector<std::int64_t> range_at;  // the position of each range in `covering`
    std::int64_t at = 0;
    for (const auto& [first, last] : chunks) {
      range_at.push_back(at);
      at += std::min(last * chunk, volume(shape)) - first * chunk;
    }
    for_each_run(shape, offset, count, [&](std::int64_t flat, std::int64_t n, std::int64_t done) {
      const auto range =
          std::upper_bound(chunks.begin(), chunks.end(), flat / chunk,
                           [](std::int64_t c, const auto& r) { return c < r.first; }) -
          1;
      const std::int64_t from =
          range_at[static_cast<std::size_t>(range - chunks.begin())] + flat - range->first * chunk;
      std::memcpy(static_cast<std::byte*>(out) + done * static_cast<std::int64_t>(element_size),
                  covering.data() + from * static_cast<std::int64_t>(element_size),
                  static_cast<std::size_t>(n) * element_size);
    });
  }

  // Elements per checksum chunk of a dataset of a file being read; 0 when it has no checksums
  // (a file written by another program or an older fastllm).
  std::int64_t checksum_chunk(const std::string& full) {
    const auto known = chunk_of.find(full);
    if (known != chunk_of.end()) return known->second;
    std::int64_t chunk = 0;
    const std::string sums = kChecksumGroup + full;
    if (object_is(file.get(), sums, H5I_DATASET)) {
      Id dataset(H5Dopen2(file.get(), sums.c_str(), H5P_DEFAULT), H5Dclose);
      Id attribute;
      if (dataset.valid() && H5Aexists(dataset.get(), kChunkAttr) > 0)
        attribute = Id(H5Aopen(dataset.get(), kChunkAttr, H5P_DEFAULT), H5Aclose);
      if (!attribute.valid() || H5Aread(attribute.get(), H5T_NATIVE_INT64, &chunk) < 0 ||
          chunk < 1) {
        throw UserError("the checksums of dataset " + in_quotes(full) + in_file() +
                        " are unreadable: " + h5_detail());
      }
    }
    H5Eclear2(H5E_DEFAULT);
    chunk_of[full] = chunk;
    return chunk;
  }

  // Compares the checksums of the chunks a read touched with the stored ones. `data` holds the
  // slab, or (`covering`) the whole chunks in order.
  void verify(const std::string& full, const std::vector<std::int64_t>& shape, std::int64_t chunk,
              const std::vector<std::pair<std::int64_t, std::int64_t>>& chunks,
              const std::vector<std::int64_t>& offset, const std::vector<std::int64_t>& count,
              const void* data, bool covering, std::size_t element_size) {
    const std::int64_t first = chunks.front().first, last = chunks.back().second;
    std::vector<std::uint64_t> computed(static_cast<std::size_t>(last - first), 0);
    const auto* bytes = static_cast<const std::byte*>(data);
    if (covering) {
      std::int64_t at = 0;
      for (const auto& [a, b] : chunks) {
        const std::int64_t n = std::min(b * chunk, volume(shape)) - a * chunk;
        add_checksum_terms(computed.data(), first, chunk, a * chunk, n,
                           bytes + at * static_cast<std::int64_t>(element_size), element_size);
        at += n;
      }
    } else {
      for_each_run(shape, offset, count, [&](std::int64_t flat, std::int64_t n, std::int64_t done) {
        add_checksum_terms(computed.data(), first, chunk, flat, n,
                           bytes + done * static_cast<std::int64_t>(element_size), element_size);
      });
    }
    std::vector<std::uint64_t> stored(computed.size());
    const std::string sums = kChecksumGroup + full;
    const std::vector<std::int64_t> at{first}, n{last - first};
    Id dataset(H5Dopen2(file.get(), sums.c_str(), H5P_DEFAULT), H5Dclose);
    Id file_space, memory_space;
    if (dataset.valid())
      std::tie(file_space, memory_space) = slab_spaces(dataset.get(), at, n, last - first);
    if (!file_space.valid() ||
        stored_shape(dataset.get(), sums) !=
            std::vector<std::int64_t>{(volume(shape) + chunk - 1) / chunk} ||
        H5Dread(dataset.get(), H5T_NATIVE_INT64, memory_space.get(), file_space.get(), H5P_DEFAULT,
                stored.data()) < 0) {
      throw UserError("cannot read the checksums of dataset " + in_quotes(full) + in_file() + ": " +
                      h5_detail());
    }
    for (const auto& [a, b] : chunks) {
      for (std::int64_t c = a; c < b; ++c) {
        const std::size_t i = static_cast<std::size_t>(c - first);
        if (computed[i] == stored[i]) continue;
        char sums_text[64];
        std::snprintf(sums_text, sizeof sums_text, "%016llx, recorded %016llx",
                      static_cast<unsigned long long>(computed[i]),
                      static_cast<unsigned long long>(stored[i]));
        throw UserError("checksum mismatch in dataset " + in_quotes(full) + in_file() +
                        ": reading the slab at " + format_dims(offset) + " of count " +
                        format_dims(count) + ", elements [" + std::to_string(c * chunk) + ", " +
                        std::to_string(std::min((c + 1) * chunk, volume(shape))) + ") hash to " +
                        sums_text + "; the file is corrupt");
      }
    }
  }

  // Runs fn on every rank; when it throws on any, every rank throws the exception of the lowest
  // failing rank, so all leave the collective call together.
  template <class Fn>
  void agree(Fn&& fn) {
    int kind = 0;
    std::string message;
    try {
      fn();
    } catch (const UserError& error) {
      kind = 1;
      message = error.what();
    } catch (const std::exception& error) {
      kind = 2;
      message = error.what();
    }
    int first = kind != 0 ? rank : size;
    MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == size) return;
    int header[2] = {kind, static_cast<int>(message.size())};
    MPI_Bcast(header, 2, MPI_INT, first, comm);
    message.resize(static_cast<std::size_t>(header[1]));
    MPI_Bcast(message.data(), header[1], MPI_CHAR, first, comm);
    if (first != 0) message = "rank " + std::to_string(first) + ": " + message;
    if (header[0] == 1) throw UserError(message);
    throw std::runtime_error(message);
  }

  // Throws on every rank when the ranks passed different arguments to a collective call.
  void check_same(const std::string& call, const std::string& arguments) {
    const std::uint64_t hash = std::hash<std::string>{}(arguments);
    std::uint64_t bounds[2] = {hash, ~hash};
    MPI_Allreduce(MPI_IN_PLACE, bounds, 2, MPI_UINT64_T, MPI_MIN, comm);
    if (bounds[0] != ~bounds[1]) {
      throw std::runtime_error(call + " on " + in_quotes(path) +
                               " was called with different arguments on different ranks");
    }
  }

  std::uint64_t sum_over_ranks(std::uint64_t value) {
    MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_UINT64_T, MPI_SUM, comm);
    return value;
  }

  void require_file() const {
    if (!file.valid()) {
      throw std::runtime_error(in_quotes(disk_path()) + " is not open after an earlier failure");
    }
  }

  void open_existing(unsigned flags, bool user_error) {
    Id fapl = file_access(comm, writing);
    if (!fapl.valid()) throw std::runtime_error("cannot set up HDF5 file access: " + h5_detail());
    file = Id(H5Fopen(disk_path().c_str(), flags, fapl.get()), H5Fclose);
    if (!file.valid()) {
      const std::string message =
          "cannot open " + in_quotes(disk_path()) + " as an HDF5 file: " + h5_detail();
      if (user_error) throw UserError(message + " (expected a complete HDF5 checkpoint)");
      throw std::runtime_error(message);
    }
  }

  void close_file() {
    if (file.valid() && !file.close())
      throw_write_failure("cannot close " + in_quotes(disk_path()) + ": " + h5_detail());
  }

  // The folder of the file being written.
  std::string folder() const {
    const std::filesystem::path parent = std::filesystem::path(path).parent_path();
    return parent.empty() ? std::string(".") : parent.string();
  }

  // The exception for a failed write: a UserError naming the folder and the bytes the file needs
  // when its file system is (nearly) full, since that is what makes writes fail in practice.
  [[noreturn]] void throw_write_failure(const std::string& message) const {
    std::uint64_t needed = 0;
    for (const auto& [name, info] : defined)
      needed += static_cast<std::uint64_t>(volume(info.shape)) * h5_dtype_size(info.dtype);
    struct statvfs stats {};
    if (::statvfs(folder().c_str(), &stats) == 0) {
      const std::uint64_t available =
          static_cast<std::uint64_t>(stats.f_bavail) * static_cast<std::uint64_t>(stats.f_frsize);
      if (available < (std::uint64_t{16} << 20) || available < needed / 16)
        throw UserError("not enough space in the folder " + in_quotes(folder()) + " for " +
                        in_quotes(path) + ": it needs about " + std::to_string(needed) +
                        " bytes of data, " + std::to_string(available) + " are available (" +
                        message + ")");
    }
    throw std::runtime_error(message);
  }

  void write_hyperslab(hid_t target, const Slab& slab, hid_t transfer) {
    Id dataset(H5Dopen2(target, slab.name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!dataset.valid()) {
      throw std::runtime_error("cannot open dataset " + in_quotes(slab.name) + in_file() + ": " +
                               h5_detail());
    }
    auto [file_space, memory_space] =
        slab_spaces(dataset.get(), slab.offset, slab.count, slab.elements);
    // HDF5 wants a buffer even when nothing is selected.
    const std::byte placeholder{};
    const void* data = slab.data != nullptr ? slab.data : &placeholder;
    if (!file_space.valid() ||
        H5Dwrite(dataset.get(), memory_type(slab.dtype), memory_space.get(), file_space.get(),
                 transfer, data) < 0 ||
        !dataset.close()) {
      throw_write_failure("cannot write the slab at " + format_dims(slab.offset) + " of dataset " +
                          in_quotes(slab.name) + in_file() + ": " + h5_detail());
    }
  }

  // A funnel round's turns, once rank 0 has closed the file (io/hdf5_funnel.h).
  void take_turns(const Slab* extra) {
    const WriteFunnel::Turn turn{
        [&] { open_existing(H5F_ACC_RDWR, false); },
        [&](const Slab& slab) { write_hyperslab(file.get(), slab, H5P_DEFAULT); },
        [&] { close_file(); }, [&] { file.reset(); }};
    const std::exception_ptr failure = funnel->take_turns(extra, turn);
    agree([&] {
      if (failure) std::rethrow_exception(failure);
    });
  }

  void reopen_on_rank0() {
    agree([&] {
      if (rank == 0) open_existing(H5F_ACC_RDWR, false);
    });
  }

  // Opens the object an attribute goes on; "/" is the root group.
  Id open_object(const std::string& object) const {
    Id handle(H5Oopen(file.get(), object.c_str(), H5P_DEFAULT), H5Oclose);
    if (!handle.valid()) {
      const std::string message = in_quotes(disk_path()) + " has no object " + in_quotes(object);
      H5Eclear2(H5E_DEFAULT);
      if (writing) throw std::runtime_error(message);
      throw UserError(message);
    }
    return handle;
  }

  // Opens an attribute of a file being read; UserError when it or its object is missing.
  Id open_attribute(const std::string& object, const std::string& key) const {
    Id handle = open_object(object);
    if (H5Aexists(handle.get(), key.c_str()) <= 0) {
      H5Eclear2(H5E_DEFAULT);
      throw UserError("attribute " + in_quotes(key) + " is missing on " + in_quotes(object) +
                      in_file());
    }
    Id attribute(H5Aopen(handle.get(), key.c_str(), H5P_DEFAULT), H5Aclose);
    if (!attribute.valid()) {
      throw UserError("cannot open attribute " + in_quotes(key) + " of " + in_quotes(object) +
                      in_file() + ": " + h5_detail());
    }
    return attribute;
  }

  void set_attribute(const std::string& object_name, const std::string& key,
                     const std::string& signature, const std::function<bool(hid_t object)>& write) {
    const std::string object = normalize(object_name);
    check_same("set_attr", object + '\n' + key + '\n' + signature);
    agree([&] {
      if (key.empty()) throw std::runtime_error("empty attribute name on " + in_quotes(object));
      if (key == kBf16Attr && defined.count(object) != 0) {
        throw std::runtime_error("attribute " + in_quotes(key) + " of dataset " +
                                 in_quotes(object) + " is reserved for the bfloat16 marker");
      }
      if (object == "/" || defined.count(object) != 0) return;
      for (const auto& entry : defined) {
        if (entry.first.starts_with(object + "/")) return;
      }
      throw std::runtime_error("attribute " + in_quotes(key) + " on " + in_quotes(object) +
                               in_file() + ": no such dataset or group has been defined");
    });
    agree([&] {
      if (!holds_file()) return;
      require_file();
      Id handle = open_object(object);
      if (!write(handle.get())) {
        throw std::runtime_error("cannot write attribute " + in_quotes(key) + " of " +
                                 in_quotes(object) + in_file() + ": " + h5_detail());
      }
    });
  }

  Id open_dataset(const std::string& name) const {
    if (!object_is(file.get(), name, H5I_DATASET)) {
      throw UserError(in_quotes(path) + " has no dataset " + in_quotes(name));
    }
    Id dataset(H5Dopen2(file.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!dataset.valid()) {
      throw UserError("cannot open dataset " + in_quotes(name) + in_file() + ": " + h5_detail());
    }
    return dataset;
  }

  std::vector<std::int64_t> stored_shape(hid_t dataset, const std::string& name) const {
    Id space(H5Dget_space(dataset), H5Sclose);
    const int rank_count = space.valid() ? H5Sget_simple_extent_ndims(space.get()) : -1;
    if (rank_count < 0) {
      throw UserError("cannot read the shape of dataset " + in_quotes(name) + in_file() + ": " +
                      h5_detail());
    }
    std::vector<hsize_t> dims(static_cast<std::size_t>(rank_count));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    return std::vector<std::int64_t>(dims.begin(), dims.end());
  }

  H5DType stored_dtype(hid_t dataset, const std::string& name) const {
    Id type(H5Dget_type(dataset), H5Tclose);
    if (!type.valid()) {
      throw UserError("cannot read the type of dataset " + in_quotes(name) + in_file() + ": " +
                      h5_detail());
    }
    const H5T_class_t type_class = H5Tget_class(type.get());
    const std::size_t bytes = H5Tget_size(type.get());
    std::string found = std::to_string(bytes) + "-byte ";
    if (type_class == H5T_FLOAT) {
      if (bytes == 4) return H5DType::F32;
      if (bytes == 8) return H5DType::F64;
      found += "float";
    } else if (type_class == H5T_INTEGER) {
      const bool is_signed = H5Tget_sign(type.get()) == H5T_SGN_2;
      if (is_signed && bytes == 8) return H5DType::I64;
      if (is_signed && bytes == 4) return H5DType::I32;
      if (!is_signed && bytes == 2) {
        std::string marker;
        if (H5Aexists(dataset, kBf16Attr) > 0) {
          Id attribute(H5Aopen(dataset, kBf16Attr, H5P_DEFAULT), H5Aclose);
          if (attribute.valid() && get_string_attribute(attribute.get(), marker) &&
              marker == kBf16Name) {
            return H5DType::BF16;
          }
        }
        H5Eclear2(H5E_DEFAULT);
        found += "unsigned integer without dtype = \"bfloat16\"";
      } else {
        found += is_signed ? "signed integer" : "unsigned integer";
      }
    } else {
      found += "value of HDF5 type class " + std::to_string(static_cast<int>(type_class));
    }
    throw UserError("dataset " + in_quotes(name) + in_file() + " holds " + found +
                    " elements, expected float32, float64, int64, int32 or bfloat16");
  }
};

H5File::H5File(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
H5File::H5File(H5File&&) noexcept = default;
H5File& H5File::operator=(H5File&&) noexcept = default;
H5File::~H5File() = default;

H5File H5File::create(const std::string& path, MPI_Comm comm, std::size_t funnel_buffer_bytes) {
  auto impl = std::make_unique<Impl>(path, comm, true);
  if (!impl->parallel())
    impl->funnel = std::make_unique<WriteFunnel>(impl->comm, funnel_buffer_bytes);
  impl->check_same("H5File::create", path);
  impl->agree([&] {
    if (!impl->holds_file()) return;
    Id fapl = file_access(impl->comm, true);
    if (!fapl.valid()) throw std::runtime_error("cannot set up HDF5 file access: " + h5_detail());
    impl->file =
        Id(H5Fcreate(impl->tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    if (!impl->file.valid()) {
      throw UserError("cannot create the HDF5 file " + in_quotes(impl->tmp_path) + ": " +
                      h5_detail());
    }
    impl->created = true;
  });
  return H5File(std::move(impl));
}

H5File H5File::open_read(const std::string& path, MPI_Comm comm) {
  auto impl = std::make_unique<Impl>(path, comm, false);
  impl->check_same("H5File::open_read", path);
  impl->agree([&] {
    std::error_code error;
    if (!std::filesystem::is_regular_file(path, error)) {
      throw UserError("HDF5 file " + in_quotes(path) + " does not exist or is not a regular file");
    }
  });
  impl->agree([&] { impl->open_existing(H5F_ACC_RDONLY, true); });
  return H5File(std::move(impl));
}

const std::string& H5File::path() const {
  if (!impl_) throw std::runtime_error("H5File::path on a moved-from H5File");
  return impl_->path;
}

bool H5File::writable() const {
  return Impl::live(impl_, "writable").writing;
}

void H5File::define_dataset(const std::string& name, H5DType dtype,
                            const std::vector<std::int64_t>& shape) {
  Impl& im = Impl::writer(impl_, "define_dataset");
  const std::string full = normalize(name);
  im.check_same("define_dataset", full + '\n' + h5_dtype_name(dtype) + format_dims(shape));
  im.agree([&] {
    const std::string what = "dataset " + in_quotes(full) + im.in_file();
    if (full == "/") throw std::runtime_error("define_dataset needs a name" + im.in_file());
    if (reserved_name(full) && !im.storing_checksums)
      throw std::runtime_error(what + ": the group " + kChecksumGroup + " is reserved");
    if (shape.empty()) throw std::runtime_error(what + " needs a shape of rank 1 or more");
    for (std::int64_t dim : shape) {
      if (dim < 1) throw std::runtime_error(what + " has shape " + format_dims(shape));
    }
    for (const auto& entry : im.defined) {
      if (entry.first == full || entry.first.starts_with(full + "/") ||
          full.starts_with(entry.first + "/")) {
        throw std::runtime_error(what + " clashes with the dataset " + in_quotes(entry.first));
      }
    }
  });
  im.agree([&] {
    if (!im.holds_file()) return;
    im.require_file();
    const std::vector<hsize_t> dims = to_hsize(shape);
    Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
    Id links(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
    Id layout(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    // Space allocated up front and never filled: every element is written by some rank, and a
    // fill pass would write the whole dataset twice.
    bool ok = space.valid() && links.valid() && layout.valid() &&
              H5Pset_create_intermediate_group(links.get(), 1) >= 0 &&
              H5Pset_layout(layout.get(), H5D_CONTIGUOUS) >= 0 &&
              H5Pset_alloc_time(layout.get(), H5D_ALLOC_TIME_EARLY) >= 0 &&
              H5Pset_fill_time(layout.get(), H5D_FILL_TIME_NEVER) >= 0;
    Id dataset;
    if (ok) {
      dataset = Id(H5Dcreate2(im.file.get(), full.c_str(), file_type(dtype), space.get(),
                              links.get(), layout.get(), H5P_DEFAULT),
                   H5Dclose);
      ok = dataset.valid();
    }
    if (ok && dtype == H5DType::BF16)
      ok = put_string_attribute(dataset.get(), kBf16Attr, kBf16Name);
    if (!ok || !dataset.close()) {
      throw std::runtime_error("cannot create dataset " + in_quotes(full) + im.in_file() + ": " +
                               h5_detail());
    }
  });
  im.defined[full] = DatasetInfo{dtype, shape};
}

void H5File::write_slab(const std::string& name, H5DType dtype,
                        const std::vector<std::int64_t>& offset,
                        const std::vector<std::int64_t>& count, const void* data) {
  Impl& im = Impl::writer(impl_, "write_slab");
  const std::string full = normalize(name);
  im.check_same("write_slab", full + '\n' + h5_dtype_name(dtype));
  Slab slab{full, dtype, offset, count, 0, {}, data};
  im.agree([&] {
    const auto found = im.defined.find(full);
    if (found == im.defined.end()) {
      throw std::runtime_error("write_slab to " + in_quotes(full) + im.in_file() +
                               ", which define_dataset has not made");
    }
    if (found->second.dtype != dtype) {
      throw std::runtime_error(std::string("write_slab of ") + h5_dtype_name(dtype) + " data to " +
                               in_quotes(full) + im.in_file() + ", which holds " +
                               h5_dtype_name(found->second.dtype));
    }
    slab.elements = check_slab<std::runtime_error>("dataset " + in_quotes(full) + im.in_file(),
                                                   found->second.shape, offset, count);
    if (slab.elements > 0 && data == nullptr) {
      throw std::runtime_error("write_slab to " + in_quotes(full) + " without data");
    }
  });
  if (!reserved_name(full)) im.add_checksums(full, slab);
  if (im.parallel()) {
#ifdef FASTLLM_PARALLEL_HDF5
    im.agree([&] {
      im.require_file();
      Id transfer(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
      if (!transfer.valid() || H5Pset_dxpl_mpio(transfer.get(), H5FD_MPIO_COLLECTIVE) < 0) {
        throw std::runtime_error("cannot set up a collective transfer: " + h5_detail());
      }
      im.write_hyperslab(im.file.get(), slab, transfer.get());
    });
#endif
    return;
  }
  const std::size_t bytes = static_cast<std::size_t>(slab.elements) * h5_dtype_size(dtype);
  const bool round = im.funnel->round_needed(bytes);
  im.agree([&] {
    if (im.rank == 0) {
      im.require_file();
      im.write_hyperslab(im.file.get(), slab, H5P_DEFAULT);
      if (round) im.close_file();
    } else if (!round && slab.elements > 0) {
      im.funnel->keep(std::move(slab), bytes);
    }
  });
  if (round) {
    im.take_turns(im.rank > 0 && slab.elements > 0 ? &slab : nullptr);
    im.reopen_on_rank0();
  }
}

void H5File::set_attr_string(const std::string& object, const std::string& key,
                             std::string_view value) {
  Impl::writer(impl_, "set_attr_string")
      .set_attribute(object, key, "string\n" + std::string(value),
                     [&](hid_t handle) { return put_string_attribute(handle, key, value); });
}

void H5File::set_attr_int(const std::string& object, const std::string& key, std::int64_t value) {
  Impl::writer(impl_, "set_attr_int")
      .set_attribute(object, key, "int\n" + std::to_string(value), [&](hid_t handle) {
        return put_attribute(handle, key, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
      });
}

void H5File::set_attr_double(const std::string& object, const std::string& key, double value) {
  std::string bits(sizeof(value), '\0');
  std::memcpy(bits.data(), &value, sizeof(value));
  Impl::writer(impl_, "set_attr_double")
      .set_attribute(object, key, "double\n" + bits, [&](hid_t handle) {
        return put_attribute(handle, key, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
      });
}

void H5File::flush() {
  Impl& im = Impl::writer(impl_, "flush");
  im.check_same("flush", im.path);
  if (!im.parallel() && im.funnel->holds_slabs()) {
    im.agree([&] {
      if (im.rank == 0) im.close_file();
    });
    im.take_turns(nullptr);
    im.reopen_on_rank0();
    return;
  }
  im.agree([&] {
    if (!im.holds_file()) return;
    im.require_file();
    if (H5Fflush(im.file.get(), H5F_SCOPE_GLOBAL) < 0) {
      throw std::runtime_error("cannot flush " + in_quotes(im.tmp_path) + ": " + h5_detail());
    }
  });
}

void H5File::store_checksums() {
  Impl& im = *impl_;
  std::vector<std::string> names;
  for (const auto& entry : im.defined) {
    if (!reserved_name(entry.first)) names.push_back(entry.first);
  }
  im.storing_checksums = true;
  for (const std::string& name : names) {
    DatasetInfo& info = im.defined.at(name);
    const std::int64_t elements = volume(info.shape);
    // Datasets some element of which no rank wrote (or two did) get no checksums.
    if (im.sum_over_ranks(info.written) != static_cast<std::uint64_t>(elements)) continue;
    const std::int64_t chunk = checksum_chunk_elements(info.shape);
    const std::int64_t chunks = (elements + chunk - 1) / chunk;
    info.sums.resize(static_cast<std::size_t>(chunks), 0);
    for (std::int64_t at = 0; at < chunks; at += std::int64_t{1} << 24) {
      const int n = static_cast<int>(std::min<std::int64_t>(chunks - at, std::int64_t{1} << 24));
      MPI_Allreduce(MPI_IN_PLACE, info.sums.data() + at, n, MPI_UINT64_T, MPI_SUM, im.comm);
    }
    const std::string sums = kChecksumGroup + name;
    define_dataset(sums, H5DType::I64, {chunks});
    write_slab(sums, H5DType::I64, {0}, {im.rank == 0 ? chunks : 0}, info.sums.data());
    set_attr_int(sums, kChunkAttr, chunk);
    info.sums = {};
  }
  im.storing_checksums = false;
}

void H5File::reserve(std::uint64_t bytes) {
  Impl& im = Impl::writer(impl_, "reserve");
  im.check_same("reserve", std::to_string(bytes));
  im.agree([&] {
    if (im.rank != 0) return;
    const std::filesystem::path parent = std::filesystem::path(im.path).parent_path();
    const std::string folder = parent.empty() ? std::string(".") : parent.string();
    const auto no_space = [&](std::uint64_t available) {
      return UserError("not enough space in the folder " + in_quotes(folder) + " for " +
                       in_quotes(im.path) + ": it needs " + std::to_string(bytes) + " bytes, " +
                       std::to_string(available) + " are available");
    };
    struct statvfs stats {};
    if (::statvfs(folder.c_str(), &stats) == 0) {
      const std::uint64_t available =
          static_cast<std::uint64_t>(stats.f_bavail) * static_cast<std::uint64_t>(stats.f_frsize);
      if (available < bytes) throw no_space(available);
    }
    struct rlimit limit {};
    if (::getrlimit(RLIMIT_FSIZE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
        limit.rlim_cur < bytes)
      throw UserError("cannot write " + in_quotes(im.path) + " in the folder " + in_quotes(folder) +
                      ": it needs " + std::to_string(bytes) +
                      " bytes, more than this process may write to a file (ulimit -f: " +
                      std::to_string(limit.rlim_cur) + " bytes)");
    // Taking the blocks now means no write below can meet a full disk (or quota) half-way.
    const int fd = ::open(im.tmp_path.c_str(), O_WRONLY);
    if (fd < 0) {
      throw std::runtime_error("cannot open " + in_quotes(im.tmp_path) + ": " +
                               std::strerror(errno));
    }
    struct stat before {};
    const bool sized = ::fstat(fd, &before) == 0;
    const int failed = ::fallocate(fd, 0, 0, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
    if (failed == ENOSPC || failed == EDQUOT || failed == EFBIG) {
      if (sized) static_cast<void>(::ftruncate(fd, before.st_size));
      ::close(fd);
      if (failed == EFBIG)
        throw UserError("cannot write " + in_quotes(im.path) + " in the folder " +
                        in_quotes(folder) + ": it needs " + std::to_string(bytes) +
                        " bytes, more than this process may write to a file (ulimit -f)");
      std::uint64_t available = 0;
      if (::statvfs(folder.c_str(), &stats) == 0)
        available = static_cast<std::uint64_t>(stats.f_bavail) * stats.f_frsize;
      throw no_space(available);
    }
    im.reserved = failed == 0;
    ::close(fd);
  });
}

void H5File::commit() {
  Impl& im = Impl::writer(impl_, "commit");
  im.check_same("commit", im.path);
  store_checksums();
  const bool round = !im.parallel() && im.funnel->holds_slabs();
  im.agree([&] {
    if (!im.holds_file()) return;
    im.require_file();
    im.close_file();
  });
  if (round) im.take_turns(nullptr);
  // Each rank syncs, since on a cluster file system a node's cache holds that node's writes.
  im.agree([&] { fsync_path(im.tmp_path, false); });
  // Some MPI-IO layers report a full disk only on their console and return success, leaving
  // holes: without blocks reserved up front, a file holding fewer blocks than its data is one
  // whose writes were lost.
  im.agree([&] {
    if (im.rank != 0 || im.reserved) return;
    std::uint64_t data = 0;
    for (const auto& [name, info] : im.defined)
      data += static_cast<std::uint64_t>(volume(info.shape)) * h5_dtype_size(info.dtype);
    struct stat written {};
    if (::stat(im.tmp_path.c_str(), &written) == 0 &&
        static_cast<std::uint64_t>(written.st_blocks) * 512 < data)
      im.throw_write_failure("the file system kept " +
                             std::to_string(static_cast<std::uint64_t>(written.st_blocks) * 512) +
                             " bytes of " + in_quotes(im.tmp_path) + ", which holds " +
                             std::to_string(data) + " bytes of data: writes were lost");
  });
  im.agree([&] {
    if (im.rank != 0) return;
    if (std::rename(im.tmp_path.c_str(), im.path.c_str()) != 0) {
      throw std::runtime_error("cannot rename " + in_quotes(im.tmp_path) + " to " +
                               in_quotes(im.path) + ": " + std::strerror(errno));
    }
    const std::filesystem::path parent = std::filesystem::path(im.path).parent_path();
    fsync_path(parent.empty() ? std::string(".") : parent.string(), true);
  });
  im.committed = true;
}

void H5File::read_slab(const std::string& name, H5DType dtype,
                       const std::vector<std::int64_t>& offset,
                       const std::vector<std::int64_t>& count, void* out) {
  Impl::reader(impl_, "read_slab").read_hyperslab(name, dtype, offset, count, out, H5P_DEFAULT);
}

void H5File::read_slab_collective(const std::string& name, H5DType dtype,
                                  const std::vector<std::int64_t>& offset,
                                  const std::vector<std::int64_t>& count, void* out) {
  Impl& im = Impl::reader(impl_, "read_slab_collective");
  if (!im.parallel()) {
    im.read_hyperslab(name, dtype, offset, count, out, H5P_DEFAULT);
    return;
  }
#ifdef FASTLLM_PARALLEL_HDF5
  im.agree([&] {
    Id transfer(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
    if (!transfer.valid() || H5Pset_dxpl_mpio(transfer.get(), H5FD_MPIO_COLLECTIVE) < 0) {
      throw std::runtime_error("cannot set up a collective transfer: " + h5_detail());
    }
    im.read_hyperslab(name, dtype, offset, count, out, transfer.get());
  });
#endif
}

std::string H5File::attr_string(const std::string& object, const std::string& key) const {
  Impl& im = Impl::reader(impl_, "attr_string");
  const std::string full = normalize(object);
  Id attribute = im.open_attribute(full, key);
  std::string value;
  if (!get_string_attribute(attribute.get(), value)) {
    H5Eclear2(H5E_DEFAULT);
    throw UserError("attribute " + in_quotes(key) + " of " + in_quotes(full) + im.in_file() +
                    " is not a single string");
  }
  return value;
}

std::int64_t H5File::attr_int(const std::string& object, const std::string& key) const {
  Impl& im = Impl::reader(impl_, "attr_int");
  const std::string full = normalize(object);
  Id attribute = im.open_attribute(full, key);
  Id type(H5Aget_type(attribute.get()), H5Tclose);
  Id space(H5Aget_space(attribute.get()), H5Sclose);
  std::int64_t value = 0;
  if (!type.valid() || !space.valid() || H5Tget_class(type.get()) != H5T_INTEGER ||
      H5Sget_simple_extent_npoints(space.get()) != 1 ||
      H5Aread(attribute.get(), H5T_NATIVE_INT64, &value) < 0) {
    H5Eclear2(H5E_DEFAULT);
    throw UserError("attribute " + in_quotes(key) + " of " + in_quotes(full) + im.in_file() +
                    " is not a single integer");
  }
  return value;
}

double H5File::attr_double(const std::string& object, const std::string& key) const {
  Impl& im = Impl::reader(impl_, "attr_double");
  const std::string full = normalize(object);
  Id attribute = im.open_attribute(full, key);
  Id type(H5Aget_type(attribute.get()), H5Tclose);
  Id space(H5Aget_space(attribute.get()), H5Sclose);
  double value = 0;
  if (!type.valid() || !space.valid() || H5Tget_class(type.get()) != H5T_FLOAT ||
      H5Sget_simple_extent_npoints(space.get()) != 1 ||
      H5Aread(attribute.get(), H5T_NATIVE_DOUBLE, &value) < 0) {
    H5Eclear2(H5E_DEFAULT);
    throw UserError("attribute " + in_quotes(key) + " of " + in_quotes(full) + im.in_file() +
                    " is not a single floating-point number");
  }
  return value;
}

bool H5File::has_attr(const std::string& object, const std::string& key) const {
  Impl& im = Impl::reader(impl_, "has_attr");
  const std::string full = normalize(object);
  if (!object_is(im.file.get(), full, H5I_DATASET) && !object_is(im.file.get(), full, H5I_GROUP)) {
    return false;
  }
  Id handle = im.open_object(full);
  const htri_t exists = H5Aexists(handle.get(), key.c_str());
  H5Eclear2(H5E_DEFAULT);
  return exists > 0;
}

bool H5File::has_checksums(const std::string& name) {
  return Impl::reader(impl_, "has_checksums").checksum_chunk(normalize(name)) > 0;
}

std::uint64_t H5File::bytes_read() const {
  return Impl::live(impl_, "bytes_read").bytes_read;
}

bool H5File::has(const std::string& name) const {
  const Impl& im = Impl::live(impl_, "has");
  const std::string full = normalize(name);
  if (im.writing) return im.defined.count(full) != 0;
  im.require_file();
  return object_is(im.file.get(), full, H5I_DATASET);
}

std::vector<std::int64_t> H5File::dataset_shape(const std::string& name) const {
  const Impl& im = Impl::live(impl_, "dataset_shape");
  const std::string full = normalize(name);
  if (im.writing) {
    const auto found = im.defined.find(full);
    if (found == im.defined.end()) {
      throw std::runtime_error("dataset_shape of " + in_quotes(full) + im.in_file() +
                               ", which define_dataset has not made");
    }
    return found->second.shape;
  }
  im.require_file();
  return im.stored_shape(im.open_dataset(full).get(), full);
}

H5DType H5File::dataset_dtype(const std::string& name) const {
  const Impl& im = Impl::live(impl_, "dataset_dtype");
  const std::string full = normalize(name);
  if (im.writing) {
    const auto found = im.defined.find(full);
    if (found == im.defined.end()) {
      throw std::runtime_error("dataset_dtype of " + in_quotes(full) + im.in_file() +
                               ", which define_dataset has not made");
    }
    return found->second.dtype;
  }
  im.require_file();
  return im.stored_dtype(im.open_dataset(full).get(), full);
}

std::vector<std::string> H5File::list_datasets(const std::string& group) const {
  const Impl& im = Impl::live(impl_, "list_datasets");
  const std::string full = normalize(group);
  const std::string prefix = full == "/" ? full : full + "/";
  std::vector<std::string> names;
  if (im.writing) {
    for (const auto& entry : im.defined) {
      if (entry.first.starts_with(prefix) && !reserved_name(entry.first))
        names.push_back(entry.first);
    }
    return names;
  }
  im.require_file();
  if (!object_is(im.file.get(), full, H5I_GROUP)) {
    throw UserError(in_quotes(im.path) + " has no group " + in_quotes(full));
  }
  Id handle(H5Gopen2(im.file.get(), full.c_str(), H5P_DEFAULT), H5Gclose);
  Listing listing{prefix, &names};
  if (!handle.valid() ||
      H5Literate(handle.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr, &list_link, &listing) < 0) {
    throw UserError("cannot list the group " + in_quotes(full) + im.in_file() + ": " + h5_detail());
  }
  std::erase_if(names, [](const std::string& name) { return reserved_name(name); });
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace fastllm
