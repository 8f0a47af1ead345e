#include "data/sampler.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "io/error.h"

namespace fastllm {
namespace {

constexpr std::int64_t kBlendStride = 1024;

std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// splitmix64 with unbiased bounded draws: the same permutation on every platform and compiler,
// which std::shuffle and the std distributions do not promise.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    std::uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  // Uniform in [0, n), n > 0 (Lemire's multiply-and-reject).
  std::uint64_t below(std::uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    auto low = static_cast<std::uint64_t>(m);
    if (low < n) {
      const std::uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        low = static_cast<std::uint64_t>(m);
      }
    }
    return static_cast<std::uint64_t>(m >> 64);
  }

 private:
  std::uint64_t state_;
};

template <typename T>
void shuffle(std::vector<T>& values, Rng& rng) {
  for (std::size_t i = values.size(); i > 1; --i) {
    std::swap(values[i - 1], values[rng.below(i)]);
  }
}

enum Purpose : std::uint64_t { kDocuments = 1, kWindows = 2 };

std::uint64_t stream_seed(std::uint64_t seed, std::size_t source, DataSplit split,
                          std::int64_t epoch, Purpose purpose) {
  std::uint64_t h = mix64(seed);
  h = mix64(h ^ source);
  h = mix64(h ^ static_cast<std::uint64_t>(split));
  h = mix64(h ^ static_cast<std::uint64_t>(epoch));
  return mix64(h ^ purpose);
}

class Fingerprint {
 public:
  template <typename T>
  void add(const T& value) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(&value);
    for (std::size_t i = 0; i < sizeof(T); ++i) {
      hash_ = (hash_ ^ bytes[i]) * 0x100000001b3ULL;
    }
  }
  std::uint64_t value() const { return hash_; }

 private:
  std::uint64_t hash_ = 0xcbf29ce484222325ULL;
};

std::optional<double> parse_number(std::string_view word) {
  double value = 0;
  const auto result = std::from_chars(word.data(), word.data() + word.size(), value);
  if (result.ec != std::errc() || result.ptr != word.data() + word.size()) return std::nullopt;
  return value;
}

std::vector<std::string> split_words(const std::vector<std::string>& words) {
  std::vector<std::string> out;
  for (const std::string& word : words) {
    std::istringstream in(word);
    std::string part;
    while (in >> part)
      out.push_back(part);
  }
  return out;
}

}  // namespace

std::vector<DataSource> parse_data_path(const std::vector<std::string>& raw) {
  const std::vector<std::string> words = split_words(raw);
  if (words.empty()) throw UserError("--data_path is empty, expected PREFIX or W1 PREFIX1 W2 ...");
  std::vector<DataSource> sources;
  const bool paired = words.size() % 2 == 0;
  std::size_t weighted = 0;
  if (paired) {
    for (std::size_t i = 0; i < words.size(); i += 2)
      weighted += parse_number(words[i]) ? 1 : 0;
  }
  if (paired && weighted == words.size() / 2) {
    double total = 0;
    for (std::size_t i = 0; i < words.size(); i += 2) {
      const double w = *parse_number(words[i]);
      if (!std::isfinite(w) || w < 0) {
        throw UserError("--data_path weight '" + words[i] + "' for '" + words[i + 1] +
                        "', expected a finite number >= 0");
      }
      total += w;
      sources.push_back({words[i + 1], w});
    }
    if (total <= 0) throw UserError("--data_path weights are all 0, expected a positive sum");
    return sources;
  }
  for (std::size_t i = 0; i < words.size(); ++i) {
    if (parse_number(words[i])) {
      throw UserError("--data_path word '" + words[i] +
                      "' is a number, but the words do not pair up as W1 PREFIX1 W2 PREFIX2 ...; "
                      "expected a weight before every prefix or none at all");
    }
    sources.push_back({words[i], std::nullopt});
  }
  return sources;
}

