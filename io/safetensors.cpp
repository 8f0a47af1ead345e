#include "io/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <utility>

#include "io/error.h"
#include "io/half.h"

namespace fastllm {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; a big-endian host would need byte swaps");

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The reference implementation refuses larger headers, so that a corrupt length cannot make it
// allocate or parse gigabytes.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
// A header or index nests 3 levels; the bound keeps a hostile file from overflowing the stack
// where a value is printed or copied (both recursive in nlohmann::json).
constexpr int kMaxJsonDepth = 64;
// Below this many elements a conversion is faster than starting the OpenMP threads.
constexpr std::size_t kParallelElements = 1 << 16;

struct DtypeEntry {
  SafetensorsDtype dtype;
  const char* name;
  std::size_t size;
};

constexpr std::array<DtypeEntry, 15> kDtypes{{
    {SafetensorsDtype::BOOL, "BOOL", 1},
    {SafetensorsDtype::U8, "U8", 1},
    {SafetensorsDtype::I8, "I8", 1},
    {SafetensorsDtype::F8_E5M2, "F8_E5M2", 1},
    {SafetensorsDtype::F8_E4M3, "F8_E4M3", 1},
    {SafetensorsDtype::I16, "I16", 2},
    {SafetensorsDtype::U16, "U16", 2},
    {SafetensorsDtype::F16, "F16", 2},
    {SafetensorsDtype::BF16, "BF16", 2},
    {SafetensorsDtype::I32, "I32", 4},
    {SafetensorsDtype::U32, "U32", 4},
    {SafetensorsDtype::F32, "F32", 4},
    {SafetensorsDtype::F64, "F64", 8},
    {SafetensorsDtype::I64, "I64", 8},
    {SafetensorsDtype::U64, "U64", 8},
}};

const DtypeEntry& entry(SafetensorsDtype dtype) {
  return kDtypes[static_cast<std::size_t>(dtype)];
}

std::string known_dtypes() {
  std::string out;
  for (const DtypeEntry& e : kDtypes)
    out += std::string(out.empty() ? "" : ", ") + e.name;
  return out;
}

std::string in_quotes(std::string_view s) {
  std::string out(1, '\'');
  out.append(s);
  out.push_back('\'');
  return out;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i)
    out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

std::string offsets_text(const TensorInfo& t) {
  return "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "]";
}

// Messages stay on one short line of ASCII even when they quote bytes from a corrupt file.
std::string one_line(std::string text) {
  if (text.size() > 200) text = text.substr(0, 197) + "...";
  for (char& c : text)
    if (const auto u = static_cast<unsigned char>(c); u < 0x20 || u >= 0x7F) c = '?';
  return text;
}

bool is_file(const fs::path& path) {
  std::error_code ignored;
  return fs::is_regular_file(path, ignored);
}

// A JSON value as it appears in a message, cut short when it is long.
std::string excerpt(const json& value) {
  std::string text = value.dump(-1, ' ', true, json::error_handler_t::replace);
  return one_line(text.size() > 80 ? text.substr(0, 77) + "..." : text);
}

// Parses JSON text, refusing nesting deeper than kMaxJsonDepth with a UserError naming `name`.
template <class Input>
json parse_bounded(Input&& input, const std::string& name, const char* what) {
  try {
    return json::parse(std::forward<Input>(input), [&](int depth, json::parse_event_t, json&) {
      if (depth > kMaxJsonDepth)
        throw UserError(name + ": " + what + " nests deeper than " + std::to_string(kMaxJsonDepth) +
                        " levels, expected at most 3");
      return true;
    });
  } catch (const json::exception& e) {
    throw UserError(name + ": " + what + " is not valid JSON: " + one_line(e.what()));
  }
}

// numel(shape) * element size, or nothing on 64-bit overflow.
std::optional<std::uint64_t> byte_count(const std::vector<std::int64_t>& shape,
                                        std::size_t element_size) {
  std::uint64_t bytes = element_size;
  for (std::int64_t d : shape)
    if (__builtin_mul_overflow(bytes, static_cast<std::uint64_t>(d), &bytes)) return std::nullopt;
  return bytes;
}

class HeaderParser {
 public:
  HeaderParser(const std::string& path, std::uint64_t data_size)
      : path_(path), data_size_(data_size) {}

