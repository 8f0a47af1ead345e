#include "train/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <regex>

#include "io/error.h"
#include "io/hdf5_file.h"
#include "model/parameters.h"

namespace fastllm {
namespace {

// Version 2 adds the checksums of every dataset (README.md, "Formats"); version 1 files still load,
// unverified.
constexpr std::int64_t kFormatVersion = 2;
constexpr std::int64_t kFirstVersionWithChecksums = 2;

// Hugging Face [rows, cols] <-> stored [cols, rows].
std::vector<float> transpose(const std::vector<float>& in, std::int64_t rows, std::int64_t cols) {
  std::vector<float> out(in.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c)
      out[c * rows + r] = in[r * cols + c];
  }
  return out;
}

std::int64_t volume(const std::vector<std::int64_t>& count) {
  std::int64_t v = 1;
  for (auto c : count)
    v *= c;
  return v;
}

// Where this rank's part of a parameter sits in its dataset: a block of whole rows (tensor-
// parallel parts are contiguous rows of the stored orientation, docs/DESIGN.md section 6).
struct Slab {
  std::vector<std::int64_t> offset, count;
};

Slab slab_of(const ParameterSpec& s, const Parameter& p) {
  Slab slab;
  slab.offset = s.dataset_index;
  slab.count.assign(s.dataset_index.size(), 1);
  std::vector<std::int64_t> shape = p.shape;
  if (s.transposed) std::swap(shape[0], shape[1]);
  // The stored axis this rank's part is cut along: the HF axis, swapped when stored transposed.
  const int axis = p.split_axis < 0 ? -1 : (s.transposed ? 1 - p.split_axis : p.split_axis);
  if (axis > 0) throw std::logic_error("checkpoint: " + p.name + " is not split along stored rows");
  for (std::size_t i = 0; i < shape.size(); ++i) {
    slab.offset.push_back(axis == static_cast<int>(i) ? p.split_begin : 0);
    slab.count.push_back(shape[i]);
  }
  return slab;
}

// Copies the dense block `part` at part_offset into the dense block `box` at box_offset.
void place(const Slab& box, std::vector<float>& box_data, const Slab& part,
           const float* part_data) {
  const std::size_t rank = box.count.size();
  const std::int64_t run = part.count[rank - 1];
  std::vector<std::int64_t> index(rank, 0);
  for (std::int64_t done = 0, n = volume(part.count); done < n; done += run) {
    std::int64_t at = 0;
    for (std::size_t a = 0; a < rank; ++a)
      at = at * box.count[a] + (part.offset[a] - box.offset[a] + index[a]);
    std::copy_n(part_data + done, run, box_data.begin() + at);
    for (std::size_t a = rank - 1; a-- > 0;) {
      if (++index[a] < part.count[a]) break;
      index[a] = 0;
    }
  }
}

// One section of a checkpoint: "/model" (the fp32 master weights), or a moment of AdamW.
struct Section {
  const char* group;  // dataset names are ParameterSpec::dataset with "/model" replaced by this
  OptimizerState state;
};

std::string in_group(const std::string& dataset, const std::string& group) {
  return group + dataset.substr(std::string("/model").size());
}

const Section kSections[] = {{"/model", OptimizerState::Master},
                             {"/optimizer/exp_avg", OptimizerState::ExpAvg},
                             {"/optimizer/exp_avg_sq", OptimizerState::ExpAvgSq}};

// The datasets of an architecture in a fixed order (the same on every rank): the first parameter
// stored in each.
std::vector<const ParameterSpec*> datasets_of(const std::vector<ParameterSpec>& table) {
  std::vector<const ParameterSpec*> out;
  for (const ParameterSpec& p : table) {
    if (std::none_of(out.begin(), out.end(), [&](auto* d) { return d->dataset == p.dataset; }))
      out.push_back(&p);
  }
  return out;
}

// This rank's values of one section for all of its parameters, in flat order, on the host.
std::vector<float> section_values(Model& model, AdamW* optimizer, OptimizerState which) {
  if (optimizer) return optimizer->gather(which);
  std::vector<float> out(static_cast<std::size_t>(model.parameter_count()));
  for (const Parameter& p : model.parameters()) {
    const std::vector<float> v = model.read_weight(p);
    std::copy(v.begin(), v.end(), out.begin() + p.offset);
  }
  return out;
}

// Reads the elements [begin, end) (flat, in the Hugging Face orientation) of this rank's part of
// parameter p from the file into out: the rows of the stored orientation that hold them, so a
// rank whose ZeRO-1 shard starts or ends inside a parameter reads at most a row more than it keeps.
void read_part(H5File& file, const std::string& dataset, const ParameterSpec& s, const Parameter& p,
               std::int64_t begin, std::int64_t end, float* out) {
  const std::int64_t width = p.shape.size() > 1 ? p.shape[1] : 1;
  const std::int64_t row0 = begin / width, row1 = (end + width - 1) / width;
  Slab slab = slab_of(s, p);
  const std::size_t axis = s.dataset_index.size();  // the first axis of the parameter itself
  std::vector<float> values;
  if (s.transposed) {
    // Memory rows are stored columns.
    slab.offset[axis + 1] += row0;
    slab.count[axis + 1] = row1 - row0;
    values.resize(static_cast<std::size_t>(volume(slab.count)));
    file.read_slab_collective(dataset, H5DType::F32, slab.offset, slab.count, values.data());
    values = transpose(values, p.shape[1], row1 - row0);
  } else {
    slab.offset[axis] += row0;
    slab.count[axis] = row1 - row0;
    values.resize(static_cast<std::size_t>(volume(slab.count)));
    file.read_slab_collective(dataset, H5DType::F32, slab.offset, slab.count, values.data());
  }
  std::copy(values.begin() + (begin - row0 * width), values.begin() + (end - row0 * width), out);
}

// One part of a parameter to read: its elements [begin, end) into out.
struct PartRead {
  const Parameter* parameter;
  const ParameterSpec* stored;
  std::int64_t begin, end;
  float* out;
};

// Reads every part, dataset by dataset in the architecture's order, as collective reads: a rank
// with fewer parts of a dataset than another joins that one's extra reads with empty selections,
// so that all ranks make the same calls.
void read_parts(H5File& file, const std::vector<ParameterSpec>& table, const std::string& group,
                const std::vector<PartRead>& parts, MPI_Comm world) {
  for (const ParameterSpec* stored : datasets_of(table)) {
    const std::string& dataset = stored->dataset;
    std::vector<const PartRead*> mine;
    for (const PartRead& part : parts) {
      if (part.stored->dataset == dataset) mine.push_back(&part);
    }
    long long calls = static_cast<long long>(mine.size());
    MPI_Allreduce(MPI_IN_PLACE, &calls, 1, MPI_LONG_LONG, MPI_MAX, world);
    const std::string name = in_group(dataset, group);
    const std::vector<std::int64_t> nothing(stored->dataset_shape.size(), 0);
    for (long long i = 0; i < calls; ++i) {
      if (i < static_cast<long long>(mine.size())) {
        const PartRead& r = *mine[static_cast<std::size_t>(i)];
        read_part(file, name, *r.stored, *r.parameter, r.begin, r.end, r.out);
      } else {
        file.read_slab_collective(name, H5DType::F32, nothing, nothing, nullptr);
      }
    }
  }
}

// The block one rank writes of a dataset and its values.
struct Block {
  Slab slab;
  std::vector<float> values;
};

// This rank's parts of one dataset (its layers, all experts, its tensor-parallel rows; replicas
// elsewhere hold none) merged into the one dense block they form, in the stored orientation.
Block merge_parts(const std::vector<ParameterSpec>& table, const Model& model,
                  const std::vector<float>& flat, const ParameterSpec& dataset) {
  std::vector<Block> parts;
  for (const Parameter& p : model.parameters()) {
    const ParameterSpec& s = table[p.index];
    if (!p.primary || s.dataset != dataset.dataset) continue;
    std::vector<float> values(flat.begin() + p.offset, flat.begin() + p.offset + p.numel);
    if (s.transposed) values = transpose(values, p.shape[0], p.shape[1]);
    parts.push_back({slab_of(s, p), std::move(values)});
  }
  const std::size_t rank = dataset.dataset_shape.size();
  Block block{{std::vector<std::int64_t>(rank, 0), std::vector<std::int64_t>(rank, 0)}, {}};
  if (parts.empty()) return block;
  block.slab = parts[0].slab;
  for (const Block& part : parts) {
    for (std::size_t a = 0; a < rank; ++a) {
      const std::int64_t end = std::max(block.slab.offset[a] + block.slab.count[a],
                                        part.slab.offset[a] + part.slab.count[a]);
      block.slab.offset[a] = std::min(block.slab.offset[a], part.slab.offset[a]);
      block.slab.count[a] = end - block.slab.offset[a];
    }
  }
  std::int64_t held = 0;
  for (const Block& part : parts)
    held += static_cast<std::int64_t>(part.values.size());
  if (held != volume(block.slab.count))
    throw std::logic_error("checkpoint: this rank's part of " + dataset.dataset +
                           " is not one block");
  block.values.resize(static_cast<std::size_t>(held));
  for (const Block& part : parts)
    place(block.slab, block.values, part.slab, part.values.data());
  return block;
}

// The share of a block that data-parallel rank dp_rank of dp_size writes: a contiguous range of
// the first axis long enough to split (all of it on rank 0 when none is).
Block data_parallel_share(Block block, int dp_rank, int dp_size) {
  if (dp_size == 1 || block.values.empty()) return block;
  std::vector<std::int64_t>& count = block.slab.count;
  const auto axis =
      std::find_if(count.begin(), count.end(), [&](std::int64_t c) { return c >= dp_size; });
  if (axis == count.end()) {
    if (dp_rank != 0) {
      count[0] = 0;
      block.values.clear();
    }
    return block;
  }
  const auto a = static_cast<std::size_t>(axis - count.begin());
  const std::int64_t n = count[a];
  const std::int64_t lo = n * dp_rank / dp_size, hi = n * (dp_rank + 1) / dp_size;
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < a; ++i)
    outer *= count[i];
  for (std::size_t i = a + 1; i < count.size(); ++i)
    inner *= count[i];
  std::vector<float> mine;
  mine.reserve(static_cast<std::size_t>(outer * (hi - lo) * inner));
  for (std::int64_t o = 0; o < outer; ++o) {
    const auto first = block.values.begin() + (o * n + lo) * inner;
    mine.insert(mine.end(), first, first + (hi - lo) * inner);
  }
  block.values = std::move(mine);
  block.slab.offset[a] += lo;
  count[a] = hi - lo;
  return block;
}

