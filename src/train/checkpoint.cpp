#include "train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <regex>

#include "io/error.h"
#include "io/hdf5_file.h"
#include "model/stored_layout.h"

namespace fastllm {
namespace {

constexpr std::int64_t kFormatVersion = 1;

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
// parallel parts are contiguous rows of the stored orientation, DESIGN.md section 6).
struct Slab {
  std::vector<std::int64_t> offset, count;
};

Slab slab_of(const StoredAs& s, const Parameter& p) {
  Slab slab;
  slab.offset = s.index;
  slab.count.assign(s.index.size(), 1);
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
  const char* group;  // dataset names are StoredAs::dataset with "/model" replaced by this
  OptimizerState state;
};

std::string in_group(const std::string& dataset, const std::string& group) {
  return group + dataset.substr(std::string("/model").size());
}

const Section kSections[] = {{"/model", OptimizerState::Master},
                             {"/optimizer/exp_avg", OptimizerState::ExpAvg},
                             {"/optimizer/exp_avg_sq", OptimizerState::ExpAvgSq}};

// The datasets of an architecture in a fixed order (the same on every rank), with the stored
// layout of each.
std::vector<std::pair<std::string, StoredAs>> datasets_of(const Architecture& arch) {
  std::vector<std::pair<std::string, StoredAs>> out;
  for (const ParameterShape& p : parameter_shapes(arch)) {
    const StoredAs s = stored_as(arch, p.name);
    if (std::none_of(out.begin(), out.end(), [&](const auto& d) { return d.first == s.dataset; }))
      out.emplace_back(s.dataset, s);
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
void read_part(H5File& file, const std::string& dataset, const StoredAs& s, const Parameter& p,
               std::int64_t begin, std::int64_t end, float* out) {
  const std::int64_t width = p.shape.size() > 1 ? p.shape[1] : 1;
  const std::int64_t row0 = begin / width, row1 = (end + width - 1) / width;
  Slab slab = slab_of(s, p);
  const std::size_t axis = s.index.size();  // the first axis of the parameter itself
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
  StoredAs stored;
  std::int64_t begin, end;
  float* out;
};

// Reads every part, dataset by dataset in the architecture's order, as collective reads: a rank
// with fewer parts of a dataset than another joins that one's extra reads with empty selections,
// so that all ranks make the same calls.
void read_parts(H5File& file, const Architecture& arch, const std::string& group,
                const std::vector<PartRead>& parts, MPI_Comm world) {
  for (const auto& [dataset, stored] : datasets_of(arch)) {
    std::vector<const PartRead*> mine;
    for (const PartRead& part : parts) {
      if (part.stored.dataset == dataset) mine.push_back(&part);
    }
    long long calls = static_cast<long long>(mine.size());
    MPI_Allreduce(MPI_IN_PLACE, &calls, 1, MPI_LONG_LONG, MPI_MAX, world);
    const std::string name = in_group(dataset, group);
    const std::vector<std::int64_t> nothing(stored.dataset_shape.size(), 0);
    for (long long i = 0; i < calls; ++i) {
      if (i < static_cast<long long>(mine.size())) {
        const PartRead& r = *mine[static_cast<std::size_t>(i)];
        read_part(file, name, r.stored, *r.parameter, r.begin, r.end, r.out);
      } else {
        file.read_slab_collective(name, H5DType::F32, nothing, nothing, nullptr);
      }
    }
  }
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
  H5File file = H5File::create(path, ranks.world);
  const std::vector<std::pair<std::string, StoredAs>> datasets = datasets_of(arch);
  const std::size_t sections = optimizer ? 3 : 1;
  for (std::size_t k = 0; k < sections; ++k) {
    for (const auto& [name, s] : datasets)
      file.define_dataset(in_group(name, kSections[k].group), H5DType::F32, s.dataset_shape);
  }
  for (std::size_t k = 0; k < sections; ++k) {
    const std::vector<float> flat = section_values(model, optimizer, kSections[k].state);
    // One collective write per dataset: this rank's parameters of it form one dense block (its
    // layers, all experts, its tensor-parallel rows); replicas elsewhere write nothing.
    for (const auto& [name, stored] : datasets) {
      std::vector<std::pair<Slab, std::vector<float>>> parts;
      for (const Parameter& p : model.parameters()) {
        if (!p.primary) continue;
        const StoredAs s = stored_as(arch, p.name);
        if (s.dataset != name) continue;
        std::vector<float> values(flat.begin() + p.offset, flat.begin() + p.offset + p.numel);
        if (s.transposed) values = transpose(values, p.shape[0], p.shape[1]);
        parts.emplace_back(slab_of(s, p), std::move(values));
      }
      const std::size_t rank = stored.dataset_shape.size();
      Slab box{std::vector<std::int64_t>(rank, 0), std::vector<std::int64_t>(rank, 0)};
      std::vector<float> data;
      if (!parts.empty()) {
        box = parts[0].first;
        for (const auto& [slab, values] : parts) {
          for (std::size_t a = 0; a < rank; ++a) {
            const std::int64_t end =
                std::max(box.offset[a] + box.count[a], slab.offset[a] + slab.count[a]);
            box.offset[a] = std::min(box.offset[a], slab.offset[a]);
            box.count[a] = end - box.offset[a];
          }
        }
        std::int64_t held = 0;
        for (const auto& part : parts)
          held += static_cast<std::int64_t>(part.second.size());
        if (held != volume(box.count))
          throw std::logic_error("checkpoint: this rank's part of " + name + " is not one block");
        data.resize(static_cast<std::size_t>(held));
        for (const auto& [slab, values] : parts)
          place(box, data, slab, values.data());
        // Data-parallel replicas each write a share of the block's first axis long enough.
        const auto axis = std::find_if(box.count.begin(), box.count.end(),
                                       [&](std::int64_t c) { return c >= ranks.dp_size; });
        if (axis == box.count.end()) {
          if (ranks.dp_rank != 0) box.count[0] = 0;
        } else if (ranks.dp_size > 1) {
          const auto a = static_cast<std::size_t>(axis - box.count.begin());
          const std::int64_t n = box.count[a];
          const std::int64_t lo = n * ranks.dp_rank / ranks.dp_size;
          const std::int64_t hi = n * (ranks.dp_rank + 1) / ranks.dp_size;
          std::int64_t outer = 1, inner = 1;
          for (std::size_t i = 0; i < a; ++i)
            outer *= box.count[i];
          for (std::size_t i = a + 1; i < rank; ++i)
            inner *= box.count[i];
          std::vector<float> mine;
          mine.reserve(static_cast<std::size_t>(outer * (hi - lo) * inner));
          for (std::int64_t o = 0; o < outer; ++o) {
            const auto first = data.begin() + (o * n + lo) * inner;
            mine.insert(mine.end(), first, first + (hi - lo) * inner);
          }
          data = std::move(mine);
          box.offset[a] += lo;
          box.count[a] = hi - lo;
        }
      }
      file.write_slab(in_group(name, kSections[k].group), H5DType::F32, box.offset, box.count,
                      data.data());
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
  if (version != kFormatVersion)
    throw UserError(path + ": checkpoint format version " + std::to_string(version) +
                    ", this fastllm reads version " + std::to_string(kFormatVersion));
  return architecture_from_json(file.attr_string("/", "architecture"), path);
}

}  // namespace

Architecture checkpoint_architecture(const std::string& path, MPI_Comm comm) {
  return stored_architecture(H5File::open_read(path, comm), path);
}

TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                           const CheckpointRanks& ranks) {
  H5File file = H5File::open_read(path, ranks.world);
  const Architecture stored = stored_architecture(file, path);
  const Architecture& arch = model.arch();
  if (!(stored == arch))
    throw UserError(path + ": the checkpoint holds another architecture (" +
                    architecture_difference(stored, arch) + ", checkpoint vs this run)");
  // A converted model has no optimizer state yet: the moments start at zero.
  const bool moments = optimizer && file.has("/optimizer/exp_avg/embed");
  const std::size_t sections = moments ? 3 : 1;
  for (std::size_t k = 0; k < sections; ++k) {
    for (const auto& [dataset, s] : datasets_of(arch)) {
      const std::string name = in_group(dataset, kSections[k].group);
      if (!file.has(name)) throw UserError(path + ": dataset " + name + " is missing");
      if (file.dataset_shape(name) != s.dataset_shape)
        throw UserError(path + ": dataset " + name + " has another shape than the architecture's");
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
      parts.push_back({&p, stored_as(arch, p.name), 0, p.numel, flat.data() + p.offset});
      share += static_cast<std::uint64_t>(p.numel) * sizeof(float);
    }
    read_parts(file, arch, "/model", parts, ranks.world);
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
            parts.push_back({&p, stored_as(arch, p.name), lo - p.offset, hi - p.offset,
                             values.data() + (lo - begin)});
        }
        read_parts(file, arch, kSections[k].group, parts, ranks.world);
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
