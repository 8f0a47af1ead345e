// The safetensors reader is checked against an independent parser written here (whole-file read,
// byte-by-byte little-endian decoding, ldexp-based float decoding), the writer against byte-level
// checks of the file it produces, and every validation rule against a file that breaks only it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "io/error.h"
#include "io/half.h"
#include "io/safetensors.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = FASTLLM_FIXTURES;

// ---------------------------------------------------------------------------------------------
// Independent parser.

struct RefTensor {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::string bytes;
};

struct RefFile {
  std::map<std::string, RefTensor> tensors;
  std::map<std::string, std::string> metadata;
};

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::uint64_t le_bytes(const std::string& s, std::size_t at, int count) {
  std::uint64_t v = 0;
  for (int i = 0; i < count; ++i)
    v |= static_cast<std::uint64_t>(static_cast<unsigned char>(s[at + i])) << (8 * i);
  return v;
}

RefFile ref_read(const fs::path& path) {
  const std::string content = slurp(path);
  const std::uint64_t n = le_bytes(content, 0, 8);
  const json header = json::parse(content.substr(8, n));
  RefFile out;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      out.metadata = value.get<std::map<std::string, std::string>>();
      continue;
    }
    RefTensor t;
    t.dtype = value["dtype"].get<std::string>();
    t.shape = value["shape"].get<std::vector<std::int64_t>>();
    const auto begin = value["data_offsets"][0].get<std::size_t>();
    const auto end = value["data_offsets"][1].get<std::size_t>();
    t.bytes = content.substr(8 + n + begin, end - begin);
    out.tensors[key] = t;
  }
  return out;
}

// IEEE binary formats decoded arithmetically, independent of the bit tricks in io/half.h.
double decode_binary(std::uint64_t bits, int exponent_bits, int mantissa_bits) {
  const bool negative = (bits >> (exponent_bits + mantissa_bits)) & 1;
  const int exponent = static_cast<int>((bits >> mantissa_bits) & ((1u << exponent_bits) - 1));
  const std::uint64_t mantissa = bits & ((std::uint64_t{1} << mantissa_bits) - 1);
  const int bias = (1 << (exponent_bits - 1)) - 1;
  double magnitude;
  if (exponent == (1 << exponent_bits) - 1)
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  else if (exponent == 0)
    magnitude = std::ldexp(static_cast<double>(mantissa), 1 - bias - mantissa_bits);
  else
    magnitude = std::ldexp(static_cast<double>(mantissa + (std::uint64_t{1} << mantissa_bits)),
                           exponent - bias - mantissa_bits);
  return negative ? -magnitude : magnitude;
}

std::vector<float> ref_floats(const RefTensor& t) {
  std::vector<float> out;
  if (t.dtype == "F32") {
    for (std::size_t i = 0; i < t.bytes.size(); i += 4)
      out.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(le_bytes(t.bytes, i, 4))));
  } else if (t.dtype == "BF16") {
    for (std::size_t i = 0; i < t.bytes.size(); i += 2)
      out.push_back(static_cast<float>(decode_binary(le_bytes(t.bytes, i, 2), 8, 7)));
  } else if (t.dtype == "F16") {
    for (std::size_t i = 0; i < t.bytes.size(); i += 2)
      out.push_back(static_cast<float>(decode_binary(le_bytes(t.bytes, i, 2), 5, 10)));
  } else if (t.dtype == "F64") {
    for (std::size_t i = 0; i < t.bytes.size(); i += 8)
      out.push_back(static_cast<float>(std::bit_cast<double>(le_bytes(t.bytes, i, 8))));
  } else {
    ADD_FAILURE() << "no float decoding for " << t.dtype;
  }
  return out;
}

std::vector<std::int64_t> ref_ints(const RefTensor& t) {
  std::vector<std::int64_t> out;
  const int width = t.dtype == "I64" ? 8 : 4;
  for (std::size_t i = 0; i < t.bytes.size(); i += width) {
    const std::uint64_t v = le_bytes(t.bytes, i, width);
    out.push_back(width == 8 ? static_cast<std::int64_t>(v)
                             : static_cast<std::int32_t>(static_cast<std::uint32_t>(v)));
  }
  return out;
}

std::string bytes_of(std::span<const std::byte> s) {
  return {reinterpret_cast<const char*>(s.data()), s.size()};
}

