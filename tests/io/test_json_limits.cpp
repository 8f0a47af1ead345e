// Hostile JSON in the three JSON readers (config.json, a safetensors header, the shard index):
// nesting 100,000 levels deep used to overflow the stack (SIGSEGV) where the error message printed
// the value; now each is a UserError naming the file, and what a message quotes stays short.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "io/error.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "support/process.h"

namespace fastllm {
namespace {

constexpr int kDeep = 100'000;

std::string nested_arrays(int depth) {
  return std::string(depth, '[') + std::string(depth, ']');
}

std::string nested_objects(int depth) {
  std::string out;
  for (int i = 0; i < depth; ++i)
    out += "{\"a\":";
  out += "1";
  return out + std::string(depth, '}');
}

void write(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A safetensors file whose header is `header` and which has no data.
void write_safetensors_header(const std::filesystem::path& path, const std::string& header) {
  const std::uint64_t n = header.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  write(path, bytes + header);
}

// Runs f, which must throw a UserError; returns its message.
template <class F>
std::string user_error(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no UserError";
  return "";
}

void expect_message(const std::string& message, const std::string& file, const std::string& what) {
  EXPECT_NE(message.find(file), std::string::npos) << message;
  EXPECT_NE(message.find(what), std::string::npos) << message;
  EXPECT_LT(message.size(), 600u) << message.substr(0, 600);
}

const std::string kConfig =
    R"({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 160)";

TEST(JsonLimits, ConfigNestedDeepInAValue) {
  test::TempDir dir;
  for (const std::string& deep : {nested_arrays(kDeep), nested_objects(kDeep)}) {
    write(dir / "config.json", kConfig + R"(, "hidden_act": )" + deep + "}");
    expect_message(user_error([&] { read_hf_config(dir.path().string()); }),
                   (dir / "config.json").string(), "nested deeper than 64 levels");
  }
}

TEST(JsonLimits, ConfigJustInsideTheBoundStillReadsAndQuotesShortly) {
  test::TempDir dir;
  // 60 levels is within the bound: the wrong type is reported, quoted in at most 80 characters.
  write(dir / "config.json", kConfig + R"(, "hidden_act": )" + nested_arrays(60) + "}");
  const std::string message = user_error([&] { read_hf_config(dir.path().string()); });
  expect_message(message, "'hidden_act'", "expected a string");
  EXPECT_NE(message.find("[[[[[[[[[["), std::string::npos) << message;
}

TEST(JsonLimits, ConfigLongValueIsQuotedShortly) {
  test::TempDir dir;
  write(dir / "config.json",
        kConfig + R"(, "hidden_act": ")" + std::string(1'000'000, 'x') + "\"}");
  expect_message(user_error([&] { read_hf_config(dir.path().string()); }), "'hidden_act'",
                 "is not supported");
}

TEST(JsonLimits, SafetensorsHeaderNestedDeep) {
  test::TempDir dir;
  const auto path = dir / "model.safetensors";
  for (const std::string& deep : {nested_arrays(kDeep), nested_objects(kDeep)}) {
    write_safetensors_header(
        path, R"({"t": {"dtype": "F32", "shape": )" + deep + R"(, "data_offsets": [0, 0]}})");
    expect_message(user_error([&] { SafetensorsFile::open(path); }), path.string(),
                   "header nests deeper than 64 levels");
    write_safetensors_header(path, R"({"__metadata__": )" + deep + "}");
    expect_message(user_error([&] { SafetensorsFile::open(path); }), path.string(),
                   "header nests deeper than 64 levels");
  }
}

TEST(JsonLimits, SafetensorsIndexNestedDeep) {
  test::TempDir dir;
  const auto index = dir / "model.safetensors.index.json";
  for (const std::string& deep : {nested_arrays(kDeep), nested_objects(kDeep)}) {
    write(index, R"({"weight_map": {"t": )" + deep + "}}");
    expect_message(user_error([&] { SafetensorsCheckpoint::open(dir.path()); }), index.string(),
                   "index nests deeper than 64 levels");
  }
}

TEST(JsonLimits, SafetensorsIndexLongShardNameIsQuotedShortly) {
  test::TempDir dir;
  const auto index = dir / "model.safetensors.index.json";
  write(index, R"({"weight_map": {"t": [")" + std::string(1'000'000, 'x') + R"("]}})");
  expect_message(user_error([&] { SafetensorsCheckpoint::open(dir.path()); }), index.string(),
                 "expected a shard file name");
}

}  // namespace
}  // namespace fastllm