  std::map<std::string, std::string> metadata(const json& value) const {
    if (!value.is_object())
      fail("__metadata__ is " + excerpt(value) + ", expected an object of strings");
    std::map<std::string, std::string> out;
    for (const auto& [key, v] : value.items()) {
      if (!v.is_string())
        fail("__metadata__ entry " + in_quotes(key) + " is " + excerpt(v) + ", expected a string");
      out[key] = v.get<std::string>();
    }
    return out;
  }

  TensorInfo tensor(const std::string& name, const json& value) const {
    const std::string where = "tensor " + in_quotes(name);
    if (!value.is_object())
      fail(where + " is " + excerpt(value) +
           ", expected an object with dtype, shape and data_offsets");
    TensorInfo t;
    t.name = name;

    const json& dtype = field(where, value, "dtype");
    if (!dtype.is_string())
      fail(where + " has dtype " + excerpt(dtype) + ", expected a string such as \"F32\"");
    const auto parsed = parse_safetensors_dtype(dtype.get<std::string>());
    if (!parsed)
      fail(where + " has unknown dtype " + excerpt(dtype) + ", expected one of " + known_dtypes());
    t.dtype = *parsed;

    const json& shape = field(where, value, "shape");
    const bool shape_ok =
        shape.is_array() && std::all_of(shape.begin(), shape.end(), [](auto& d) {
          return d.is_number_unsigned() &&
                 d.template get<std::uint64_t>() <= std::numeric_limits<std::int64_t>::max();
        });
    if (!shape_ok)
      fail(where + " has shape " + excerpt(shape) + ", expected a list of non-negative integers");
    for (const json& d : shape)
      t.shape.push_back(d.get<std::int64_t>());

    const json& offsets = field(where, value, "data_offsets");
    const bool offsets_ok = offsets.is_array() && offsets.size() == 2 &&
                            offsets[0].is_number_unsigned() && offsets[1].is_number_unsigned() &&
                            offsets[0].get<std::uint64_t>() <= offsets[1].get<std::uint64_t>();
    if (!offsets_ok)
      fail(where + " has data_offsets " + excerpt(offsets) +
           ", expected [begin, end] with 0 <= begin <= end");
    t.begin = offsets[0].get<std::uint64_t>();
    t.end = offsets[1].get<std::uint64_t>();

    const auto expected = byte_count(t.shape, entry(t.dtype).size);
    if (!expected)
      fail(where + " has shape " + shape_text(t.shape) + ", whose byte size overflows 64 bits");
    if (t.bytes() != *expected)
      fail(where + " has " + offsets_text(t) + " holding " + std::to_string(t.bytes()) +
           " bytes, expected " + std::to_string(*expected) + " bytes for " +
           safetensors_dtype_name(t.dtype) + " shape " + shape_text(t.shape));
    if (t.end > data_size_)
      fail(where + " has " + offsets_text(t) + " ending past the data section, which is " +
           std::to_string(data_size_) + " bytes");
    return t;
  }

  // The reference's rule: sorted by offset, the tensors tile the data section exactly.
  void check_layout(const std::vector<TensorInfo>& sorted) const {
    std::uint64_t expected = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo& t : sorted) {
      if (t.begin < expected)
        fail("tensor " + in_quotes(t.name) + " " + offsets_text(t) + " overlaps tensor " +
             in_quotes(previous->name) + " " + offsets_text(*previous));
      if (t.begin > expected)
        fail(std::to_string(t.begin - expected) + " unused bytes before tensor " +
             in_quotes(t.name) + " " + offsets_text(t) + ", expected it to start at " +
             std::to_string(expected) +
             (previous ? ", where tensor " + in_quotes(previous->name) + " ends"
                       : ", the start of the data section"));
      expected = t.end;
      previous = &t;
    }
    if (expected != data_size_)
      fail("data section is " + std::to_string(data_size_) + " bytes but its tensors cover " +
           std::to_string(expected) + ", expected no trailing bytes");
  }

  [[noreturn]] void fail(const std::string& what) const { throw UserError(path_ + ": " + what); }

 private:
  const json& field(const std::string& where, const json& object, const char* key) const {
    const auto it = object.find(key);
    if (it == object.end()) fail(where + " has no '" + key + "' field");
    return *it;
  }

  const std::string& path_;
  std::uint64_t data_size_;
};