// Equal bit for bit, NaNs included; reports only the first difference.
void expect_same_floats(const std::vector<float>& actual, const std::vector<float>& expected,
                        const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const bool same =
        std::bit_cast<std::uint32_t>(actual[i]) == std::bit_cast<std::uint32_t>(expected[i]) ||
        (std::isnan(actual[i]) && std::isnan(expected[i]));
    ASSERT_TRUE(same) << what << " element " << i << ": " << actual[i] << " vs " << expected[i];
  }
}

std::vector<fs::path> dev_folders() {
  std::vector<fs::path> out;
  for (const auto& entry : fs::directory_iterator(kFixtures))
    if (entry.is_directory() && entry.path().filename().string().starts_with("dev-"))
      out.push_back(entry.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<fs::path> safetensors_in(const fs::path& folder) {
  std::vector<fs::path> out;
  for (const auto& entry : fs::directory_iterator(folder))
    if (entry.path().extension() == ".safetensors") out.push_back(entry.path());
  std::sort(out.begin(), out.end());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Fixture files.

TEST(SafetensorsFixtures, EveryTensorOfEveryFileMatchesAnIndependentParse) {
  std::map<std::string, int> dtypes_seen;
  int files = 0;
  for (const fs::path& folder : dev_folders()) {
    for (const fs::path& path : safetensors_in(folder)) {
      SCOPED_TRACE(path.string());
      ++files;
      const RefFile ref = ref_read(path);
      const SafetensorsFile file = SafetensorsFile::open(path);
      EXPECT_EQ(file.metadata(), ref.metadata);
      ASSERT_EQ(file.tensors().size(), ref.tensors.size());
      for (const TensorInfo& t : file.tensors())
        ASSERT_TRUE(ref.tensors.contains(t.name));
      for (const auto& [name, expected] : ref.tensors) {
        SCOPED_TRACE(name);
        const TensorInfo* info = file.find(name);
        ASSERT_NE(info, nullptr);
        EXPECT_EQ(safetensors_dtype_name(info->dtype), expected.dtype);
        EXPECT_EQ(info->shape, expected.shape);
        EXPECT_EQ(bytes_of(file.raw(name)), expected.bytes);
        ++dtypes_seen[expected.dtype];
        if (expected.dtype == "I64") {
          EXPECT_EQ(file.read_i64(name), ref_ints(expected));
        } else {
          expect_same_floats(file.read_f32(name), ref_floats(expected), name);
        }
      }
    }
  }
  // The fixture set described in its README: 12 files holding F32, BF16, I64 and F64 tensors.
  EXPECT_EQ(files, 12);
  for (const char* dtype : {"F32", "BF16", "I64", "F64"})
    EXPECT_GT(dtypes_seen[dtype], 0) << dtype;
}

TEST(SafetensorsFixtures, CheckpointFoldersListEveryWeightOnce) {
  // Mistral: embed, final norm, lm_head + 9 per layer; tied drops lm_head; Mixtral: 4 attention
  // projections, 2 norms, a router and 4 experts x 3 matrices per layer.
  const std::map<std::string, std::size_t> expected_count{
      {"dev-mistral", 3 + 2 * 9},
      {"dev-mistral-bf16", 3 + 2 * 9},
      {"dev-tied-nowindow", 2 + 2 * 9},
      {"dev-mixtral", 3 + 2 * (4 + 2 + 1 + 4 * 3)}};
  for (const fs::path& folder : dev_folders()) {
    SCOPED_TRACE(folder.string());
    const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(folder);
    // Where each tensor should be, read independently of the reader.
    std::map<std::string, fs::path> where;
    if (fs::exists(folder / "model.safetensors")) {
      for (const auto& entry : ref_read(folder / "model.safetensors").tensors)
        where[entry.first] = folder / "model.safetensors";
    } else {
      const json index = json::parse(slurp(folder / "model.safetensors.index.json"));
      for (const auto& [name, shard] : index["weight_map"].items())
        where[name] = folder / shard.get<std::string>();
      std::set<fs::path> shards;
      for (const auto& entry : where)
        shards.insert(entry.second);
      EXPECT_EQ(shards.size(), 4u);
    }
    EXPECT_EQ(where.size(), expected_count.at(folder.filename().string()));
    std::vector<std::string> names;
    for (const auto& entry : where)
      names.push_back(entry.first);
    EXPECT_EQ(checkpoint.names(), names);

    std::map<fs::path, RefFile> refs;
    for (const auto& [name, path] : where) {
      SCOPED_TRACE(name);
      if (!refs.contains(path)) refs[path] = ref_read(path);
      const RefTensor& expected = refs[path].tensors.at(name);
      ASSERT_TRUE(checkpoint.has(name));
      EXPECT_EQ(fs::path(checkpoint.file_of(name).path()), path);
      EXPECT_EQ(checkpoint.info(name).shape, expected.shape);
      EXPECT_EQ(safetensors_dtype_name(checkpoint.info(name).dtype), expected.dtype);
      EXPECT_EQ(bytes_of(checkpoint.raw(name)), expected.bytes);
      expect_same_floats(checkpoint.read_f32(name), ref_floats(expected), name);
    }
    EXPECT_FALSE(checkpoint.has("model.layers.99.mlp.up_proj.weight"));
  }
}

// bf16 value nearest to x, ties to the even mantissa, chosen by comparing distances in double.
std::uint16_t nearest_bf16(float x) {
  if (std::isnan(x)) return 0x7FC0;
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t toward_zero = bits & 0xFFFF0000u;
  if (toward_zero == bits) return static_cast<std::uint16_t>(bits >> 16);
  const std::uint32_t away = toward_zero + 0x10000u;
  const double low = std::bit_cast<float>(toward_zero);
  // Past the largest finite bf16 the next step is 2^128, which overflows to infinity.
  const double high = (away & 0x7FFFFFFFu) == 0x7F800000u
                          ? std::copysign(std::ldexp(1.0, 128), x)
                          : static_cast<double>(std::bit_cast<float>(away));
  const double to_low = std::fabs(x - low);
  const double to_high = std::fabs(high - x);
  const bool pick_low = to_low < to_high || (to_low == to_high && ((toward_zero >> 16) & 1) == 0);
  return static_cast<std::uint16_t>((pick_low ? toward_zero : away) >> 16);
}

TEST(SafetensorsFixtures, Bf16CheckpointIsTheF32CheckpointRoundedToNearestEven) {
  const SafetensorsCheckpoint f32 = SafetensorsCheckpoint::open(kFixtures / "dev-mistral");
  const SafetensorsCheckpoint bf16 = SafetensorsCheckpoint::open(kFixtures / "dev-mistral-bf16");
  ASSERT_EQ(f32.names(), bf16.names());
  std::size_t compared = 0;
  for (const std::string& name : f32.names()) {
    SCOPED_TRACE(name);
    ASSERT_EQ(bf16.info(name).dtype, SafetensorsDtype::BF16);
    ASSERT_EQ(f32.info(name).dtype, SafetensorsDtype::F32);
    const std::vector<float> full = f32.read_f32(name);
    const std::vector<float> widened = bf16.read_f32(name);
    ASSERT_EQ(full.size(), widened.size());
    std::vector<float> expected;
    for (float v : full)
      expected.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(nearest_bf16(v)) << 16));
    expect_same_floats(widened, expected, name);
    for (std::size_t i = 0; i < full.size(); ++i)
      ASSERT_EQ(f32_to_bf16(full[i]), nearest_bf16(full[i])) << name << " element " << i;
    compared += full.size();
  }
  EXPECT_GT(compared, 100'000u);
}

// ---------------------------------------------------------------------------------------------
// io/half.h

TEST(HalfFloat, F32ToBf16RoundsToNearestEven) {
  const float max = std::numeric_limits<float>::max();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> cases{0.0f,
                           -0.0f,
                           1.0f,
                           -1.0f,
                           max,
                           -max,
                           inf,
                           -inf,
                           std::numeric_limits<float>::denorm_min(),
                           std::numeric_limits<float>::min(),
                           3.14159265f,
                           1e-40f};
  // Exact ties between two bf16 values, with an even and an odd lower neighbour, and one ulp
  // either side of a tie.
  for (std::uint32_t base : {0x3F800000u, 0x3F810000u, 0x7F7F0000u, 0x00010000u, 0xBF810000u})
    for (std::uint32_t low : {0x8000u, 0x7FFFu, 0x8001u})
      cases.push_back(std::bit_cast<float>(base | low));
  std::mt19937 rng(12345);
  for (int i = 0; i < 200'000; ++i)
    cases.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  for (float v : cases) {
    if (std::isnan(v)) continue;
    ASSERT_EQ(f32_to_bf16(v), nearest_bf16(v)) << std::hex << std::bit_cast<std::uint32_t>(v);
  }
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7F7F8000u)), 0x7F80);  // ties away into inf
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie to even, down
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie to even, up
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7FC0);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0xFF800001u)), 0x7FC0);  // signalling, negative
}

