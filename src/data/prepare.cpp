#include "data/prepare.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <utility>

#include "io/error.h"
#include "io/file_map.h"
#include "io/indexed_dataset.h"
#include "io/tokenizer.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct InputFile {
  std::string path;
  std::int64_t size = 0;
  bool jsonl = false;
};

struct Comm {
  MPI_Comm comm;
  int rank = 0;
  int size = 1;

  explicit Comm(MPI_Comm c) : comm(c) {
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
  }

  std::string broadcast(std::string text, int root) const {
    long long length = static_cast<long long>(text.size());
    MPI_Bcast(&length, 1, MPI_LONG_LONG, root, comm);
    text.resize(static_cast<std::size_t>(length));
    // MPI counts are int: send large texts in pieces.
    constexpr std::size_t kPiece = 1 << 30;
    for (std::size_t at = 0; at < text.size(); at += kPiece) {
      const auto count = static_cast<int>(std::min(kPiece, text.size() - at));
      MPI_Bcast(text.data() + at, count, MPI_CHAR, root, comm);
    }
    return text;
  }

  // Runs `step` on every rank. When any rank fails, every rank throws the error of the lowest
  // failing rank, so no rank is left waiting in a later collective.
  template <typename Step>
  void agree(Step&& step) const {
    std::string error;
    bool user_error = true;
    try {
      step();
    } catch (const UserError& e) {
      error = e.what();
    } catch (const std::exception& e) {
      error = e.what();
      user_error = false;
    }
    const int mine = error.empty() ? INT_MAX : rank;
    int first = INT_MAX;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == INT_MAX) return;
    int kind = user_error ? 1 : 0;
    MPI_Bcast(&kind, 1, MPI_INT, first, comm);
    error = broadcast(std::move(error), first);
    if (kind == 1) throw UserError(error);
    throw std::runtime_error(error);
  }
};

bool is_hidden(const fs::path& relative) {
  for (const fs::path& part : relative) {
    const std::string name = part.string();
    if (!name.empty() && name[0] == '.' && name != "." && name != "..") return true;
  }
  return false;
}

bool looks_like_jsonl(const std::string& path) {
  const std::string ext = fs::path(path).extension().string();
  return ext == ".jsonl" || ext == ".json";
}

std::vector<InputFile> resolve_inputs(const PrepareOptions& options) {
  if (options.inputs.empty()) throw UserError("prepare: no input files given");
  std::vector<InputFile> files;
  auto add = [&](const std::string& path) {
    std::error_code err;
    const auto size = fs::file_size(path, err);
    if (err) throw UserError("input '" + path + "': " + err.message());
    InputFile f;
    f.path = path;
    f.size = static_cast<std::int64_t>(size);
    f.jsonl = options.format == InputFormat::kJsonl ||
              (options.format == InputFormat::kAuto && looks_like_jsonl(path));
    files.push_back(std::move(f));
  };
  for (const std::string& input : options.inputs) {
    std::error_code err;
    const fs::file_status status = fs::status(input, err);
    if (!fs::exists(status)) throw UserError("input '" + input + "' not found");
    if (fs::is_directory(status)) {
      std::vector<std::string> found;
      for (const auto& entry : fs::recursive_directory_iterator(input)) {
        if (!entry.is_regular_file()) continue;
        if (is_hidden(fs::relative(entry.path(), input))) continue;
        found.push_back(entry.path().string());
      }
      if (found.empty()) {
        throw UserError("input folder '" + input + "' holds no files, expected text or JSONL");
      }
      std::sort(found.begin(), found.end());
      for (const std::string& path : found)
        add(path);
    } else if (fs::is_regular_file(status)) {
      add(input);
    } else {
      throw UserError("input '" + input + "' is neither a file nor a folder");
    }
  }
  return files;
}

std::string serialize(const std::vector<InputFile>& files) {
  nlohmann::json list = nlohmann::json::array();
  for (const InputFile& f : files)
    list.push_back({f.path, f.size, f.jsonl});
  return list.dump();
}

std::vector<InputFile> deserialize(const std::string& text) {
  std::vector<InputFile> files;
  for (const auto& item : nlohmann::json::parse(text)) {
    files.push_back({item[0].get<std::string>(), item[1].get<std::int64_t>(), item[2].get<bool>()});
  }
  return files;
}

bool is_blank(std::string_view text) {
  return text.find_first_not_of(" \t\n\r\f\v") == std::string_view::npos;
}

