#pragma once
// Helpers shared by the data tests: raw file bytes, little-endian byte building, the message of an
// expected UserError, and SentencePiece's own command-line encoder as the reference tokenizer.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "io/error.h"
#include "support/process.h"

namespace fastllm::test {

inline std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// Appends `value` little endian in `bytes` bytes.
inline void put_le(std::string& out, std::uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i)
    out += static_cast<char>((value >> (8 * i)) & 0xff);
}

// The message of the UserError `f` throws; a test failure when it throws none.
template <typename F>
std::string user_error(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return {};
}

inline void expect_contains(const std::string& text, std::initializer_list<std::string> parts) {
  for (const std::string& part : parts) {
    EXPECT_NE(text.find(part), std::string::npos) << "'" << part << "' not in: " << text;
  }
}

// spm_encode's ids for every line of `path` (one vector per input line, blank lines included);
// `extra` is spm_encode's --extra_options: "bos", "eos" or "bos:eos" add those ids.
inline std::vector<std::vector<std::int32_t>> spm_encode_lines(const std::filesystem::path& path,
                                                               const std::string& extra = "") {
  const CommandResult r =
      run_shell(std::string(FASTLLM_SPM_ENCODE) + " --model=" + FASTLLM_TEST_TOKENIZER +
                " --output_format=id" + (extra.empty() ? "" : " --extra_options=" + extra) + " < " +
                path.string());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::vector<std::int32_t>> out;
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream ids(line);
    std::vector<std::int32_t> row;
    std::int32_t id = 0;
    while (ids >> id)
      row.push_back(id);
    out.push_back(std::move(row));
  }
  return out;
}

// spm_encode's ids for one single-line text.
inline std::vector<std::int32_t> spm_encode_text(const std::string& text,
                                                 const std::string& extra = "") {
  TempDir dir;
  write_bytes(dir / "line.txt", text + "\n");
  auto rows = spm_encode_lines(dir / "line.txt", extra);
  EXPECT_EQ(rows.size(), 1u);
  return rows.empty() ? std::vector<std::int32_t>{} : rows[0];
}

}  // namespace fastllm::test