TEST(HalfFloat, Bf16AndF16WidenExactlyForEveryValue) {
  for (std::uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const float bf = bf16_to_f32(h);
    const double bf_expected = decode_binary(bits, 8, 7);
    const float f16 = f16_to_f32(h);
    const double f16_expected = decode_binary(bits, 5, 10);
    if (std::isnan(bf_expected)) {
      // NaN payload and sign survive: the 7 mantissa bits land at the top of float's 23.
      EXPECT_EQ(std::bit_cast<std::uint32_t>(bf), bits << 16);
    } else {
      ASSERT_EQ(static_cast<double>(bf), bf_expected) << bits;
      ASSERT_EQ(std::signbit(bf), std::signbit(bf_expected)) << bits;
    }
    if (std::isnan(f16_expected)) {
      ASSERT_TRUE(std::isnan(f16)) << bits;
      EXPECT_EQ(std::bit_cast<std::uint32_t>(f16) & 0x807FFFFFu,
                ((bits & 0x8000u) << 16) | ((bits & 0x3FFu) << 13));
    } else {
      ASSERT_EQ(static_cast<double>(f16), f16_expected) << bits;
      ASSERT_EQ(std::signbit(f16), std::signbit(f16_expected)) << bits;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Hand-made files.

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("fastllm_io_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  fs::path put(const std::string& name, const std::string& content) const {
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << content;
    return path;
  }

  fs::path dir_;
};

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i)
    s[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}

std::string st_bytes(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// A valid file with one F32 tensor of `elements` zeros named `name`.
std::string one_tensor(const std::string& name, int elements) {
  const std::string header = R"({")" + name + R"(":{"dtype":"F32","shape":[)" +
                             std::to_string(elements) + R"(],"data_offsets":[0,)" +
                             std::to_string(4 * elements) + "]}}";
  return st_bytes(header, std::string(4 * elements, '\0'));
}

template <class F>
void expect_user_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no UserError thrown";
  } catch (const UserError& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    for (const std::string& part : parts)
      EXPECT_NE(message.find(part), std::string::npos)
          << "message: " << message << "\nlacks: " << part;
  }
}

