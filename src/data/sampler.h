#pragma once
// The training data: samples of sequence_length tokens and their next-token targets, drawn from
// one or more Megatron indexed datasets, the way Megatron's GPTDataset and BlendedDataset draw
// them.
//
// - Split: each dataset's sequences are cut into train/valid/test ranges as Megatron's
//   BlendedMegatronDatasetBuilder cuts them: with the --split fractions normalised and summed into
//   bookends b0 = 0 <= b1 <= b2 <= b3 = 1, split k holds sequences
//   [round(b_k * N), round(b_{k+1} * N)) (round half to even, as Python's round). A dataset made by
//   `fastllm prepare` has one sequence per document.
// - Packed mode: an epoch concatenates the split's documents (in a seeded shuffled order, or in
//   file order) into one token stream, and sample j is the window of sequence_length + 1 tokens
//   starting at token j * sequence_length: each window starts at the previous one's last token
//   (Megatron's one-token overlap). An epoch has (tokens - 1) / sequence_length samples; the tail
//   of an epoch too short for a window is not used. With shuffle the windows of an epoch are also
//   drawn in a seeded order.
//   Each sample also gives every token's position in its document (document starts from the
//   index), for attention that does not cross documents.
// - Document mode: sample j of an epoch is one document (shuffled order or file order), truncated
//   to sequence_length + 1 tokens or padded with pad_token; padded positions have target -1 (left
//   out of the loss).
// - Epochs wrap around: sample k of a dataset is sample k mod (samples per epoch) of epoch
//   k / (samples per epoch), and every epoch has its own shuffle.
// - Blending: sample i of the blend comes from the dataset whose weight * max(i, 1) - taken is
//   largest (ties to the first), as Megatron's build_blending_indices picks it, and is that
//   dataset's next sample.
// A sample is a pure function of (datasets, config, split, index): resuming, or any data-parallel
// layout that hands out global indices, reads the same samples.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/indexed_dataset.h"

namespace fastllm {

struct DataSource {
  std::string prefix;            // <prefix>.bin / <prefix>.idx
  std::optional<double> weight;  // blend weight; none: in proportion to the dataset's samples
};

// Megatron's --data_path words: "PREFIX [PREFIX ...]" or "W1 PREFIX1 W2 PREFIX2 ...". Throws
// UserError naming --data_path and the word for a bad weight (negative, not finite, a mix of
// weighted and unweighted entries, all zero).
std::vector<DataSource> parse_data_path(const std::vector<std::string>& words);

// Megatron's --split "98,2,0" (or "98/2/0"; missing entries are 0) as fractions summing to 1.
std::array<double, 3> parse_split(std::string_view text);

enum class SamplingMode { kPacked, kDocument };
// "packed" or "document".
SamplingMode parse_sampling_mode(std::string_view text);

enum class DataSplit { kTrain = 0, kValid = 1, kTest = 2 };
std::string_view split_name(DataSplit split);

struct SamplerConfig {
  std::vector<DataSource> sources;
  std::array<double, 3> split = {1.0, 0.0, 0.0};  // fractions, as parse_split returns them
  std::int64_t sequence_length = 0;
  SamplingMode mode = SamplingMode::kPacked;
  bool shuffle = true;
  std::uint64_t seed = 0;
  std::int32_t pad_token = 0;   // document mode: the token that fills a short sample
  std::int64_t vocab_size = 0;  // > 0: open_sources() checks every token id is below it
};

// What a checkpoint stores to resume the data stream: the next global sample index. The
// fingerprint (DataSampler::fingerprint()) tells whether the data or the sampling changed since.
struct SamplerState {
  std::int64_t consumed_samples = 0;
  std::uint64_t fingerprint = 0;
};

// The first global sample index of micro-batch `micro_step` of data-parallel rank `dp_rank` in a
// step that starts at `consumed_samples`, in Megatron's order: each micro-step takes
// dp_size * micro_batch_size consecutive samples, rank r the r-th run of micro_batch_size. The
// same global batch is thus read under any split of it into ranks and accumulation steps.
std::int64_t micro_batch_first_sample(std::int64_t consumed_samples, std::int64_t micro_step,
                                      std::int64_t dp_rank, std::int64_t dp_size,
                                      std::int64_t micro_batch_size);

class DataSampler {
 public:
  // Opens (memory-maps) every source; with config.vocab_size > 0 checks their token ids.
  static std::vector<std::shared_ptr<const IndexedDataset>> open_sources(
      const SamplerConfig& config);

  // Throws UserError for a sequence_length < 1, a source whose split holds no document while
  // another source's does, or a packed split with fewer than sequence_length + 1 tokens.
  DataSampler(std::vector<std::shared_ptr<const IndexedDataset>> datasets, SamplerConfig config,
              DataSplit split);
  DataSampler(const SamplerConfig& config, DataSplit split);

  // No source has a document in this split (e.g. the test split of "98,2,0"): sample() throws.
  bool empty() const { return empty_; }
  DataSplit split() const { return split_; }
  std::int64_t sequence_length() const { return config_.sequence_length; }

  // Writes sequence_length() tokens and targets (the next token, or -1 where there is none).
  // Thread-safe.
  void sample(std::int64_t index, std::span<std::int32_t> tokens,
              std::span<std::int32_t> targets) const;
  // The same, with positions[t] = the position of token t in its document within the sample: 0
  // where a document starts and at the sample's first token (a document cut by the sample's start
  // counts from there, as Megatron's --reset-position-ids), the previous + 1 otherwise; what
  // document-masked attention (--cross_document_attention=0) takes. A document-mode sample is one
  // document, 0..sequence_length()-1.
  void sample(std::int64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets,
              std::span<std::int32_t> positions) const;

  struct SourceInfo {
    std::string prefix;
    double weight = 0;                // normalised
    std::int64_t first_sequence = 0;  // the split's sequences [first, end)
    std::int64_t end_sequence = 0;
    std::int64_t tokens = 0;  // tokens in the split
    std::int64_t samples_per_epoch = 0;
  };
  const std::vector<SourceInfo>& sources() const { return info_; }
  // Which source global sample `index` comes from, and its index within that source.
  std::pair<std::size_t, std::int64_t> locate(std::int64_t index) const;
  // The epoch of its source that global sample `index` falls in (for logging).
  std::int64_t epoch_of(std::int64_t index) const;

  // A hash of the sources' shapes and of everything that decides the samples.
  std::uint64_t fingerprint() const { return fingerprint_; }

 private:
  struct Epoch;
  std::shared_ptr<const Epoch> epoch(std::size_t source, std::int64_t number) const;
  std::shared_ptr<const Epoch> build_epoch(std::size_t source, std::int64_t number) const;

  std::vector<std::shared_ptr<const IndexedDataset>> datasets_;
  SamplerConfig config_;
  DataSplit split_;
  bool empty_ = true;
  std::vector<SourceInfo> info_;
  std::uint64_t fingerprint_ = 0;

  mutable std::mutex mutex_;
  // Per source, the epochs built most recently (a step may straddle two).
  mutable std::vector<std::map<std::int64_t, std::shared_ptr<const Epoch>>> epochs_;
  // Blending state every kBlendStride samples: the samples taken from each source before it.
  mutable std::vector<std::vector<std::int64_t>> blend_checkpoints_;
};

}  // namespace fastllm