std::uint64_t read_le64(const std::byte* p) {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Widens n elements of type From at an address of any alignment.
template <class From, class Convert>
void convert(const std::byte* src, std::span<float> out, Convert widen) {
  const std::size_t n = out.size();
#pragma omp parallel for schedule(static) if (n >= kParallelElements)
  for (std::size_t i = 0; i < n; ++i) {
    From v;
    std::memcpy(&v, src + i * sizeof(From), sizeof(From));
    out[i] = widen(v);
  }
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

// Removes the temporary file unless the write got as far as renaming it.
class TempFile {
 public:
  explicit TempFile(fs::path path) : path_(std::move(path)) {}
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (!committed_) {
      std::error_code ignored;
      fs::remove(path_, ignored);
    }
  }
  const fs::path& path() const { return path_; }
  void commit() { committed_ = true; }

 private:
  fs::path path_;
  bool committed_ = false;
};

}  // namespace

std::size_t safetensors_dtype_size(SafetensorsDtype dtype) {
  return entry(dtype).size;
}

const char* safetensors_dtype_name(SafetensorsDtype dtype) {
  return entry(dtype).name;
}

std::optional<SafetensorsDtype> parse_safetensors_dtype(std::string_view name) {
  for (const DtypeEntry& e : kDtypes)
    if (name == e.name) return e.dtype;
  return std::nullopt;
}

std::int64_t TensorInfo::numel() const {
  // Unsigned, so that a huge dimension next to a zero one cannot overflow on the way to zero.
  std::uint64_t n = 1;
  for (std::int64_t d : shape)
    n *= static_cast<std::uint64_t>(d);
  return static_cast<std::int64_t>(n);
}

SafetensorsFile SafetensorsFile::open(const fs::path& path) {
  SafetensorsFile file(path.string(), FileMap(path));
  const std::span<const std::byte> bytes = file.map_.bytes();
  const std::string& name = file.path_;
  if (bytes.size() < 8)
    throw UserError(name + ": file is " + std::to_string(bytes.size()) +
                    " bytes, expected at least 8 (the header length)");
  const std::uint64_t header_size = read_le64(bytes.data());
  if (header_size > kMaxHeaderBytes)
    throw UserError(name + ": header length is " + std::to_string(header_size) +
                    " bytes, expected at most " + std::to_string(kMaxHeaderBytes));
  if (header_size > bytes.size() - 8)
    throw UserError(name + ": header length is " + std::to_string(header_size) +
                    " bytes, expected at most " + std::to_string(bytes.size() - 8) +
                    " (the file is " + std::to_string(bytes.size()) + " bytes)");
  file.data_start_ = 8 + header_size;

  const auto* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  const json header = parse_bounded(std::string_view(header_begin, header_size), name, "header");
  if (!header.is_object())
    throw UserError(name + ": header is a JSON " + header.type_name() + ", expected an object");

  const HeaderParser parser(name, bytes.size() - file.data_start_);
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__")
      file.metadata_ = parser.metadata(value);
    else
      file.tensors_.push_back(parser.tensor(key, value));
  }
  std::sort(file.tensors_.begin(), file.tensors_.end(), [](const auto& a, const auto& b) {
    return std::pair(a.begin, a.end) < std::pair(b.begin, b.end);
  });
  parser.check_layout(file.tensors_);
  for (std::size_t i = 0; i < file.tensors_.size(); ++i)
    file.index_[file.tensors_[i].name] = i;
  return file;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::info(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (t == nullptr)
    throw UserError(path_ + ": no tensor " + in_quotes(name) + " among its " +
                    std::to_string(tensors_.size()) + " tensors");
  return *t;
}

std::span<const std::byte> SafetensorsFile::raw(std::string_view name) const {
  const TensorInfo& t = info(name);
  return map_.bytes().subspan(data_start_ + t.begin, t.bytes());
}

std::vector<float> SafetensorsFile::read_f32(std::string_view name) const {
  std::vector<float> out(static_cast<std::size_t>(info(name).numel()));
  read_f32_into(name, out);
  return out;
}