void expect_open_error(const fs::path& path, std::vector<std::string> parts) {
  parts.push_back(path.string() + ": ");
  expect_user_error([&] { SafetensorsFile::open(path); }, parts);
}

using SafetensorsBadFile = TempDir;

TEST_F(SafetensorsBadFile, MissingFile) {
  expect_open_error(dir_ / "none.safetensors", {"cannot open"});
}

TEST_F(SafetensorsBadFile, ShorterThanTheHeaderLength) {
  expect_open_error(put("a.safetensors", "12345"),
                    {"file is 5 bytes, expected at least 8 (the header length)"});
  expect_open_error(put("b.safetensors", ""), {"file is 0 bytes, expected at least 8"});
}

TEST_F(SafetensorsBadFile, HeaderLengthBeyondTheFile) {
  expect_open_error(put("a.safetensors", le64(1000) + "{}        "),
                    {"header length is 1000 bytes, expected at most 10 (the file is 18 bytes)"});
}

TEST_F(SafetensorsBadFile, HeaderLengthOverTheLimit) {
  expect_open_error(put("a.safetensors", le64(100'000'001) + "{}      "),
                    {"header length is 100000001 bytes, expected at most 100000000"});
}

TEST_F(SafetensorsBadFile, HeaderNotJson) {
  expect_open_error(put("a.safetensors", st_bytes(R"({"w": {"dtype": "F32",)", "")),
                    {"header is not valid JSON: ", "parse error"});
}

TEST_F(SafetensorsBadFile, HeaderNotAnObject) {
  expect_open_error(put("a.safetensors", st_bytes("[1, 2]  ", "")),
                    {"header is a JSON array, expected an object"});
}

