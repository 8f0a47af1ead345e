#pragma once
// Shared by the `fastllm generate` tests: running generate on token ids, and the independent
// reference, greedy decoding read off one full forward of `fastllm probe` (no cache): for a causal
// model, greedy tokens t_1..t_n of a prompt p are right exactly when argmax(logits at position
// |p| - 1 + i) of probe on p + t is t_{i+1} for every i.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "support/process.h"

namespace fastllm::test {

inline const std::string kFixtures = FASTLLM_FIXTURES;

// A fixture's folder by name, or a folder given by its path.
inline std::string model_folder(const std::string& model) {
  return model.starts_with("/") ? model : kFixtures + "/" + model;
}

inline std::string join_ids(const std::vector<std::int32_t>& ids) {
  std::string out;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) out += ',';
    out += std::to_string(ids[i]);
  }
  return out;
}

inline std::vector<std::int32_t> split_ids(const std::string& line) {
  std::vector<std::int32_t> ids;
  std::stringstream in(line);
  std::string item;
  while (std::getline(in, item, ','))
    ids.push_back(std::stoi(item));
  return ids;
}

// A ten-token prompt of the fixtures' 1000-token vocabulary.
inline const std::vector<std::int32_t> kPrompt = {1, 17, 503, 88, 941, 2, 260, 77, 391, 12};

// `fastllm generate --prompt_ids` on `ranks` ranks (1: without mpiexec); the new token ids.
inline std::vector<std::int32_t> generate_ids(const std::string& model,
                                              const std::vector<std::int32_t>& prompt,
                                              const std::string& flags, int ranks = 1) {
  const std::string command = "generate --pretrained_checkpoint_path=" + model_folder(model) +
                              " --prompt_ids=" + join_ids(prompt) + " " + flags;
  const CommandResult r = ranks == 1
                              ? run_fastllm(command)
                              : run_shell(
                                    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                    "OMP_NUM_THREADS=1 " +
                                    std::string(FASTLLM_MPIEXEC) + " --oversubscribe -np " +
                                    std::to_string(ranks) + " " + FASTLLM_BINARY + " " + command);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::string line = r.out;
  while (!line.empty() && line.back() == '\n')
    line.pop_back();
  EXPECT_EQ(line.find('\n'), std::string::npos) << "one line expected: " << r.out;
  return split_ids(line);
}

// argmax of probe's logits at every position of `ids` (lowest id on a tie, as torch.argmax).
inline std::vector<std::int32_t> probe_argmax(const std::string& model,
                                              const std::vector<std::int32_t>& ids) {
  TempDir dir;
  const std::string in = (dir / "in.safetensors").string(),
                    out = (dir / "out.safetensors").string();
  std::vector<std::int64_t> wide(ids.begin(), ids.end());
  std::vector<std::byte> bytes(wide.size() * sizeof(std::int64_t));
  std::memcpy(bytes.data(), wide.data(), bytes.size());
  const std::vector<SafetensorsTensor> tensors = {
      {"input_ids", SafetensorsDtype::I64, {1, static_cast<std::int64_t>(ids.size())}, bytes}};
  write_safetensors(in, tensors);
  const CommandResult r = run_fastllm("probe --pretrained_checkpoint_path=" + model_folder(model) +
                                      " --input=" + in + " --output=" + out);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const SafetensorsFile file = SafetensorsFile::open(out);
  const std::vector<float> logits = file.read_f32("logits");
  const std::size_t vocab = logits.size() / ids.size();
  std::vector<std::int32_t> best;
  for (std::size_t p = 0; p < ids.size(); ++p) {
    const auto row = logits.begin() + static_cast<std::ptrdiff_t>(p * vocab);
    best.push_back(static_cast<std::int32_t>(
        std::max_element(row, row + static_cast<std::ptrdiff_t>(vocab)) - row));
  }
  return best;
}

// The new tokens are greedy decoding of the prompt according to full forwards.
inline void expect_greedy(const std::string& model, const std::vector<std::int32_t>& prompt,
                          const std::vector<std::int32_t>& tokens) {
  std::vector<std::int32_t> whole = prompt;
  whole.insert(whole.end(), tokens.begin(), tokens.end());
  const std::vector<std::int32_t> best = probe_argmax(model, whole);
  ASSERT_EQ(best.size(), whole.size());
  for (std::size_t i = 0; i < tokens.size(); ++i)
    EXPECT_EQ(tokens[i], best[prompt.size() - 1 + i]) << "new token " << i;
}

}  // namespace fastllm::test