// 1-based number of the line starting at byte `offset`.
std::int64_t line_number(std::span<const std::byte> bytes, std::int64_t offset) {
  return 1 + std::count(bytes.begin(), bytes.begin() + offset, std::byte{'\n'});
}

std::string json_type(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null:
      return "null";
    case nlohmann::json::value_t::object:
      return "an object";
    case nlohmann::json::value_t::array:
      return "an array";
    case nlohmann::json::value_t::string:
      return "a string";
    case nlohmann::json::value_t::boolean:
      return "a boolean";
    case nlohmann::json::value_t::binary:
      return "binary data";
    case nlohmann::json::value_t::discarded:
      return "discarded";
    default:
      return "a number";
  }
}

// One document waiting to be tokenized: a whole text file, a line of text, or a JSONL line.
struct Item {
  std::size_t file = 0;
  std::int64_t offset = 0;  // byte offset of the line in its file
  std::string_view raw;
  bool jsonl = false;
  // Results, filled in parallel.
  std::vector<std::int32_t> ids;
  bool skipped = false;
  bool blank_line = false;
  std::string error;
};

class Tokenizing {
 public:
  Tokenizing(const PrepareOptions& options, const std::vector<InputFile>& files,
             const Tokenizer& tokenizer, IndexedDatasetWriter& writer, const Comm& comm)
      : options_(options), files_(files), tokenizer_(tokenizer), writer_(writer), comm_(comm) {}

  // Tokenizes the documents that start in this rank's share [begin, end) of the input bytes (all
  // files back to back); the last rank's share runs to the end, empty files at the end included.
  void run(std::int64_t begin, std::int64_t end, bool last) {
    start_ = last_report_ = Clock::now();
    share_bytes_ = end - begin;
    const std::int64_t own_end = last ? INT64_MAX : end;
    std::int64_t file_start = 0;
    for (std::size_t f = 0; f < files_.size(); ++f) {
      const InputFile& file = files_[f];
      const std::int64_t file_end = file_start + file.size;
      if (!file.jsonl && !options_.split_lines) {
        if (file_start >= begin && file_start < own_end) {
          maps_.emplace_back(f, FileMap(file.path));
          const auto bytes = maps_.back().second.bytes();
          add(f, 0, {reinterpret_cast<const char*>(bytes.data()), bytes.size()}, false);
          done_bytes_ += file.size;
        }
      } else if (file_end > begin && file_start < own_end) {
        lines(f, std::max<std::int64_t>(begin - file_start, 0),
              std::min<std::int64_t>(own_end - file_start, file.size));
      }
      file_start = file_end;
      flush_if_full(true);
    }
    flush();
  }

  std::int64_t skipped() const { return skipped_; }

 private:
  void lines(std::size_t f, std::int64_t local_begin, std::int64_t local_end) {
    maps_.emplace_back(f, FileMap(files_[f].path));
    const auto bytes = maps_.back().second.bytes();
    const char* data = reinterpret_cast<const char*>(bytes.data());
    const auto size = static_cast<std::int64_t>(bytes.size());
    if (size != files_[f].size) {
      throw UserError("input '" + files_[f].path + "' changed size while being read (" +
                      std::to_string(files_[f].size) + " bytes, now " + std::to_string(size) + ")");
    }
    std::int64_t start = local_begin;
    // A line belongs to the rank whose range holds its first byte.
    if (start > 0 && data[start - 1] != '\n') {
      const void* nl = std::memchr(data + start, '\n', static_cast<std::size_t>(size - start));
      start = nl == nullptr ? size : static_cast<const char*>(nl) - data + 1;
    }
    while (start < local_end) {
      const void* nl = std::memchr(data + start, '\n', static_cast<std::size_t>(size - start));
      const std::int64_t stop = nl == nullptr ? size : static_cast<const char*>(nl) - data;
      std::int64_t text_end = stop;
      if (text_end > start && data[text_end - 1] == '\r') --text_end;
      add(f, start, {data + start, static_cast<std::size_t>(text_end - start)}, files_[f].jsonl);
      done_bytes_ += stop + 1 - start;
      start = stop + 1;
      flush_if_full(false);
    }
  }

  void add(std::size_t file, std::int64_t offset, std::string_view raw, bool jsonl) {
    Item& item = batch_.emplace_back();
    item.file = file;
    item.offset = offset;
    item.raw = raw;
    item.jsonl = jsonl;
    batch_bytes_ += static_cast<std::int64_t>(raw.size());
  }

  // At a file boundary the maps of finished files can be released, so flush there too.
  void flush_if_full(bool file_done) {
    if (batch_.size() >= 4096 || batch_bytes_ >= (16 << 20) || (file_done && maps_.size() > 64)) {
      flush();
    }
  }