// An upper bound of a checkpoint's size: its datasets, their checksums, HDF5's alignment of each
// dataset to 1 MiB, the attributes and the metadata.
std::uint64_t checkpoint_bytes(const Architecture& arch, std::size_t sections,
                               const TrainState& state) {
  constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
  std::uint64_t bytes =
      4 * kMiB + 2 * state.config_json.size() + 2 * architecture_to_json(arch).size();
  const std::vector<ParameterSpec> table = parameter_table(arch);
  for (const ParameterSpec* d : datasets_of(table)) {
    const auto elements = static_cast<std::uint64_t>(volume(d->dataset_shape));
    // Objects of 1 MiB or more start on a 1 MiB boundary: less than 1 MiB lost before each.
    const std::uint64_t data = elements * sizeof(float), sums = elements / 8 + 8;
    bytes += sections *
             (data + sums + (data >= kMiB ? kMiB : 0) + (sums >= kMiB ? kMiB : 0) + 64 * 1024);
  }
  return bytes;
}

}  // namespace

std::string checkpoint_name(std::int64_t iteration) {
  char name[64];
  std::snprintf(name, sizeof name, "checkpoint-%08lld.h5", static_cast<long long>(iteration));
  return name;
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  namespace fs = std::filesystem;
  static const std::regex pattern(R"(checkpoint-(\d+)\.h5)");
  std::vector<std::pair<long long, std::string>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && std::regex_match(name, m, pattern))
      found.emplace_back(std::stoll(m[1]), entry.path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [iteration, path] : found)
    out.push_back(path);
  return out;
}