TEST_F(SafetensorsBadFile, MetadataNotStrings) {
  expect_open_error(put("a.safetensors", st_bytes(R"({"__metadata__":{"format":1}})", "")),
                    {"__metadata__ entry 'format' is 1, expected a string"});
  expect_open_error(put("b.safetensors", st_bytes(R"({"__metadata__":"pt"})", "")),
                    {"__metadata__ is \"pt\", expected an object of strings"});
}

TEST_F(SafetensorsBadFile, TensorEntryMalformed) {
  expect_open_error(put("a.safetensors", st_bytes(R"({"w":[1]})", "")),
                    {"tensor 'w' is [1], expected an object with dtype, shape and data_offsets"});
  expect_open_error(
      put("b.safetensors", st_bytes(R"({"w":{"dtype":"F32","data_offsets":[0,0]}})", "")),
      {"tensor 'w' has no 'shape' field"});
  expect_open_error(
      put("c.safetensors",
          st_bytes(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})", "")),
      {"tensor 'w' has shape [2,-1], expected a list of non-negative integers"});
  expect_open_error(
      put("d.safetensors",
          st_bytes(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", "")),
      {"tensor 'w' has data_offsets [4,0], expected [begin, end] with 0 <= begin <= end"});
  expect_open_error(
      put("e.safetensors", st_bytes(R"({"w":{"dtype":7,"shape":[0],"data_offsets":[0,0]}})", "")),
      {"tensor 'w' has dtype 7, expected a string such as \"F32\""});
}

TEST_F(SafetensorsBadFile, UnknownDtype) {
  expect_open_error(put("a.safetensors",
                        st_bytes(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}})", "xx")),
                    {"tensor 'w' has unknown dtype \"Q4\", expected one of ", "F64", "F32", "F16",
                     "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"});
}

TEST_F(SafetensorsBadFile, ByteSizeNotMatchingShape) {
  expect_open_error(
      put("a.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
                                    std::string(20, '\0'))),
      {"tensor 'w' has data_offsets [0, 20] holding 20 bytes, expected 24 bytes for F32 shape "
       "[2, 3]"});
}

TEST_F(SafetensorsBadFile, OffsetsBeyondTheData) {
  expect_open_error(
      put("a.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                                    std::string(8, '\0'))),
      {"tensor 'w' has data_offsets [0, 16] ending past the data section, which is 8 bytes"});
}

TEST_F(SafetensorsBadFile, OverlappingOffsets) {
  expect_open_error(
      put("a.safetensors", st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                    R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                                    std::string(24, '\0'))),
      {"tensor 'b' data_offsets [8, 24] overlaps tensor 'a' data_offsets [0, 16]"});
}

TEST_F(SafetensorsBadFile, GappedOffsets) {
  expect_open_error(
      put("a.safetensors", st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                    R"("b":{"dtype":"F32","shape":[4],"data_offsets":[20,36]}})",
                                    std::string(36, '\0'))),
      {"4 unused bytes before tensor 'b' data_offsets [20, 36], expected it to start at 16, where "
       "tensor 'a' ends"});
  expect_open_error(
      put("b.safetensors", st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}})",
                                    std::string(20, '\0'))),
      {"4 unused bytes before tensor 'a' data_offsets [4, 20], expected it to start at 0, the "
       "start of the data section"});
}

TEST_F(SafetensorsBadFile, TrailingBytesAfterTheTensors) {
  expect_open_error(
      put("a.safetensors", st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                                    std::string(20, '\0'))),
      {"data section is 20 bytes but its tensors cover 16, expected no trailing bytes"});
}

TEST_F(SafetensorsBadFile, ReadingAsTheWrongType) {
  const fs::path path =
      put("a.safetensors", st_bytes(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
                                    R"("w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                    std::string(16, '\0')));
  const SafetensorsFile file = SafetensorsFile::open(path);
  expect_user_error([&] { file.read_f32("ids"); },
                    {path.string(), "tensor 'ids' has dtype I64, expected F32, BF16, F16 or F64"});
  expect_user_error([&] { file.read_i64("w"); },
                    {path.string(), "tensor 'w' has dtype F32, expected I64 or I32"});
  expect_user_error([&] { file.raw("nope"); },
                    {path.string(), "no tensor 'nope' among its 2 tensors"});
  std::vector<float> small(1);
  expect_user_error([&] { file.read_f32_into("w", small); },
                    {"tensor 'w' has 2 elements (shape [2]), but the destination holds 1"});
}