void SafetensorsFile::read_f32_into(std::string_view name, std::span<float> out) const {
  const TensorInfo& t = info(name);
  if (out.size() != static_cast<std::size_t>(t.numel()))
    throw UserError(path_ + ": tensor " + in_quotes(name) + " has " + std::to_string(t.numel()) +
                    " elements (shape " + shape_text(t.shape) + "), but the destination holds " +
                    std::to_string(out.size()));
  const std::byte* src = raw(name).data();
  switch (t.dtype) {
    case SafetensorsDtype::F32:
      if (!out.empty()) std::memcpy(out.data(), src, t.bytes());
      return;
    case SafetensorsDtype::BF16:
      convert<std::uint16_t>(src, out, bf16_to_f32);
      return;
    case SafetensorsDtype::F16:
      convert<std::uint16_t>(src, out, f16_to_f32);
      return;
    case SafetensorsDtype::F64:
      convert<double>(src, out, [](double v) { return static_cast<float>(v); });
      return;
    default:
      throw UserError(path_ + ": tensor " + in_quotes(name) + " has dtype " +
                      safetensors_dtype_name(t.dtype) +
                      ", expected F32, BF16, F16 or F64 to read it as float");
  }
}

std::vector<std::int64_t> SafetensorsFile::read_i64(std::string_view name) const {
  const TensorInfo& t = info(name);
  std::vector<std::int64_t> out(static_cast<std::size_t>(t.numel()));
  const std::byte* src = raw(name).data();
  switch (t.dtype) {
    case SafetensorsDtype::I64:
      if (!out.empty()) std::memcpy(out.data(), src, t.bytes());
      return out;
    case SafetensorsDtype::I32:
      for (std::size_t i = 0; i < out.size(); ++i) {
        std::int32_t v;
        std::memcpy(&v, src + i * sizeof v, sizeof v);
        out[i] = v;
      }
      return out;
    default:
      throw UserError(path_ + ": tensor " + in_quotes(name) + " has dtype " +
                      safetensors_dtype_name(t.dtype) +
                      ", expected I64 or I32 to read it as integers");
  }
}

SafetensorsCheckpoint SafetensorsCheckpoint::open(const fs::path& folder_or_file) {
  SafetensorsCheckpoint c;
  c.path_ = folder_or_file.string();
  const fs::path single = folder_or_file / "model.safetensors";
  const fs::path index = folder_or_file / "model.safetensors.index.json";

  if (is_file(folder_or_file) || is_file(single)) {
    const fs::path file = is_file(folder_or_file) ? folder_or_file : single;
    c.listing_ = file.string();
    c.files_.push_back(SafetensorsFile::open(file));
    for (const TensorInfo& t : c.files_[0].tensors())
      c.where_[t.name] = 0;
    return c;
  }
  std::error_code ignored;
  if (!fs::is_directory(folder_or_file, ignored))
    throw UserError(c.path_ + ": not found, expected a checkpoint folder or a .safetensors file");
  if (!is_file(index))
    throw UserError(c.path_ + ": no model.safetensors and no model.safetensors.index.json, " +
                    "expected one of them in a Hugging Face checkpoint folder");

  c.listing_ = index.string();
  const std::string& index_name = c.listing_;
  std::ifstream in(index);
  if (!in) throw UserError(index_name + ": cannot open: " + std::strerror(errno));
  const json root = parse_bounded(in, index_name, "index");
  if (!root.is_object() || !root.contains("weight_map") || !root["weight_map"].is_object())
    throw UserError(index_name + ": has no 'weight_map' object, expected one mapping tensor " +
                    "names to shard files");

  std::map<std::string, std::size_t> shards;
  for (const auto& [tensor, shard] : root["weight_map"].items()) {
    const std::string where = index_name + ": weight_map entry " + in_quotes(tensor);
    if (!shard.is_string())
      throw UserError(where + " is " + excerpt(shard) + ", expected a shard file name");
    const std::string file = shard.get<std::string>();
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos)
      throw UserError(where + " names shard " + in_quotes(file) +
                      ", expected a file name in the same folder");
    auto [it, added] = shards.try_emplace(file, c.files_.size());
    if (added) {
      const fs::path shard_path = folder_or_file / file;
      if (!is_file(shard_path))
        throw UserError(where + " names shard " + in_quotes(file) +
                        ", which is missing: " + shard_path.string() + " does not exist");
      c.files_.push_back(SafetensorsFile::open(shard_path));
    }
    const SafetensorsFile& holder = c.files_[it->second];
    if (holder.find(tensor) == nullptr)
      throw UserError(where + " names shard " + in_quotes(file) + ", but " + holder.path() +
                      " has no such tensor");
    c.where_[tensor] = it->second;
  }
  return c;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& entry : where_)
    out.push_back(entry.first);
  return out;
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(std::string_view name) const {
  const auto it = where_.find(name);
  if (it == where_.end())
    throw UserError(path_ + ": no tensor " + in_quotes(name) + " in any file (" + listing_ +
                    " lists " + std::to_string(where_.size()) + " tensors)");
  return files_[it->second];
}