void save_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                     const TrainState& state, const CheckpointRanks& ranks) {
  const Architecture& arch = model.arch();
  const std::vector<ParameterSpec> table = parameter_table(arch);
  const std::vector<const ParameterSpec*> datasets = datasets_of(table);
  // With refuse_non_finite, weights that are not finite are never saved (the last checkpoint of a
  // run stays a good one).
  std::vector<float> master = section_values(model, optimizer, OptimizerState::Master);
  std::string bad;
  for (const Parameter& p : model.parameters()) {
    if (!ranks.refuse_non_finite) break;
    const auto first = master.begin() + p.offset;
    const auto found =
        std::find_if(first, first + p.numel, [](float v) { return !std::isfinite(v); });
    if (found != first + p.numel) {
      bad = p.name + " holds " + (std::isnan(*found) ? "NaN" : "an infinity") + " at element " +
            std::to_string(found - first);
      break;
    }
  }
  int any_bad = bad.empty() ? 0 : 1;
  MPI_Allreduce(MPI_IN_PLACE, &any_bad, 1, MPI_INT, MPI_MAX, ranks.world);
  if (any_bad)
    throw UserError("not saving " + path + ": the weights are not finite (" +
                    (bad.empty() ? std::string("on another rank") : bad) + ")");
  H5File file = H5File::create(path, ranks.world);
  const std::size_t sections = optimizer ? 3 : 1;
  file.reserve(checkpoint_bytes(arch, sections, state));
  for (std::size_t k = 0; k < sections; ++k) {
    for (const ParameterSpec* d : datasets)
      file.define_dataset(in_group(d->dataset, kSections[k].group), H5DType::F32, d->dataset_shape);
  }
  for (std::size_t k = 0; k < sections; ++k) {
    const std::vector<float> flat =
        k == 0 ? std::move(master) : section_values(model, optimizer, kSections[k].state);
    // One collective write per dataset.
    for (const ParameterSpec* d : datasets) {
      const Block block =
          data_parallel_share(merge_parts(table, model, flat, *d), ranks.dp_rank, ranks.dp_size);
      file.write_slab(in_group(d->dataset, kSections[k].group), H5DType::F32, block.slab.offset,
                      block.slab.count, block.values.data());
    }
  }
  file.set_attr_int("/", "format_version", kFormatVersion);
  file.set_attr_string("/", "architecture", architecture_to_json(arch));
  file.set_attr_string("/", "config", state.config_json);
  file.set_attr_int("/", "iteration", state.iteration);
  file.set_attr_int("/", "consumed_samples", state.consumed_samples);
  file.set_attr_int("/", "seed", static_cast<std::int64_t>(state.seed));
  file.set_attr_int("/", "optimizer_steps", optimizer ? optimizer->steps() : 0);
  file.commit();
}