// ---------------------------------------------------------------------------------------------
// Hand-made valid files.

using SafetensorsGoodFile = TempDir;

TEST_F(SafetensorsGoodFile, DecodesEveryReadableDtypeAtUnalignedOffsets) {
  // A 1-byte tensor first puts every later tensor at an odd offset; the header is not padded.
  std::string data = "\x01";
  const auto append = [&](std::initializer_list<std::uint64_t> values, int width) {
    for (std::uint64_t v : values)
      data += le64(v).substr(0, width);
  };
  append({0x3C00, 0xC000, 0x0001, 0x7C00}, 2);      // F16: 1, -2, 2^-24, inf
  append({0x3F80, 0xC0A0, 0x0001}, 2);              // BF16: 1, -5, 2^-133
  append({std::bit_cast<std::uint32_t>(0.1f)}, 4);  // F32
  append({std::bit_cast<std::uint64_t>(1.0 + std::ldexp(1.0, -30)),
          std::bit_cast<std::uint64_t>(1.0 + std::ldexp(1.0, -24) + std::ldexp(1.0, -40))},
         8);                         // F64
  append({0xFFFFFFFFu, 7}, 4);       // I32: -1, 7
  append({0x8000000000000000u}, 8);  // I64: min
  const std::string header = R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                             R"("h":{"dtype":"F16","shape":[2,2],"data_offsets":[1,9]},)"
                             R"("bf":{"dtype":"BF16","shape":[3],"data_offsets":[9,15]},)"
                             R"("f":{"dtype":"F32","shape":[],"data_offsets":[15,19]},)"
                             R"("d":{"dtype":"F64","shape":[2],"data_offsets":[19,35]},)"
                             R"("i":{"dtype":"I32","shape":[2],"data_offsets":[35,43]},)"
                             R"("l":{"dtype":"I64","shape":[1],"data_offsets":[43,51]},)"
                             R"("z":{"dtype":"F32","shape":[3,0],"data_offsets":[51,51]},)"
                             R"("__metadata__":{"format":"pt"}})";
  const SafetensorsFile file = SafetensorsFile::open(put("a.safetensors", st_bytes(header, data)));
  const float inf = std::numeric_limits<float>::infinity();
  expect_same_floats(file.read_f32("h"), {1.0f, -2.0f, std::ldexp(1.0f, -24), inf}, "h");
  expect_same_floats(file.read_f32("bf"), {1.0f, -5.0f, std::ldexp(1.0f, -133)}, "bf");
  expect_same_floats(file.read_f32("f"), {0.1f}, "f");
  expect_same_floats(file.read_f32("d"), {1.0f, 1.0f + std::ldexp(1.0f, -23)}, "d");
  EXPECT_EQ(file.read_i64("i"), (std::vector<std::int64_t>{-1, 7}));
  EXPECT_EQ(file.read_i64("l"),
            (std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::min()}));
  EXPECT_TRUE(file.read_f32("z").empty());
  EXPECT_EQ(file.info("f").numel(), 1);
  EXPECT_TRUE(file.info("f").shape.empty());
  EXPECT_EQ(file.info("z").numel(), 0);
  EXPECT_EQ(file.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  std::vector<std::string> order;
  for (const TensorInfo& t : file.tensors())
    order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"b", "h", "bf", "f", "d", "i", "l", "z"}));
}

TEST_F(SafetensorsGoodFile, EmptyHeaderAndNoTensors) {
  const SafetensorsFile file = SafetensorsFile::open(put("a.safetensors", st_bytes("{}", "")));
  EXPECT_TRUE(file.tensors().empty());
  EXPECT_EQ(file.find("w"), nullptr);
}

// ---------------------------------------------------------------------------------------------
// Checkpoint folders.

using SafetensorsFolder = TempDir;

TEST_F(SafetensorsFolder, IndexNamingAMissingShard) {
  put("s1.safetensors", one_tensor("a", 2));
  const fs::path index = put("model.safetensors.index.json",
                             R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})");
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_); },
                    {index.string(),
                     "weight_map entry 'b' names shard 's2.safetensors', which is "
                     "missing: " +
                         (dir_ / "s2.safetensors").string() + " does not exist"});
}