std::array<double, 3> parse_split(std::string_view text) {
  std::array<double, 3> parts = {0, 0, 0};
  std::size_t count = 0;
  std::size_t at = 0;
  const auto bad = [&](const std::string& why) {
    return UserError("--split '" + std::string(text) + "': " + why +
                     ", expected up to three numbers >= 0 like 98,2,0");
  };
  while (true) {
    const std::size_t stop = text.find_first_of(",/", at);
    const std::string_view word =
        text.substr(at, stop == std::string_view::npos ? std::string_view::npos : stop - at);
    if (count == 3) throw bad("more than three parts");
    const auto value = parse_number(word);
    if (!value || !std::isfinite(*value) || *value < 0) {
      throw bad("'" + std::string(word) + "' is not a number >= 0");
    }
    parts[count++] = *value;
    if (stop == std::string_view::npos) break;
    at = stop + 1;
  }
  const double total = parts[0] + parts[1] + parts[2];
  if (total <= 0) throw bad("the parts add up to 0");
  for (double& p : parts)
    p /= total;
  return parts;
}

SamplingMode parse_sampling_mode(std::string_view text) {
  if (text == "packed") return SamplingMode::kPacked;
  if (text == "document") return SamplingMode::kDocument;
  throw UserError("sampling mode '" + std::string(text) + "', expected packed or document");
}

std::string_view split_name(DataSplit split) {
  switch (split) {
    case DataSplit::kTrain:
      return "train";
    case DataSplit::kValid:
      return "valid";
    case DataSplit::kTest:
      return "test";
  }
  return "unknown";
}

std::int64_t micro_batch_first_sample(std::int64_t consumed_samples, std::int64_t micro_step,
                                      std::int64_t dp_rank, std::int64_t dp_size,
                                      std::int64_t micro_batch_size) {
  return consumed_samples + (micro_step * dp_size + dp_rank) * micro_batch_size;
}

// One epoch of one source: its documents' order and, in packed mode, where each window starts.
struct DataSampler::Epoch {
  std::vector<std::uint32_t> order;         // split-relative sequence numbers; empty = identity
  std::vector<std::uint32_t> window_doc;    // packed: position in `order` of window j's start
  std::vector<std::int32_t> window_offset;  // packed: token offset of window j in that document
  std::vector<std::int64_t> window_order;   // packed with shuffle: the windows' order
};

std::vector<std::shared_ptr<const IndexedDataset>> DataSampler::open_sources(
    const SamplerConfig& config) {
  std::vector<std::shared_ptr<const IndexedDataset>> datasets;
  for (const DataSource& source : config.sources) {
    auto dataset = std::make_shared<const IndexedDataset>(source.prefix);
    if (config.vocab_size > 0) dataset->check_vocabulary(config.vocab_size);
    datasets.push_back(std::move(dataset));
  }
  return datasets;
}

DataSampler::DataSampler(const SamplerConfig& config, DataSplit split)
    : DataSampler(open_sources(config), config, split) {}