void save_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                     const TrainState& state, MPI_Comm comm) {
  CheckpointRanks ranks;
  ranks.world = comm;
  MPI_Comm_rank(comm, &ranks.dp_rank);
  MPI_Comm_size(comm, &ranks.dp_size);
  save_checkpoint(path, model, optimizer, state, ranks);
}

namespace {

// The architecture recorded in an open checkpoint, after checking it is one of ours.
Architecture stored_architecture(const H5File& file, const std::string& path) {
  if (!file.has_attr("/", "format_version") || !file.has_attr("/", "architecture"))
    throw UserError(path + ": not a fastllm checkpoint (no format_version or architecture)");
  const std::int64_t version = file.attr_int("/", "format_version");
  if (version < 1 || version > kFormatVersion)
    throw UserError(path + ": checkpoint format version " + std::to_string(version) +
                    ", this fastllm reads versions 1 to " + std::to_string(kFormatVersion));
  return architecture_from_json(file.attr_string("/", "architecture"), path);
}

}  // namespace

std::optional<std::int64_t> iteration_in_name(const std::string& path) {
  static const std::regex pattern(R"(checkpoint-(\d{1,18})\.h5)");
  std::smatch m;
  const std::string name = std::filesystem::path(path).filename().string();
  if (!std::regex_match(name, m, pattern)) return std::nullopt;
  return std::stoll(m[1]);
}

std::int64_t checkpoint_iteration(const std::string& path, MPI_Comm comm) {
  const H5File file = H5File::open_read(path, comm);
  stored_architecture(file, path);
  const std::int64_t iteration = file.attr_int("/", "iteration");
  const std::optional<std::int64_t> named = iteration_in_name(path);
  if (named && *named != iteration)
    throw UserError(path + ": the name says iteration " + std::to_string(*named) +
                    " but the checkpoint holds iteration " + std::to_string(iteration));
  return iteration;
}

Architecture checkpoint_architecture(const std::string& path, MPI_Comm comm) {
  return stored_architecture(H5File::open_read(path, comm), path);
}

TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                           const CheckpointRanks& ranks) {
  H5File file = H5File::open_read(path, ranks.world);
  const Architecture stored = stored_architecture(file, path);
  const bool checksummed = file.attr_int("/", "format_version") >= kFirstVersionWithChecksums;
  const Architecture& arch = model.arch();
  if (!(stored == arch))
    throw UserError(path + ": the checkpoint holds another architecture (" +
                    architecture_difference(stored, arch) + ", checkpoint vs this run)");
  // A converted model has no optimizer state yet: the moments start at zero.
  const bool moments = optimizer && file.has("/optimizer/exp_avg/embed");
  const std::size_t sections = moments ? 3 : 1;
  const std::vector<ParameterSpec> table = parameter_table(arch);
  for (std::size_t k = 0; k < sections; ++k) {
    for (const ParameterSpec* d : datasets_of(table)) {
      const std::string name = in_group(d->dataset, kSections[k].group);
      if (!file.has(name)) throw UserError(path + ": dataset " + name + " is missing");
      if (file.dataset_shape(name) != d->dataset_shape)
        throw UserError(path + ": dataset " + name + " has another shape than the architecture's");
      if (checksummed && !file.has_checksums(name))
        throw UserError(path + ": dataset " + name + " has no checksums (format version " +
                        std::to_string(kFormatVersion) + " stores them)");
    }
  }
  std::uint64_t share = 0;
  // A collective read that fails on one rank throws on all of them; the ranks still agree on the
  // outcome of everything else here, so that they all move to another file together.
  std::string failure;
  try {
    // The weights: all of this rank's parameters.
    std::vector<float> flat(static_cast<std::size_t>(model.parameter_count()));
    std::vector<PartRead> parts;
    for (const Parameter& p : model.parameters()) {
      parts.push_back({&p, &table[p.index], 0, p.numel, flat.data() + p.offset});
      share += static_cast<std::uint64_t>(p.numel) * sizeof(float);
    }
    read_parts(file, table, "/model", parts, ranks.world);
    for (const Parameter& p : model.parameters())
      model.write_weight(p, flat.data() + p.offset);
    if (optimizer) {
      const std::int64_t begin = optimizer->shard_begin(), end = optimizer->shard_end();
      optimizer->load(OptimizerState::Master, flat.data() + begin);
      // The moments: only this rank's shard of them.
      for (std::size_t k = 1; k < sections; ++k) {
        std::vector<float> values(static_cast<std::size_t>(end - begin));
        parts.clear();
        for (const Parameter& p : model.parameters()) {
          const std::int64_t lo = std::max(begin, p.offset), hi = std::min(end, p.offset + p.numel);
          if (lo < hi)
            parts.push_back(
                {&p, &table[p.index], lo - p.offset, hi - p.offset, values.data() + (lo - begin)});
        }
        read_parts(file, table, kSections[k].group, parts, ranks.world);
        optimizer->load(kSections[k].state, values.data());
        share += static_cast<std::uint64_t>(end - begin) * sizeof(float);
      }
      if (!moments) {
        const std::vector<float> zero(static_cast<std::size_t>(end - begin), 0.0f);
        optimizer->load(OptimizerState::ExpAvg, zero.data());
        optimizer->load(OptimizerState::ExpAvgSq, zero.data());
      }
      optimizer->set_steps(moments ? file.attr_int("/", "optimizer_steps") : 0);
    }
  } catch (const UserError& e) {
    failure = e.what();
  }
  int failed = failure.empty() ? 0 : 1;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, ranks.world);
  if (failed)
    throw UserError(failure.empty() ? path + ": another rank could not read its part" : failure);
  if (ranks.report_reads) {
    int rank = 0, size = 1;
    MPI_Comm_rank(ranks.world, &rank);
    MPI_Comm_size(ranks.world, &size);
    const std::uint64_t mine[2] = {file.bytes_read(), share};
    std::vector<std::uint64_t> all(2 * static_cast<std::size_t>(size));
    MPI_Gather(mine, 2, MPI_UINT64_T, all.data(), 2, MPI_UINT64_T, 0, ranks.world);
    for (int r = 0; rank == 0 && r < size; ++r)
      std::cout << "rank " << r << " read " << all[2 * r] << " bytes (share " << all[2 * r + 1]
                << ") of " << path << "\n";
  }
  TrainState state;
  state.iteration = file.attr_int("/", "iteration");
  state.consumed_samples = file.attr_int("/", "consumed_samples");
  state.seed = static_cast<std::uint64_t>(file.attr_int("/", "seed"));
  state.config_json = file.attr_string("/", "config");
  return state;
}

TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer, MPI_Comm comm) {
  CheckpointRanks ranks;
  ranks.world = comm;
  MPI_Comm_rank(comm, &ranks.dp_rank);
  MPI_Comm_size(comm, &ranks.dp_size);
  return load_checkpoint(path, model, optimizer, ranks);
}

}  // namespace fastllm
