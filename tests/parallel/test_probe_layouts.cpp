// `fastllm probe` under mpiexec in data x tensor x pipeline layouts: logits, loss and every whole
// gradient (gathered on rank 0) within 1e-5 relative of the single-rank result, and within the
// fixture bounds of the float64 transformers reference where the layout computes the same function.
#include <gtest/gtest.h>

#include <cstring>

#include "parallel_support.h"

namespace fastllm::test {
namespace {

struct Case {
  std::string name;
  std::string model_flags;  // which model, how it is loaded
  std::string fixture;      // its reference.safetensors gives the input (and the HF outputs)
  bool moe = false;
  bool hf_reference = false;  // the weights are the fixture's own
  Shape shape;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

// Single-rank probes (cached per model and batch split) in one folder for the whole suite.
class ProbeLayouts : public ::testing::TestWithParam<Case> {
 protected:
  static TempDir& dir() {
    static TempDir d;
    return d;
  }

  // The input_ids of the fixture's reference, sequences [first, first + count).
  static std::string input_part(const std::string& fixture, std::int64_t first,
                                std::int64_t count) {
    const std::string path = (dir() / (fixture + "-in-" + std::to_string(first) + "-" +
                                       std::to_string(count) + ".safetensors"))
                                 .string();
    if (std::filesystem::exists(path)) return path;
    const SafetensorsFile ref =
        SafetensorsFile::open(kFixtureDir + "/" + fixture + "/reference.safetensors");
    const std::vector<std::int64_t> ids = ref.read_i64("input_ids");
    const std::int64_t seq = ref.info("input_ids").shape[1];
    std::vector<std::byte> bytes(static_cast<std::size_t>(count * seq) * 8);
    std::memcpy(bytes.data(), ids.data() + first * seq, bytes.size());
    const SafetensorsTensor t{"input_ids", SafetensorsDtype::I64, {count, seq}, bytes};
    write_safetensors(path, std::span<const SafetensorsTensor>(&t, 1));
    return path;
  }