DataSampler::DataSampler(std::vector<std::shared_ptr<const IndexedDataset>> datasets,
                         SamplerConfig config, DataSplit split)
    : datasets_(std::move(datasets)), config_(std::move(config)), split_(split) {
  if (datasets_.size() != config_.sources.size() || datasets_.empty()) {
    throw std::invalid_argument("DataSampler: one opened dataset per source expected");
  }
  if (config_.sequence_length < 1) {
    throw UserError("--sequence_length " + std::to_string(config_.sequence_length) +
                    ", expected a positive number of tokens");
  }
  const bool weighted = config_.sources[0].weight.has_value();
  for (const DataSource& source : config_.sources) {
    if (source.weight.has_value() != weighted) {
      throw UserError("--data_path: '" + source.prefix +
                      "' differs from the first dataset in having a weight; give every dataset a "
                      "weight or none");
    }
  }

  // Megatron's split matrix: normalised fractions summed into bookends.
  std::array<double, 3> fractions = config_.split;
  const double split_total = fractions[0] + fractions[1] + fractions[2];
  if (!(split_total > 0)) throw UserError("--split adds up to 0, expected a positive sum");
  if (split_total != 1.0) {
    for (double& f : fractions)
      f /= split_total;
  }
  std::array<double, 4> bookends = {0, 0, 0, 0};
  for (int k = 0; k < 3; ++k)
    bookends[k + 1] = bookends[k] + fractions[k];
  const auto k = static_cast<std::size_t>(split_);
  const bool split_used = bookends[k + 1] > bookends[k];

  const std::int64_t seq = config_.sequence_length;
  info_.resize(datasets_.size());
  for (std::size_t s = 0; s < datasets_.size(); ++s) {
    const IndexedDataset& ds = *datasets_[s];
    SourceInfo& info = info_[s];
    info.prefix = ds.prefix();
    if (split_used) {
      const auto n = static_cast<double>(ds.num_sequences());
      info.first_sequence = static_cast<std::int64_t>(std::nearbyint(bookends[k] * n));
      info.end_sequence = static_cast<std::int64_t>(std::nearbyint(bookends[k + 1] * n));
      info.end_sequence = std::min(info.end_sequence, ds.num_sequences());
      info.first_sequence = std::min(info.first_sequence, info.end_sequence);
    }
    const std::int64_t docs = info.end_sequence - info.first_sequence;
    if (docs > std::numeric_limits<std::uint32_t>::max()) {
      throw UserError("dataset '" + ds.prefix() + "' has " + std::to_string(docs) +
                      " sequences in the " + std::string(split_name(split_)) +
                      " split, at most 4294967295 are supported");
    }
    if (docs > 0) {
      const std::int64_t last = info.end_sequence - 1;
      info.tokens = ds.sequence_start(last) + ds.sequence_length(last) -
                    ds.sequence_start(info.first_sequence);
    }
    if (config_.mode == SamplingMode::kDocument) {
      info.samples_per_epoch = docs;
    } else {
      info.samples_per_epoch = info.tokens > seq ? (info.tokens - 1) / seq : 0;
    }
  }

  double weight_total = 0;
  for (std::size_t s = 0; s < info_.size(); ++s) {
    info_[s].weight =
        weighted ? *config_.sources[s].weight : static_cast<double>(info_[s].samples_per_epoch);
    weight_total += info_[s].weight;
  }
  empty_ = true;
  for (const SourceInfo& info : info_)
    empty_ = empty_ && info.end_sequence == info.first_sequence;
  if (!empty_) {
    for (std::size_t s = 0; s < info_.size(); ++s) {
      const SourceInfo& info = info_[s];
      const std::int64_t docs = info.end_sequence - info.first_sequence;
      if (weighted ? info.weight <= 0 : docs == 0) continue;
      if (docs == 0) {
        throw UserError("dataset '" + info.prefix + "' has no document in the " +
                        std::string(split_name(split_)) + " split (of its " +
                        std::to_string(datasets_[s]->num_sequences()) +
                        " sequences), while another dataset of --data_path has; expected every "
                        "weighted dataset to reach each split");
      }
      if (info.samples_per_epoch == 0) {
        throw UserError("dataset '" + info.prefix + "' has " + std::to_string(info.tokens) +
                        " tokens in the " + std::string(split_name(split_)) +
                        " split, fewer than --sequence_length + 1 = " + std::to_string(seq + 1) +
                        " for one packed sample");
      }
    }
    if (!(weight_total > 0)) {
      throw UserError("--data_path weights add up to 0, expected a positive sum");
    }
    for (SourceInfo& info : info_)
      info.weight /= weight_total;
  }

  Fingerprint fp;
  fp.add(static_cast<std::uint64_t>(info_.size()));
  for (std::size_t s = 0; s < info_.size(); ++s) {
    fp.add(datasets_[s]->num_sequences());
    fp.add(datasets_[s]->num_tokens());
    fp.add(std::bit_cast<std::uint64_t>(info_[s].weight));
    fp.add(info_[s].first_sequence);
    fp.add(info_[s].end_sequence);
  }
  fp.add(seq);
  fp.add(static_cast<std::int32_t>(config_.mode));
  fp.add(static_cast<std::int32_t>(config_.shuffle));
  fp.add(config_.seed);
  fp.add(config_.pad_token);
  fp.add(static_cast<std::int32_t>(split_));
  fingerprint_ = fp.value();

  epochs_.resize(info_.size());
  blend_checkpoints_.push_back(std::vector<std::int64_t>(info_.size(), 0));
}