TEST_F(SafetensorsFolder, TensorInNoFile) {
  put("s1.safetensors", one_tensor("a", 2));
  put("s2.safetensors", one_tensor("b", 3));
  const fs::path index =
      put("model.safetensors.index.json",
          R"({"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})");
  const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(dir_);
  EXPECT_EQ(checkpoint.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(checkpoint.info("b").shape, (std::vector<std::int64_t>{3}));
  expect_user_error(
      [&] { checkpoint.read_f32("c"); },
      {dir_.string(), "no tensor 'c' in any file (" + index.string() + " lists 2 tensors)"});
  expect_user_error([&] { checkpoint.info("c"); }, {"no tensor 'c' in any file"});
}

TEST_F(SafetensorsFolder, IndexNamingATensorItsShardLacks) {
  const fs::path shard = put("s1.safetensors", one_tensor("a", 2));
  const fs::path index = put("model.safetensors.index.json",
                             R"({"weight_map":{"a":"s1.safetensors","x":"s1.safetensors"}})");
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_); },
                    {index.string(), "weight_map entry 'x' names shard 's1.safetensors', but " +
                                         shard.string() + " has no such tensor"});
}

TEST_F(SafetensorsFolder, MalformedIndex) {
  const fs::path index = put("model.safetensors.index.json", R"({"metadata":{}})");
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_); },
                    {index.string(), "has no 'weight_map' object"});
  put("model.safetensors.index.json", R"({"weight_map":{"a":"../s1.safetensors"}})");
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_); },
                    {"names shard '../s1.safetensors', expected a file name in the same folder"});
  put("model.safetensors.index.json", R"({"weight_map":)");
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_); }, {index.string(), "not valid JSON"});
}

TEST_F(SafetensorsFolder, FolderWithoutCheckpoint) {
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_); },
                    {dir_.string(), "no model.safetensors and no model.safetensors.index.json"});
  expect_user_error([&] { SafetensorsCheckpoint::open(dir_ / "nothing"); },
                    {(dir_ / "nothing").string(), "not found"});
}

TEST_F(SafetensorsFolder, SingleFileWinsOverIndexAndAFilePathWorks) {
  const fs::path single = put("model.safetensors", one_tensor("w", 4));
  put("model.safetensors.index.json", R"({"weight_map":{"v":"missing.safetensors"}})");
  EXPECT_EQ(SafetensorsCheckpoint::open(dir_).names(), (std::vector<std::string>{"w"}));
  const fs::path other = put("other.safetensors", one_tensor("u", 1));
  EXPECT_EQ(SafetensorsCheckpoint::open(other).names(), (std::vector<std::string>{"u"}));
}

// ---------------------------------------------------------------------------------------------
// SafetensorsWriter.

using SafetensorsWriter = TempDir;

std::vector<std::byte> random_bytes(std::mt19937& rng, std::size_t n) {
  std::vector<std::byte> out(n);
  for (std::byte& b : out)
    b = static_cast<std::byte>(rng() & 0xFF);
  return out;
}

