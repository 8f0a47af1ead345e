#include "train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <regex>

#include "io/error.h"
#include "io/hdf5_file.h"
#include "model/stored_layout.h"

namespace fastllm {
namespace {

constexpr std::int64_t kFormatVersion = 1;

// The three flat F32 tensors a checkpoint stores, under their group.
struct Section {
  const char* group;  // dataset names are StoredAs::dataset with "/model" replaced by this
  Tensor flat;
};

std::string in_group(const std::string& dataset, const std::string& group) {
  return group + dataset.substr(std::string("/model").size());
}

// Hugging Face [rows, cols] <-> stored [cols, rows].
std::vector<float> transpose(const std::vector<float>& in, std::int64_t rows, std::int64_t cols) {
  std::vector<float> out(in.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
  }
  return out;
}

// The hyperslab of one parameter inside its dataset.
void slab_of(const StoredAs& s, const Parameter& p, std::vector<std::int64_t>& offset,
             std::vector<std::int64_t>& count) {
  offset = s.index;
  count.assign(s.index.size(), 1);
  std::vector<std::int64_t> shape = p.shape;
  if (s.transposed) std::swap(shape[0], shape[1]);
  for (auto d : shape) {
    offset.push_back(0);
    count.push_back(d);
  }
}

std::vector<Section> sections(Model& model, const AdamW* optimizer) {
  std::vector<Section> out{{"/model", optimizer ? optimizer->master() : model.flat_weights()}};
  if (optimizer) {
    out.push_back({"/optimizer/exp_avg", optimizer->exp_avg()});
    out.push_back({"/optimizer/exp_avg_sq", optimizer->exp_avg_sq()});
  }
  return out;
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
  for (auto& [iteration, path] : found) out.push_back(path);
  return out;
}

void save_checkpoint(const std::string& path, Model& model, const AdamW* optimizer,
                     const TrainState& state, MPI_Comm comm) {
  const Architecture& arch = model.arch();
  H5File file = H5File::create(path, comm);
  const std::vector<Section> parts = sections(model, optimizer);
  for (const Section& section : parts) {
    std::vector<std::string> defined;
    for (const Parameter& p : model.parameters()) {
      const StoredAs s = stored_as(arch, p.name);
      const std::string name = in_group(s.dataset, section.group);
      if (std::find(defined.begin(), defined.end(), name) != defined.end()) continue;
      file.define_dataset(name, H5DType::F32, s.dataset_shape);
      defined.push_back(name);
    }
  }
  Backend& backend = model.backend();
  std::vector<float> values;
  std::vector<std::int64_t> offset, count;
  for (const Section& section : parts) {
    for (const Parameter& p : model.parameters()) {
      const StoredAs s = stored_as(arch, p.name);
      if (section.flat.dtype == DType::F32) {
        values.resize(static_cast<std::size_t>(p.numel));
        backend.copy_to_host(values.data(), section.flat.rows(p.offset, p.numel));
      } else {
        values = model.read_weight(p);
      }
      if (s.transposed) values = transpose(values, p.shape[0], p.shape[1]);
      slab_of(s, p, offset, count);
      file.write_slab(in_group(s.dataset, section.group), H5DType::F32, offset, count,
                      values.data());
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

Architecture checkpoint_architecture(const std::string& path, MPI_Comm comm) {
  H5File file = H5File::open_read(path, comm);
  if (!file.has_attr("/", "format_version") || !file.has_attr("/", "architecture"))
    throw UserError(path + ": not a fastllm checkpoint (no format_version or architecture)");
  const std::int64_t version = file.attr_int("/", "format_version");
  if (version != kFormatVersion)
    throw UserError(path + ": checkpoint format version " + std::to_string(version) +
                    ", this fastllm reads version " + std::to_string(kFormatVersion));
  return architecture_from_json(file.attr_string("/", "architecture"), path);
}

TrainState load_checkpoint(const std::string& path, Model& model, AdamW* optimizer,
                           MPI_Comm comm) {
  const Architecture stored = checkpoint_architecture(path, comm);
  const Architecture& arch = model.arch();
  if (!(stored == arch))
    throw UserError(path + ": the checkpoint holds another architecture (" +
                    architecture_difference(stored, arch) + ", checkpoint vs this run)");
  H5File file = H5File::open_read(path, comm);
  std::vector<Section> parts = sections(model, optimizer);
  // A converted model has no optimizer state yet: the moments start at zero.
  if (optimizer && !file.has("/optimizer/exp_avg/embed")) parts.resize(1);
  Backend& backend = model.backend();
  std::vector<float> values;
  std::vector<std::int64_t> offset, count;
  for (const Section& section : parts) {
    for (const Parameter& p : model.parameters()) {
      const StoredAs s = stored_as(arch, p.name);
      const std::string name = in_group(s.dataset, section.group);
      if (file.dataset_shape(name) != s.dataset_shape)
        throw UserError(path + ": dataset " + name + " has another shape than the architecture's");
      slab_of(s, p, offset, count);
      values.resize(static_cast<std::size_t>(p.numel));
      file.read_slab(name, H5DType::F32, offset, count, values.data());
      if (s.transposed) values = transpose(values, p.shape[1], p.shape[0]);
      if (section.flat.dtype == DType::F32) {
        backend.copy_from_host(section.flat.rows(p.offset, p.numel), values.data());
      } else {
        model.write_weight(p, values.data());
      }
    }
  }
  if (optimizer) {
    optimizer->set_steps(parts.size() > 1 ? file.attr_int("/", "optimizer_steps") : 0);
    optimizer->master_to_model();
  }
  TrainState state;
  state.iteration = file.attr_int("/", "iteration");
  state.consumed_samples = file.attr_int("/", "consumed_samples");
  state.seed = static_cast<std::uint64_t>(file.attr_int("/", "seed"));
  state.config_json = file.attr_string("/", "config");
  return state;
}

}  // namespace fastllm
