#pragma once
// What the training tests share: fixture trajectories as indexed datasets, the `fastllm train`
// command line of the fixtures' optimizer settings, and reading a run's metrics.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "support/process.h"

namespace fastllm::test {

inline const std::string kFixtures = FASTLLM_FIXTURES;

// Writes batches[step][b] of the fixture's trajectory as one document each, in order, to
// <prefix>.bin/.idx; returns the sequence length.
std::int64_t write_trajectory_dataset(const std::string& fixture, const std::string& prefix);

// `fastllm train` flags reproducing the fixture's run (reference.json: AdamW lr 3e-3, betas
// (0.9, 0.95), eps 1e-8, no weight decay, no clipping, constant lr) on `data`.
std::string fixture_train_flags(const std::string& fixture, const std::string& data,
                                std::int64_t seq, std::int64_t micro_batch_size);

// Every record of <dir>/metrics.jsonl that has `key`, in order.
std::vector<nlohmann::json> metrics(const std::string& dir, const std::string& key);

// A Hugging Face folder with dev-mistral's config and weights (F32, one file), but
// lm_head.weight[element] = NaN.
void write_model_with_nan(const std::string& folder, std::int64_t element);

// Every tensor of a safetensors file or folder as float, by name.
std::map<std::string, std::vector<float>> read_all(const std::string& path);

}  // namespace fastllm::test