  static std::map<std::string, std::vector<float>> single(const std::string& key,
                                                          const std::string& model_flags,
                                                          const std::string& input) {
    return single_rank_probe(dir().path(), key, model_flags, input);
  }
};

TEST_P(ProbeLayouts, MatchesOneRank) {
  const Case& c = GetParam();
  const SafetensorsFile ref =
      SafetensorsFile::open(kFixtureDir + "/" + c.fixture + "/reference.safetensors");
  const std::int64_t batch = ref.info("input_ids").shape[0];
  const std::string input = kFixtureDir + "/" + c.fixture + "/reference.safetensors";

  // The single-rank result with the same micro-batches: the load-balancing loss is per micro-batch,
  // so an MoE model under data parallelism is held to the mean of single-rank probes of each data-
  // parallel rank's sequences (equal token counts make the whole loss and gradient that mean too).
  std::map<std::string, std::vector<float>> expected;
  const int groups = c.moe ? c.shape.dp : 1;
  for (int g = 0; g < groups; ++g) {
    const std::int64_t count = batch / groups;
    const auto part =
        single(c.name.substr(0, c.name.rfind('_')) + "-" + std::to_string(g) + "of" +
                   std::to_string(groups),
               c.model_flags, groups == 1 ? input : input_part(c.fixture, g * count, count));
    for (const auto& [name, values] : part) {
      auto& e = expected[name];
      if (name == "logits") {
        e.insert(e.end(), values.begin(), values.end());
        continue;
      }
      e.resize(values.size());
      for (std::size_t i = 0; i < values.size(); ++i)
        e[i] += values[i] / groups;
    }
  }
  ASSERT_FALSE(expected.empty());

  const std::string out = (dir() / (c.name + ".safetensors")).string();
  const CommandResult r = run_mpi(c.shape.ranks(), "probe " + c.model_flags + c.shape.flags() +
                                                       " --input=" + input + " --output=" + out);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  const auto got = read_tensors(out);
  EXPECT_EQ(got.size(), expected.size());
  int grads = 0;
  for (const auto& [name, values] : expected) {
    ASSERT_TRUE(got.count(name)) << name;
    EXPECT_LE(relative_error(got.at(name), values), 1e-5) << name;
    grads += name.rfind("grad.", 0) == 0;
  }
  EXPECT_GT(grads, 10);

  if (!c.hf_reference || (c.moe && c.shape.dp > 1)) return;
  // The same layout against transformers, with the bounds of the single-rank fixture tests.
  for (const TensorInfo& t : ref.tensors()) {
    if (t.name == "input_ids") continue;
    ASSERT_TRUE(got.count(t.name)) << t.name;
    const double bound = t.name == "logits" ? 1e-5 : t.name.rfind("grad.", 0) == 0 ? 1e-4 : 0;
    if (bound > 0) {
      EXPECT_LE(relative_error(got.at(t.name), ref.read_f32(t.name)), bound) << t.name;
    } else {
      EXPECT_LE(std::fabs(got.at(t.name)[0] - ref.read_f32(t.name)[0]), 1e-5) << t.name;
    }
  }
}

std::vector<Case> cases() {
  const std::vector<Shape> all = {{1, 1, 1}, {2, 1, 1}, {1, 2, 1}, {1, 1, 2},
                                  {2, 2, 1}, {1, 2, 2}, {2, 2, 2}, {1, 4, 1}};
  std::vector<Case> out;
  auto add = [&](const std::string& name, const std::string& flags, const std::string& fixture,
                 bool moe, bool hf, const std::vector<Shape>& shapes) {
    for (const Shape& s : shapes)
      out.push_back({name + "_" + s.name(), flags, fixture, moe, hf, s});
  };
  for (const char* f : {"dev-mistral", "dev-mixtral", "dev-tied-nowindow"}) {
    std::string name = f;
    name = name.substr(4);
    name.erase(std::remove(name.begin(), name.end(), '-'), name.end());
    add(name, fixture_model(f), f, std::string(f) == "dev-mixtral", true, all);
  }
  // Global-batch load balancing: the statistics summed over the data-parallel ranks make every
  // layout compute what one rank (and transformers) computes on the whole batch.
  add("mixtralglobal", fixture_model("dev-mixtral") + " --moe_aux_loss_scope=global_batch",
      "dev-mixtral", false, true, {{2, 1, 1}, {2, 2, 1}, {2, 1, 2}, {2, 2, 2}});
  // Sequence parallelism: the same function under tensor-parallel sizes 2 and 4, with pipeline and
  // data parallelism, dense, MoE and tied.
  for (const char* f : {"dev-mistral", "dev-mixtral", "dev-tied-nowindow"}) {
    std::string name = std::string(f).substr(4) + "sp";
    name.erase(std::remove(name.begin(), name.end(), '-'), name.end());
    add(name, fixture_model(f) + " --sequence_parallel=1", f, std::string(f) == "dev-mixtral", true,
        {{1, 2, 1}, {1, 2, 2}, {2, 2, 2}, {1, 4, 1}});
  }
  // A vocabulary that no tensor-parallel size divides: the last rank's slice is shorter, and no
  // padding row is ever predicted. Random weights (seeded, the same under every layout).
  add("oddvocab", fixture_model("dev-mistral") + " --load_pretrained_weights=0 --vocab_size=1001",
      "dev-mistral", false, false, {{1, 2, 1}, {1, 4, 1}, {2, 2, 2}});
  add("oddvocabtied",
      fixture_model("dev-tied-nowindow") + " --load_pretrained_weights=0 --vocab_size=1003",
      "dev-tied-nowindow", false, false, {{1, 1, 2}, {1, 4, 1}, {2, 2, 2}});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, ProbeLayouts, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