const TensorInfo& SafetensorsCheckpoint::info(std::string_view name) const {
  return file_of(name).info(name);
}

std::span<const std::byte> SafetensorsCheckpoint::raw(std::string_view name) const {
  return file_of(name).raw(name);
}

std::vector<float> SafetensorsCheckpoint::read_f32(std::string_view name) const {
  return file_of(name).read_f32(name);
}

void SafetensorsCheckpoint::read_f32_into(std::string_view name, std::span<float> out) const {
  file_of(name).read_f32_into(name, out);
}

std::vector<std::int64_t> SafetensorsCheckpoint::read_i64(std::string_view name) const {
  return file_of(name).read_i64(name);
}

void write_safetensors(const fs::path& path, std::span<const SafetensorsTensor> tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string name = path.string();
  // Sorted by name: the order of the header's keys, and so of the data.
  std::map<std::string, const SafetensorsTensor*> sorted;
  for (const SafetensorsTensor& t : tensors) {
    const std::string where = name + ": tensor " + in_quotes(t.name);
    if (t.name.empty() || t.name == "__metadata__")
      throw UserError(where + " has a reserved name, expected a non-empty tensor name");
    if (!sorted.emplace(t.name, &t).second)
      throw UserError(where + " is given twice, expected unique names");
    if (std::any_of(t.shape.begin(), t.shape.end(), [](std::int64_t d) { return d < 0; }))
      throw UserError(where + " has shape " + shape_text(t.shape) +
                      ", expected non-negative sizes");
    const auto expected = byte_count(t.shape, safetensors_dtype_size(t.dtype));
    if (!expected || *expected != t.data.size())
      throw UserError(where + " has " + std::to_string(t.data.size()) +
                      " bytes of data, expected " +
                      (expected ? std::to_string(*expected) : std::string("an overflowing count")) +
                      " for " + safetensors_dtype_name(t.dtype) + " shape " + shape_text(t.shape));
  }

  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& [tensor_name, t] : sorted) {
    header[tensor_name] = {{"dtype", safetensors_dtype_name(t->dtype)},
                           {"shape", t->shape},
                           {"data_offsets", {offset, offset + t->data.size()}}};
    offset += t->data.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    throw UserError(name +
                    ": a tensor name or metadata entry is not valid UTF-8: " + one_line(e.what()));
  }
  // Spaces up to a multiple of 8 keep the data section 8-byte aligned, as the reference writes.
  text.append((8 - text.size() % 8) % 8, ' ');

  TempFile temp(name + ".tmp");
  std::unique_ptr<std::FILE, FileCloser> out(std::fopen(temp.path().c_str(), "wb"));
  if (!out) throw UserError(temp.path().string() + ": cannot create: " + std::strerror(errno));
  const auto write = [&](const void* data, std::size_t size) {
    if (size != 0 && std::fwrite(data, 1, size, out.get()) != size)
      throw UserError(temp.path().string() + ": cannot write: " + std::strerror(errno));
  };
  const std::uint64_t header_size = text.size();
  write(&header_size, sizeof header_size);
  write(text.data(), text.size());
  for (const auto& entry : sorted)
    write(entry.second->data.data(), entry.second->data.size());
  if (std::fflush(out.get()) != 0 || ::fsync(::fileno(out.get())) != 0)
    throw UserError(temp.path().string() + ": cannot write: " + std::strerror(errno));
  if (std::fclose(out.release()) != 0)
    throw UserError(temp.path().string() + ": cannot close: " + std::strerror(errno));
  std::error_code error;
  fs::rename(temp.path(), path, error);
  if (error)
    throw UserError(temp.path().string() + ": cannot rename to " + name + ": " + error.message());
  temp.commit();
}

}  // namespace fastllm
