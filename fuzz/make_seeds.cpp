// Writes the seed corpus of every fuzz target from the Hugging Face fixtures and the repository's
// job configs, with fastllm's own writers, so that no corpus is committed:
//   fuzz_make_seeds FIXTURES SOURCE_DIR OUT  ->  OUT/<target>/<seed>
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "io/hdf5_file.h"
#include "io/indexed_dataset.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;
using namespace fastllm;

namespace {

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// The fixture's tensors with every dimension cut to at most 2 and zero data: the real names,
// dtypes and ranks in a seed of a few kilobytes.
void shrunk_safetensors(const fs::path& from, const fs::path& to) {
  const SafetensorsFile file = SafetensorsFile::open(from);
  std::vector<std::vector<std::int64_t>> shapes;
  std::vector<std::vector<std::byte>> data;
  for (const TensorInfo& t : file.tensors()) {
    std::vector<std::int64_t> shape = t.shape;
    std::int64_t n = 1;
    for (std::int64_t& d : shape) {
      d = std::min<std::int64_t>(d, 2);
      n *= d;
    }
    shapes.push_back(shape);
    data.emplace_back(static_cast<std::size_t>(n) * safetensors_dtype_size(t.dtype));
  }
  std::vector<SafetensorsTensor> tensors;
  for (std::size_t i = 0; i < file.tensors().size(); ++i)
    tensors.push_back({file.tensors()[i].name, file.tensors()[i].dtype, shapes[i], data[i]});
  write_safetensors(to, tensors, file.metadata());
}

// [uint32 idx size][.idx][.bin], the indexed-dataset target's input, from token rows.
void dataset_seed(const std::vector<std::vector<std::int32_t>>& rows, TokenDtype dtype,
                  const fs::path& scratch, const fs::path& to) {
  const std::string prefix = (scratch / "seed").string();
  {
    IndexedDatasetWriter writer(prefix, dtype);
    for (const auto& row : rows)
      writer.add_document(row);
    writer.finalize();
  }
  const std::string idx = read_bytes(prefix + ".idx"), bin = read_bytes(prefix + ".bin");
  const auto n = static_cast<std::uint32_t>(idx.size());
  std::string seed(4, '\0');
  std::memcpy(seed.data(), &n, 4);
  write_bytes(to, seed + idx + bin);
}

// A checkpoint as fastllm lays it out, at toy size, with the fixture's config as architecture.
void hdf5_seed(const std::string& architecture, const fs::path& to) {
  H5File file = H5File::create(to.string(), MPI_COMM_SELF);
  file.set_attr_int("/", "format_version", 1);
  file.set_attr_string("/", "architecture", architecture);
  file.set_attr_string("/", "config", R"({"lr":"3e-4","seed":"1234"})");
  file.set_attr_int("/", "iteration", 3);
  file.set_attr_int("/", "consumed_samples", 24);
  file.set_attr_int("/", "seed", 1234);
  file.set_attr_int("/", "optimizer_steps", 3);
  const std::vector<float> values(2 * 8 * 4, 0.5f);
  for (const char* name : {"/model/embed", "/optimizer/exp_avg/model/embed"}) {
    file.define_dataset(name, H5DType::F32, {8, 4});
    file.write_slab(name, H5DType::F32, {0, 0}, {8, 4}, values.data());
  }
  file.define_dataset("/model/layers/q", H5DType::BF16, {2, 4, 4});
  file.write_slab("/model/layers/q", H5DType::BF16, {0, 0, 0}, {2, 4, 4}, values.data());
  file.commit();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: fuzz_make_seeds FIXTURES SOURCE_DIR OUT\n";
    return 2;
  }
  MPI_Init(&argc, &argv);
  const fs::path fixtures = argv[1], source = argv[2], out = argv[3];
  for (const char* target : {"safetensors", "safetensors_index", "hf_config", "indexed_dataset",
                             "hdf5_metadata", "yaml_config", "flags"})
    fs::create_directories(out / target);
  int seeds = 0;
  for (const auto& entry : fs::recursive_directory_iterator(fixtures)) {
    const fs::path& p = entry.path();
    const std::string stem = p.parent_path().filename().string() + "-" + p.stem().string();
    if (p.extension() == ".safetensors") {
      shrunk_safetensors(p, out / "safetensors" / stem);
      ++seeds;
      if (p.filename() == "reference.safetensors") {
        const SafetensorsFile file = SafetensorsFile::open(p);
        const TensorInfo& ids = file.info("input_ids");
        const std::vector<std::int64_t> tokens = file.read_i64("input_ids");
        const std::int64_t cols = ids.shape.back();
        std::vector<std::vector<std::int32_t>> rows;
        for (std::size_t i = 0; i < tokens.size(); i += static_cast<std::size_t>(cols))
          rows.emplace_back(tokens.begin() + static_cast<std::ptrdiff_t>(i),
                            tokens.begin() + static_cast<std::ptrdiff_t>(i) + cols);
        dataset_seed(rows, TokenDtype::kUint16, out, out / "indexed_dataset" / (stem + "-u16"));
        dataset_seed(rows, TokenDtype::kInt32, out, out / "indexed_dataset" / (stem + "-i32"));
        seeds += 2;
      }
    } else if (p.filename() == "model.safetensors.index.json") {
      fs::copy_file(p, out / "safetensors_index" / stem, fs::copy_options::overwrite_existing);
      ++seeds;
    } else if (p.extension() == ".json" && p.filename() != "reference.json") {
      fs::copy_file(p, out / "hf_config" / stem, fs::copy_options::overwrite_existing);
      hdf5_seed(read_bytes(p), out / "hdf5_metadata" / (stem + ".h5"));
      seeds += 2;
    }
  }
  // The index target's own two shards (see fuzz_safetensors_index.cpp).
  write_bytes(out / "safetensors_index" / "matching",
              R"({"metadata": {"total_size": 56}, "weight_map": {)"
              R"("model.embed_tokens.weight": "model-00001-of-00002.safetensors", )"
              R"("model.norm.weight": "model-00001-of-00002.safetensors", )"
              R"("lm_head.weight": "model-00002-of-00002.safetensors"}})");
  for (const auto& entry : fs::directory_iterator(source / "jobs")) {
    if (entry.path().extension() == ".yaml") {
      fs::copy_file(entry.path(), out / "yaml_config" / entry.path().filename(),
                    fs::copy_options::overwrite_existing);
      ++seeds;
    }
  }
  write_bytes(out / "yaml_config" / "lists",
              "lr: 3e-4\nnum_layers: 2\ndata_path: [0.7, data/a, 0.3, data/b]\nsplit: 98,2,0\n"
              "tie_word_embeddings: true\nbackend: host\n");
  write_bytes(out / "flags" / "mistral",
              "--num_layers=32\n--hidden_size=4096\n--vocab_size=32000\n--num_attention_heads=32\n"
              "--head_groups=8\n--ffn_hidden_size=14336\n--kv_channels=128\n"
              "--rotary_embedding_scale=-9.210340371976184\n--activation_type=silu\n"
              "--tie_word_embeddings=0\n--num_experts=8\n--num_experts_per_token=2");
  write_bytes(out / "flags" / "train",
              "--data_path\n0.7\ndata/a\n0.3\ndata/b\n--lr\n3e-5\n--adam_beta2=0.95\n"
              "--zero_stage=1\n--tensor_parallel=4\n--data_shuffle\n--split=98,2,0");
  seeds += 4;
  std::cout << "fuzz_make_seeds: " << seeds << " seeds in " << out.string() << "\n";
  MPI_Finalize();
  return 0;
}
