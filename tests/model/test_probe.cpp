// The whole model against Hugging Face transformers: `fastllm probe` on every fixture checkpoint,
// compared with the float64 reference outputs transformers computed for it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "io/safetensors.h"
#include "support/numeric.h"
#include "support/process.h"

namespace fastllm::test {
namespace {

const std::string kFixtures = FASTLLM_FIXTURES;

struct Bounds {
  double logits, loss, grads;
};

// Runs probe on `model` with the reference's input_ids and compares every output.
void check_probe(const std::string& model, const std::string& reference_folder, Bounds bounds) {
  TempDir dir;
  const std::string reference = kFixtures + "/" + reference_folder + "/reference.safetensors";
  const std::string out = (dir / "out.safetensors").string();
  CommandResult r = run_fastllm(
      "probe --pretrained_checkpoint_type=huggingface "
      "--pretrained_checkpoint_path=" +
      kFixtures + "/" + model + " --input=" + reference + " --output=" + out);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const SafetensorsFile got = SafetensorsFile::open(out);
  const SafetensorsFile ref = SafetensorsFile::open(reference);

  EXPECT_LE(relative_error(got.read_f32("logits"), ref.read_f32("logits")), bounds.logits);
  const double loss = got.read_f32("loss")[0], ref_loss = ref.read_f32("loss")[0];
  EXPECT_LE(std::fabs(loss - ref_loss), bounds.loss) << loss << " vs " << ref_loss;
  if (ref.find("aux_loss")) {
    EXPECT_LE(std::fabs(got.read_f32("aux_loss")[0] - ref.read_f32("aux_loss")[0]), bounds.loss);
  } else {
    EXPECT_EQ(got.find("aux_loss"), nullptr);
  }
  int grads = 0;
  for (const TensorInfo& t : ref.tensors()) {
    if (t.name.rfind("grad.", 0) != 0) continue;
    ++grads;
    ASSERT_NE(got.find(t.name), nullptr) << t.name;
    EXPECT_EQ(got.info(t.name).shape, t.shape) << t.name;
    EXPECT_LE(relative_error(got.read_f32(t.name), ref.read_f32(t.name)), bounds.grads) << t.name;
  }
  // Every gradient probe wrote is one the reference has.
  int written = 0;
  for (const TensorInfo& t : got.tensors())
    written += t.name.rfind("grad.", 0) == 0;
  EXPECT_EQ(written, grads);
  EXPECT_GT(grads, 0);
}

const Bounds kFloat32{1e-5, 1e-5, 1e-4};

TEST(ProbeFixtures, MistralShardedWithWindow) {
  check_probe("dev-mistral", "dev-mistral", kFloat32);
}
TEST(ProbeFixtures, MixtralWithLoadBalancingLoss) {
  check_probe("dev-mixtral", "dev-mixtral", kFloat32);
}
TEST(ProbeFixtures, TiedWithoutWindow) {
  check_probe("dev-tied-nowindow", "dev-tied-nowindow", kFloat32);
}
// The same weights stored in bf16 against the float64 reference of the float32 weights: the
// weights themselves differ by bf16 rounding (relative 2^-9), hence the wider bounds.
TEST(ProbeFixtures, MistralBf16Checkpoint) {
  check_probe("dev-mistral-bf16", "dev-mistral", Bounds{2e-2, 2e-3, 5e-2});
}

// A probe input holding one tensor.
std::string write_input(const TempDir& dir, const std::string& name, SafetensorsDtype dtype,
                        std::vector<std::int64_t> shape, const std::vector<std::int64_t>& values) {
  const std::string path = (dir / "in.safetensors").string();
  std::vector<std::byte> bytes;
  if (dtype == SafetensorsDtype::I64) {
    bytes.resize(values.size() * 8);
    std::memcpy(bytes.data(), values.data(), bytes.size());
  } else {
    std::vector<float> f(values.begin(), values.end());
    bytes.resize(f.size() * 4);
    std::memcpy(bytes.data(), f.data(), bytes.size());
  }
  SafetensorsTensor t{name, dtype, std::move(shape), bytes};
  write_safetensors(path, std::span<const SafetensorsTensor>(&t, 1));
  return path;
}

struct BadProbe {
  std::string name;
  std::string tensor;
  SafetensorsDtype dtype;
  std::vector<std::int64_t> shape;
  std::int64_t fill;
  std::string message;
};

class ProbeBadInput : public ::testing::TestWithParam<BadProbe> {};

TEST_P(ProbeBadInput, ClearErrorNoOutput) {
  const BadProbe& c = GetParam();
  TempDir dir;
  std::int64_t n = 1;
  for (auto d : c.shape)
    n *= d;
  std::vector<std::int64_t> values(static_cast<std::size_t>(n), 5);
  values.back() = c.fill;
  const std::string in = write_input(dir, c.tensor, c.dtype, c.shape, values);
  const auto out = dir / "out.safetensors";
  CommandResult r = run_fastllm("probe --pretrained_checkpoint_path=" + kFixtures +
                                "/dev-mistral --input=" + in + " --output=" + out.string());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find(c.message), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_FALSE(std::filesystem::exists(out.string() + ".tmp"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ProbeBadInput,
    ::testing::Values(
        BadProbe{"OutOfVocabulary",
                 "input_ids",
                 SafetensorsDtype::I64,
                 {2, 8},
                 1000,
                 "input_ids[1, 7] = 1000 is outside the vocabulary [0, 1000)"},
        BadProbe{"Negative",
                 "input_ids",
                 SafetensorsDtype::I64,
                 {2, 8},
                 -1,
                 "input_ids[1, 7] = -1 is outside the vocabulary"},
        BadProbe{"WrongRank",
                 "input_ids",
                 SafetensorsDtype::I64,
                 {16},
                 5,
                 "input_ids has 1 dimensions, expected 2"},
        BadProbe{"WrongDtype",
                 "input_ids",
                 SafetensorsDtype::F32,
                 {2, 8},
                 5,
                 "input_ids has dtype F32, expected I64"},
        BadProbe{"TooLong",
                 "input_ids",
                 SafetensorsDtype::I64,
                 {1, 513},
                 5,
                 "longer than the model's 512"},
        BadProbe{
            "Missing", "tokens", SafetensorsDtype::I64, {2, 8}, 5, "no tensor named input_ids"}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