std::pair<std::size_t, std::int64_t> DataSampler::locate(std::int64_t index) const {
  if (empty_) {
    throw std::logic_error("DataSampler: the " + std::string(split_name(split_)) +
                           " split is empty");
  }
  if (index < 0) throw std::out_of_range("DataSampler: negative sample index");
  if (info_.size() == 1) return {0, index};

  const std::size_t n = info_.size();
  // Picks the source for sample i given the samples taken so far, as Megatron does.
  const auto pick = [&](std::int64_t i, const std::vector<std::int64_t>& taken) {
    const double x = std::max(static_cast<double>(i), 1.0);
    std::size_t best = 0;
    double best_error = info_[0].weight * x - static_cast<double>(taken[0]);
    for (std::size_t s = 1; s < n; ++s) {
      const double error = info_[s].weight * x - static_cast<double>(taken[s]);
      if (error > best_error) {
        best_error = error;
        best = s;
      }
    }
    return best;
  };

  const auto checkpoint = static_cast<std::size_t>(index / kBlendStride);
  std::vector<std::int64_t> taken;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    while (blend_checkpoints_.size() <= checkpoint) {
      std::vector<std::int64_t> next = blend_checkpoints_.back();
      const auto first = static_cast<std::int64_t>(blend_checkpoints_.size() - 1) * kBlendStride;
      for (std::int64_t i = first; i < first + kBlendStride; ++i)
        ++next[pick(i, next)];
      blend_checkpoints_.push_back(std::move(next));
    }
    taken = blend_checkpoints_[checkpoint];
  }
  for (std::int64_t i = static_cast<std::int64_t>(checkpoint) * kBlendStride;; ++i) {
    const std::size_t s = pick(i, taken);
    if (i == index) return {s, taken[s]};
    ++taken[s];
  }
}

std::int64_t DataSampler::epoch_of(std::int64_t index) const {
  const auto [source, local] = locate(index);
  return local / info_[source].samples_per_epoch;
}

std::shared_ptr<const DataSampler::Epoch> DataSampler::build_epoch(std::size_t source,
                                                                   std::int64_t number) const {
  auto epoch = std::make_shared<Epoch>();
  const SourceInfo& info = info_[source];
  const IndexedDataset& ds = *datasets_[source];
  const std::int64_t docs = info.end_sequence - info.first_sequence;
  if (config_.shuffle) {
    epoch->order.resize(static_cast<std::size_t>(docs));
    std::iota(epoch->order.begin(), epoch->order.end(), 0u);
    Rng rng(stream_seed(config_.seed, source, split_, number, kDocuments));
    shuffle(epoch->order, rng);
  }
  if (config_.mode == SamplingMode::kPacked) {
    const std::int64_t seq = config_.sequence_length;
    const std::int64_t windows = info.samples_per_epoch;
    epoch->window_doc.reserve(static_cast<std::size_t>(windows));
    epoch->window_offset.reserve(static_cast<std::size_t>(windows));
    std::int64_t stream = 0;  // tokens before the current document
    std::int64_t next = 0;    // start of the next window
    std::int64_t made = 0;
    for (std::int64_t m = 0; m < docs && made < windows; ++m) {
      const std::int64_t d = epoch->order.empty() ? m : epoch->order[static_cast<std::size_t>(m)];
      const std::int64_t length = ds.sequence_length(info.first_sequence + d);
      for (; next < stream + length && made < windows; next += seq, ++made) {
        epoch->window_doc.push_back(static_cast<std::uint32_t>(m));
        epoch->window_offset.push_back(static_cast<std::int32_t>(next - stream));
      }
      stream += length;
    }
    if (config_.shuffle) {
      epoch->window_order.resize(static_cast<std::size_t>(windows));
      std::iota(epoch->window_order.begin(), epoch->window_order.end(), std::int64_t{0});
      Rng rng(stream_seed(config_.seed, source, split_, number, kWindows));
      shuffle(epoch->window_order, rng);
    }
  }
  return epoch;
}