TEST_F(SafetensorsWriter, RoundTripsBytesWithASortedPaddedHeader) {
  std::mt19937 rng(7);
  struct Spec {
    std::string name;
    SafetensorsDtype dtype;
    std::vector<std::int64_t> shape;
    std::size_t bytes;
  };
  // Given out of order, with upper case, a scalar and an empty tensor.
  const std::vector<Spec> specs{
      {"model.norm.weight", SafetensorsDtype::F32, {2, 3}, 24},
      {"Alpha", SafetensorsDtype::BF16, {5}, 10},
      {"half", SafetensorsDtype::F16, {3, 1}, 6},
      {"ids", SafetensorsDtype::I64, {2, 2}, 32},
      {"counts", SafetensorsDtype::I32, {7}, 28},
      {"loss", SafetensorsDtype::F64, {1}, 8},
      {"scalar", SafetensorsDtype::F32, {}, 4},
      {"empty", SafetensorsDtype::F32, {0, 4}, 0},
  };
  std::map<std::string, std::vector<std::byte>> data;
  std::vector<SafetensorsTensor> tensors;
  for (const Spec& s : specs)
    data[s.name] = random_bytes(rng, s.bytes);
  for (const Spec& s : specs)
    tensors.push_back({s.name, s.dtype, s.shape, data[s.name]});
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"note", "a \"b\"\n"}};
  const fs::path path = dir_ / "out.safetensors";
  write_safetensors(path, tensors, metadata);
  EXPECT_FALSE(fs::exists(dir_ / "out.safetensors.tmp"));

  // Byte-level layout, checked without the reader.
  const std::string content = slurp(path);
  const std::uint64_t n = le_bytes(content, 0, 8);
  EXPECT_EQ(n % 8, 0u);
  const std::string header = content.substr(8, n);
  const std::size_t json_end = header.find_last_not_of(' ') + 1;
  EXPECT_LT(n - json_end, 8u);
  EXPECT_EQ(header[json_end - 1], '}');
  const json parsed = json::parse(header);
  EXPECT_EQ(parsed["__metadata__"], json(metadata));
  std::size_t previous_key = 0;
  std::uint64_t offset = 0;
  for (const auto& [name, bytes] : data) {  // std::map: sorted by name, as the header must be
    SCOPED_TRACE(name);
    const std::size_t key = header.find("\"" + name + "\":");
    ASSERT_NE(key, std::string::npos);
    EXPECT_GT(key, previous_key);
    previous_key = key;
    const json& entry = parsed[name];
    const json expected_offsets = json::array({offset, offset + bytes.size()});
    EXPECT_EQ(entry["data_offsets"], expected_offsets);
    EXPECT_EQ(content.substr(8 + n + offset, bytes.size()),
              std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    offset += bytes.size();
  }
  EXPECT_EQ(content.size(), 8 + n + offset);

  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.metadata(), metadata);
  ASSERT_EQ(file.tensors().size(), specs.size());
  for (const Spec& s : specs) {
    SCOPED_TRACE(s.name);
    const TensorInfo& info = file.info(s.name);
    EXPECT_EQ(info.dtype, s.dtype);
    EXPECT_EQ(info.shape, s.shape);
    EXPECT_EQ(parsed[s.name]["dtype"], safetensors_dtype_name(s.dtype));
    const std::span<const std::byte> raw = file.raw(s.name);
    EXPECT_TRUE(std::equal(raw.begin(), raw.end(), data[s.name].begin(), data[s.name].end()));
  }
}

TEST_F(SafetensorsWriter, NoTensorsMakesAPaddedEmptyHeader) {
  const fs::path path = dir_ / "empty.safetensors";
  write_safetensors(path, {});
  EXPECT_EQ(slurp(path), le64(8) + "{}      ");
}

TEST_F(SafetensorsWriter, ReplacesAnExistingFile) {
  const fs::path path = put("w.safetensors", "old contents that are not safetensors");
  const std::vector<float> values{1.5f, -2.0f};
  const SafetensorsTensor t{"w", SafetensorsDtype::F32, {2}, std::as_bytes(std::span(values))};
  write_safetensors(path, std::span(&t, 1));
  expect_same_floats(SafetensorsFile::open(path).read_f32("w"), values, "w");
}

TEST_F(SafetensorsWriter, ErrorsLeaveNoFile) {
  const fs::path path = dir_ / "bad.safetensors";
  const std::vector<std::byte> bytes(12);
  const SafetensorsTensor wrong_size{"w", SafetensorsDtype::F32, {2, 2}, bytes};
  expect_user_error([&] { write_safetensors(path, std::span(&wrong_size, 1)); },
                    {path.string(),
                     "tensor 'w' has 12 bytes of data, expected 16 for F32 shape "
                     "[2, 2]"});
  const SafetensorsTensor twice[] = {{"w", SafetensorsDtype::I32, {3}, bytes},
                                     {"w", SafetensorsDtype::I32, {3}, bytes}};
  expect_user_error([&] { write_safetensors(path, twice); }, {"tensor 'w' is given twice"});
  const SafetensorsTensor reserved{"__metadata__", SafetensorsDtype::I32, {3}, bytes};
  expect_user_error([&] { write_safetensors(path, std::span(&reserved, 1)); },
                    {"tensor '__metadata__' has a reserved name"});
  const SafetensorsTensor fine{"w", SafetensorsDtype::I32, {3}, bytes};
  const fs::path nowhere = dir_ / "missing-folder" / "x.safetensors";
  expect_user_error([&] { write_safetensors(nowhere, std::span(&fine, 1)); },
                    {nowhere.string() + ".tmp: cannot create"});
  EXPECT_TRUE(fs::is_empty(dir_));
}

}  // namespace
}  // namespace fastllm