  void encode(Item& item) const {
    std::string owned;
    std::string_view text = item.raw;
    if (item.jsonl) {
      if (is_blank(text)) {
        item.blank_line = true;
        return;
      }
      const auto where = [&] {
        return "input '" + files_[item.file].path + "' line " +
               std::to_string(line_number(maps_bytes(item.file), item.offset));
      };
      nlohmann::json value;
      try {
        value = nlohmann::json::parse(text);
      } catch (const nlohmann::json::parse_error& e) {
        std::string what = e.what();
        const auto column = what.find("column ");
        if (column != std::string::npos) what = what.substr(column);
        item.error = where() + " is not valid JSON: " + what;
        return;
      }
      if (!value.is_object()) {
        item.error = where() + " holds " + json_type(value) +
                     ", expected an object with the key \"" + options_.json_key + "\"";
        return;
      }
      const auto found = value.find(options_.json_key);
      if (found == value.end()) {
        std::string keys;
        for (const auto& [key, unused] : value.items()) {
          keys += (keys.empty() ? "\"" : ", \"") + key + "\"";
        }
        item.error = where() + " has no key \"" + options_.json_key +
                     "\" (keys found: " + (keys.empty() ? std::string("none") : keys) +
                     "), expected the document text under it";
        return;
      }
      if (!found->is_string()) {
        item.error = where() + ": \"" + options_.json_key + "\" is " + json_type(*found) +
                     ", expected a string";
        return;
      }
      owned = found->get<std::string>();
      text = owned;
    }
    if (is_blank(text)) {
      item.skipped = true;
      return;
    }
    try {
      if (options_.prepend_bos) item.ids.push_back(tokenizer_.bos_id());
      const std::vector<std::int32_t> ids = tokenizer_.encode(text);
      item.ids.insert(item.ids.end(), ids.begin(), ids.end());
    } catch (const UserError& e) {
      item.error = "input '" + files_[item.file].path + "': " + e.what();
      return;
    }
    if (options_.append_eos) item.ids.push_back(tokenizer_.eos_id());
  }

  std::span<const std::byte> maps_bytes(std::size_t file) const {
    for (const auto& [f, map] : maps_) {
      if (f == file) return map.bytes();
    }
    throw std::logic_error("input file not mapped");
  }

  void flush() {
    const auto count = static_cast<std::int64_t>(batch_.size());
#pragma omp parallel for schedule(dynamic, 16)
    for (std::int64_t i = 0; i < count; ++i)
      encode(batch_[static_cast<std::size_t>(i)]);
    for (Item& item : batch_) {
      if (!item.error.empty()) throw UserError(item.error);
      if (item.blank_line) continue;
      if (item.skipped) {
        ++skipped_;
        continue;
      }
      writer_.add_document(item.ids);
    }
    batch_.clear();
    batch_bytes_ = 0;
    // Keep only the map of the file being read.
    if (maps_.size() > 1) maps_.erase(maps_.begin(), maps_.end() - 1);
    report(false);
  }

  void report(bool force) {
    if (!options_.progress || comm_.rank != 0) return;
    const auto now = Clock::now();
    if (!force && now - last_report_ < std::chrono::seconds(2)) return;
    last_report_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double share =
        share_bytes_ > 0 ? 100.0 * static_cast<double>(done_bytes_) / share_bytes_ : 100.0;
    std::fprintf(stderr, "prepare: %lld documents, %lld tokens, %.0f tokens/s, %.0f%% of %s\n",
                 static_cast<long long>(writer_.num_documents()),
                 static_cast<long long>(writer_.num_tokens()),
                 seconds > 0 ? static_cast<double>(writer_.num_tokens()) / seconds : 0.0, share,
                 comm_.size > 1 ? "rank 0's share" : "the input");
    std::fflush(stderr);
  }

  const PrepareOptions& options_;
  const std::vector<InputFile>& files_;
  const Tokenizer& tokenizer_;
  IndexedDatasetWriter& writer_;
  const Comm& comm_;
  std::vector<std::pair<std::size_t, FileMap>> maps_;
  std::vector<Item> batch_;
  std::int64_t batch_bytes_ = 0;
  std::int64_t skipped_ = 0;
  std::int64_t done_bytes_ = 0;
  std::int64_t share_bytes_ = 0;
  Clock::time_point start_;
  Clock::time_point last_report_;
};