std::shared_ptr<const DataSampler::Epoch> DataSampler::epoch(std::size_t source,
                                                             std::int64_t number) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& cache = epochs_[source];
  // Without shuffling every epoch is the same.
  const std::int64_t key = config_.shuffle ? number : 0;
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  auto built = build_epoch(source, key);
  if (cache.size() >= 2) {
    // Keep the epoch nearest to the new one: training moves forward through epochs.
    const auto farthest = std::max_element(cache.begin(), cache.end(), [&](auto& a, auto& b) {
      return std::llabs(a.first - key) < std::llabs(b.first - key);
    });
    cache.erase(farthest);
  }
  cache.emplace(key, built);
  return built;
}

void DataSampler::sample(std::int64_t index, std::span<std::int32_t> tokens,
                         std::span<std::int32_t> targets) const {
  sample(index, tokens, targets, {});
}

void DataSampler::sample(std::int64_t index, std::span<std::int32_t> tokens,
                         std::span<std::int32_t> targets, std::span<std::int32_t> positions) const {
  const std::int64_t seq = config_.sequence_length;
  if (static_cast<std::int64_t>(tokens.size()) != seq ||
      static_cast<std::int64_t>(targets.size()) != seq ||
      (!positions.empty() && static_cast<std::int64_t>(positions.size()) != seq)) {
    throw std::invalid_argument("DataSampler::sample: tokens, targets and positions must hold " +
                                std::to_string(seq) + " values");
  }
  const auto [source, local] = locate(index);
  const SourceInfo& info = info_[source];
  const IndexedDataset& ds = *datasets_[source];
  const std::int64_t number = local / info.samples_per_epoch;
  const std::int64_t within = local % info.samples_per_epoch;
  const std::shared_ptr<const Epoch> ep = epoch(source, number);
  const auto doc_at = [&](std::int64_t position) {
    const std::int64_t d =
        ep->order.empty() ? position : ep->order[static_cast<std::size_t>(position)];
    return info.first_sequence + d;
  };

  std::vector<std::int32_t> window(static_cast<std::size_t>(seq + 1));
  if (config_.mode == SamplingMode::kDocument) {
    const std::int64_t sequence = doc_at(within);
    const std::int64_t length = std::min<std::int64_t>(ds.sequence_length(sequence), seq + 1);
    ds.read_tokens(ds.sequence_start(sequence),
                   std::span<std::int32_t>(window).first(static_cast<std::size_t>(length)));
    for (std::int64_t t = 0; t < seq; ++t) {
      const auto i = static_cast<std::size_t>(t);
      tokens[i] = t < length ? window[i] : config_.pad_token;
      targets[i] = t + 1 < length ? window[i + 1] : -1;
      if (!positions.empty()) positions[i] = static_cast<std::int32_t>(t);
    }
    return;
  }

  const std::int64_t j =
      ep->window_order.empty() ? within : ep->window_order[static_cast<std::size_t>(within)];
  std::int64_t position = ep->window_doc[static_cast<std::size_t>(j)];
  std::int64_t offset = ep->window_offset[static_cast<std::size_t>(j)];
  std::size_t filled = 0;
  while (filled < window.size()) {
    const std::int64_t sequence = doc_at(position);
    const std::int64_t take = std::min<std::int64_t>(
        ds.sequence_length(sequence) - offset, static_cast<std::int64_t>(window.size() - filled));
    ds.read_tokens(ds.sequence_start(sequence) + offset,
                   std::span<std::int32_t>(window).subspan(filled, static_cast<std::size_t>(take)));
    for (std::int64_t t = 0; t < take && !positions.empty(); ++t) {
      const auto i = filled + static_cast<std::size_t>(t);
      if (i < positions.size()) positions[i] = static_cast<std::int32_t>(t);
    }
    filled += static_cast<std::size_t>(take);
    offset = 0;
    ++position;
  }
  for (std::int64_t t = 0; t < seq; ++t) {
    const auto i = static_cast<std::size_t>(t);
    tokens[i] = window[i];
    targets[i] = window[i + 1];
  }
}

}  // namespace fastllm