// Removes finished partial datasets when prepare_dataset leaves, whatever the outcome. Rank 0
// removes every rank's, so none is left once it returns; the others remove their own.
class PartialFiles {
 public:
  explicit PartialFiles(std::vector<std::string> prefixes) : prefixes_(std::move(prefixes)) {}
  PartialFiles(const PartialFiles&) = delete;
  PartialFiles& operator=(const PartialFiles&) = delete;
  ~PartialFiles() {
    std::error_code ignored;
    for (const std::string& prefix : prefixes_) {
      fs::remove(prefix + ".bin", ignored);
      fs::remove(prefix + ".idx", ignored);
    }
  }

 private:
  std::vector<std::string> prefixes_;
};

std::string partial_prefix(const std::string& output, int rank, int size) {
  return output + ".part-" + std::to_string(rank) + "-of-" + std::to_string(size);
}

}  // namespace

PrepareStats prepare_dataset(const PrepareOptions& options, MPI_Comm mpi_comm) {
  const Comm comm(mpi_comm);
  const auto start = Clock::now();
  if (options.output_prefix.empty()) throw UserError("prepare: no output prefix given");

  std::vector<InputFile> files;
  std::string listing;
  comm.agree([&] {
    if (comm.rank != 0) return;
    files = resolve_inputs(options);
    const fs::path parent = fs::path(options.output_prefix).parent_path();
    std::error_code err;
    if (!parent.empty()) fs::create_directories(parent, err);
    if (err) {
      throw UserError("cannot create the output folder '" + parent.string() +
                      "': " + err.message());
    }
    listing = serialize(files);
  });
  files = deserialize(comm.broadcast(listing, 0));

  std::optional<Tokenizer> tokenizer;
  comm.agree([&] {
    tokenizer.emplace(options.tokenizer);
    if (options.prepend_bos && tokenizer->bos_id() < 0) {
      throw UserError("tokenizer '" + tokenizer->path() +
                      "' has no BOS piece to start each document with; pass --prepend_bos=0");
    }
  });
  const TokenDtype dtype = dtype_for_vocab(tokenizer->vocab_size());

  std::int64_t total = 0;
  for (const InputFile& f : files)
    total += f.size;
  const auto bound = [&](int r) {
    return static_cast<std::int64_t>(static_cast<__int128>(total) * r / comm.size);
  };
  const std::int64_t begin = bound(comm.rank);
  const std::int64_t end = bound(comm.rank + 1);

  const bool single = comm.size == 1;
  const std::string mine =
      single ? options.output_prefix : partial_prefix(options.output_prefix, comm.rank, comm.size);
  std::vector<std::string> cleanup;
  if (!single) {
    for (int r = 0; r < comm.size; ++r) {
      if (comm.rank == 0 || r == comm.rank) {
        cleanup.push_back(partial_prefix(options.output_prefix, r, comm.size));
      }
    }
  }
  const PartialFiles partials(std::move(cleanup));

  long long counts[3] = {0, 0, 0};
  comm.agree([&] {
    IndexedDatasetWriter writer(mine, dtype);
    Tokenizing work(options, files, *tokenizer, writer, comm);
    work.run(begin, end, comm.rank == comm.size - 1);
    counts[0] = writer.num_documents();
    counts[1] = writer.num_tokens();
    counts[2] = work.skipped();
    writer.finalize();
  });
  long long totals[3] = {0, 0, 0};
  MPI_Allreduce(counts, totals, 3, MPI_LONG_LONG, MPI_SUM, comm.comm);

  if (!single) {
    comm.agree([&] {
      if (comm.rank != 0) return;
      IndexedDatasetWriter writer(options.output_prefix, dtype);
      for (int r = 0; r < comm.size; ++r) {
        writer.append(IndexedDataset(partial_prefix(options.output_prefix, r, comm.size)));
      }
      writer.finalize();
    });
  }

  PrepareStats stats;
  stats.documents = totals[0];
  stats.tokens = totals[1];
  stats.skipped = totals[2];
  stats.bytes = total;
  stats.dtype = std::string(dtype_name(dtype));
  stats.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (options.progress && comm.rank == 0) {
    std::fprintf(stderr,
                 "prepare: wrote %s.bin and .idx: %lld documents, %lld %s tokens, %lld skipped "
                 "empty, from %lld bytes in %.1f s\n",
                 options.output_prefix.c_str(), static_cast<long long>(stats.documents),
                 static_cast<long long>(stats.tokens), stats.dtype.c_str(),
                 static_cast<long long>(stats.skipped), static_cast<long long>(stats.bytes),
                 stats.seconds);
  }
  return stats;
}

}  // namespace fastllm
