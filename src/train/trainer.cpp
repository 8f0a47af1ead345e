#include "train/trainer.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "io/error.h"
#include "io/tokenizer.h"
#include "model/generator.h"
#include "model/hf_weights.h"
#include "model/parameters.h"
#include "parallel/backend_setup.h"
#include "parallel/finalize.h"
#include "parallel/mpi_session.h"
#include "parallel/pipeline.h"
#include "parallel/topology.h"
#include "train/checkpoint.h"
#include "train/save_folder.h"

#if FASTLLM_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace fastllm {
namespace {

namespace fs = std::filesystem;

std::atomic<int> g_stop_signal{0};

extern "C" void on_stop_signal(int signal) {
  g_stop_signal.store(signal);
}

std::int64_t required_positive(const Options& o, const std::string& flag) {
  if (!o.is_set(flag)) throw UserError("--" + flag + " is required");
  const std::int64_t v = o.get_int(flag);
  if (v < 1)
    throw UserError("--" + flag + "=" + std::to_string(v) + ": expected a positive integer");
  return v;
}

std::string config_json(const Options& options, const ModelConfig& model) {
  nlohmann::ordered_json j;
  for (const auto& [name, value] : options.all()) {
    if (name == "config") continue;
    j[name] = value.items.size() == 1 ? nlohmann::ordered_json(value.items[0])
                                      : nlohmann::ordered_json(value.items);
  }
  for (const auto& [name, rv] : model.resolved)
    j[name] = rv.value;
  return j.dump();
}

std::string duration(double seconds) {
  const auto s = static_cast<long long>(std::max(0.0, seconds));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%02lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  return buf;
}

// The time of day in UTC, ISO 8601 ("2025-03-01T14:05:09Z").
std::string iso_time_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  gmtime_r(&now, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

// This process's peak resident set since it started.
double host_peak_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return 1024.0 * static_cast<double>(usage.ru_maxrss);  // Linux reports KiB
}

// The flags whose values change what a step computes, or which samples it reads; a resume that
// changes one of them does not continue the checkpoint's run.
constexpr const char* kMathFlags[] = {"lr",
                                      "min_lr",
                                      "lr_warmup_iters",
                                      "lr_decay_style",
                                      "lr_decay_iters",
                                      "batch_size",
                                      "micro_batch_size",
                                      "sequence_length",
                                      "weight_decay",
                                      "adam_beta1",
                                      "adam_beta2",
                                      "adam_eps",
                                      "clip_grad",
                                      "seed",
                                      "data_path",
                                      "split",
                                      "data_sampling",
                                      "data_shuffle",
                                      "window_size",
                                      "moe_aux_loss_coeff",
                                      "cross_document_attention",
                                      "dtype"};

std::string json_text(const nlohmann::json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

// Whether two recorded values differ; numbers written differently ("3e-3", "0.003") are equal.
bool values_differ(const nlohmann::json& a, const nlohmann::json& b) {
  const std::string x = json_text(a), y = json_text(b);
  if (x == y) return false;
  try {
    std::size_t i = 0, j = 0;
    const double u = std::stod(x, &i), v = std::stod(y, &j);
    if (i == x.size() && j == y.size()) return u != v;
  } catch (const std::exception&) {
  }
  return true;
}

// "--lr: 0.001 (checkpoint) -> 0.002" for each math flag whose value differs between the
// configuration a checkpoint saved and this run's.
std::vector<std::string> setting_changes(const std::string& saved, const std::string& current) {
  std::vector<std::string> out;
  const nlohmann::json a = nlohmann::json::parse(saved, nullptr, false);
  const nlohmann::json b = nlohmann::json::parse(current, nullptr, false);
  if (!a.is_object() || !b.is_object()) return out;
  for (const char* flag : kMathFlags) {
    if (!a.contains(flag) || !b.contains(flag) || !values_differ(a[flag], b[flag])) continue;
    out.push_back(std::string("--") + flag + "=" + json_text(b[flag]) +
                  " (the checkpoint's run: " + json_text(a[flag]) + ")");
  }
  return out;
}

// Rewrites <save>/metrics.jsonl without the records of iterations after `start` (all of them when
// the run starts from scratch): a run killed after its last checkpoint logged iterations this one
// repeats. A new file renamed over the old, so that a kill leaves one or the other.
void drop_metrics_after(const fs::path& path, std::int64_t start) {
  std::error_code error;
  if (!fs::exists(path, error)) return;
  std::ifstream in(path);
  std::string kept, line;
  std::int64_t dropped = 0;
  while (std::getline(in, line)) {
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, false);
    const bool later = record.is_object() && record.contains("iteration") &&
                       record["iteration"].is_number_integer() &&
                       (start == 0 || record["iteration"].get<std::int64_t>() > start);
    if (later) {
      ++dropped;
    } else {
      kept += line + "\n";
    }
  }
  if (dropped == 0) return;
  const fs::path temporary = path.string() + ".tmp";
  std::ofstream out(temporary, std::ios::trunc);
  out << kept;
  out.flush();
  if (!out) {
    out.close();
    fs::remove(temporary, error);
    throw UserError("cannot write " + temporary.string() + " (the disk may be full)");
  }
  out.close();
  fs::rename(temporary, path, error);
  if (error) throw UserError("cannot replace " + path.string() + ": " + error.message());
  std::cout << "metrics: dropped " << dropped << " records of " << path.string()
            << " past iteration " << start << ", which this run repeats\n";
}

// One data-parallel rank's share of a step: its micro-batches, read before any compute so that
// the number of predicted tokens of the whole global batch is known for the loss normalisation.
// With document_positions, each micro-batch also carries its tokens' positions in their documents
// (--cross_document_attention=0).
std::vector<MicroBatch> read_micro_batches(const DataSampler& sampler, std::int64_t first_sample,
                                           std::int64_t steps, int dp_rank, int dp_size,
                                           std::int64_t micro_batch_size, bool document_positions) {
  const std::int64_t seq = sampler.sequence_length();
  std::vector<MicroBatch> out(static_cast<std::size_t>(steps));
  for (std::int64_t m = 0; m < steps; ++m) {
    MicroBatch& mb = out[m];
    mb.batch = micro_batch_size;
    mb.seq = seq;
    mb.input_ids.resize(static_cast<std::size_t>(micro_batch_size * seq));
    mb.targets.resize(mb.input_ids.size());
    if (document_positions) mb.positions.resize(mb.input_ids.size());
    const std::int64_t first =
        micro_batch_first_sample(first_sample, m, dp_rank, dp_size, micro_batch_size);
    for (std::int64_t b = 0; b < micro_batch_size; ++b) {
      sampler.sample(first + b, std::span(mb.input_ids).subspan(b * seq, seq),
                     std::span(mb.targets).subspan(b * seq, seq),
                     document_positions ? std::span(mb.positions).subspan(b * seq, seq)
                                        : std::span<std::int32_t>());
    }
  }
  return out;
}

class Trainer {
 public:
  Trainer(const Options& options, const ModelConfig& model, const TrainSettings& settings,
          MpiSession& mpi, const Topology& topology, Backend& backend)
      : options_(options),
        config_(model),
        s_(settings),
        mpi_(mpi),
        topo_(topology),
        backend_(backend),
        model_(backend_, model.arch, model.run, model_partition(topology), settings.recompute),
        optimizer_(backend_, model_, settings.adamw, topology.data.get(),
                   topology.layout.zero_stage >= 1),
        sink_(backend_, topology, optimizer_.gradient_shard()),
        pipeline_(model_, topology.pipeline->size() > 1 ? topology.pipeline.get() : nullptr) {
    if (model_.gradient_buckets()) model_.set_gradient_sink(&sink_);
  }

  int run();

 private:
  bool rank0() const { return mpi_.rank() == 0; }
  // Runs fn on rank 0; a UserError it throws is thrown on every rank.
  template <class Fn>
  void on_rank0(Fn&& fn) const;
  bool stop_requested() const;
  void prepare_save_folder();
  void restore();
  void report_resume_changes(const TrainState& loaded, const std::string& path) const;
  void mark_start();
  void prepare_samples();
  void open_data();
  // Refuses a --save folder whose checkpoints this run would overwrite, writes its config.json and
  // says what is trained.
  void announce_run();
  // Counts a step whose loss or gradient norm was not finite; stops the run after
  // --max_skipped_steps of them in a row.
  void count_skipped_step(std::int64_t done);
  void sample(std::int64_t iteration);
  void step(std::int64_t iteration);
  std::optional<double> evaluate();  // nullopt: interrupted by a signal
  void report_evaluation(std::int64_t iteration);
  void save(std::int64_t iteration);
  void log(std::int64_t iteration, double loss, double aux_loss,
           const std::vector<double>& expert_load, double lr, double grad_norm, double seconds);
  void record(const nlohmann::ordered_json& line);
  double allreduce_sum(double value) const;
  CheckpointRanks checkpoint_ranks() const;

  const Options& options_;
  const ModelConfig& config_;
  TrainSettings s_;
  MpiSession& mpi_;
  const Topology& topo_;
  Backend& backend_;
  Model model_;
  AdamW optimizer_;
  ShardedGradientSink sink_;  // ZeRO-2's
  Pipeline pipeline_;
  std::unique_ptr<DataSampler> train_data_, valid_data_;
  TrainState state_;
  double step_loss_ = 0, step_grad_norm_ = 0;
  double step_aux_loss_ = 0;  // MoE: the load-balancing loss, before --moe_aux_loss_coeff
  std::vector<double> step_expert_load_;  // MoE: each expert's share of the routed token slots
  bool step_skipped_ = false;       // the step's loss or gradient norm was not finite: no update
  bool gradients_cleared_ = false;  // by the last update, which read them all
  std::int64_t skipped_in_a_row_ = 0, skipped_total_ = 0;
  std::unique_ptr<SaveFolderLock> save_lock_;
  std::set<std::string> rejected_;  // checkpoints that failed to load: never counted nor replaced
  std::string loaded_from_;
  std::chrono::steady_clock::time_point run_start_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point interval_start_;
  std::optional<Tokenizer> tokenizer_;
  std::vector<std::int32_t> sample_ids_;  // BOS and --sample_prompt
  std::int64_t interval_iterations_ = 0;
};

double Trainer::allreduce_sum(double value) const {
  double out = 0;
  MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, MPI_SUM, mpi_.world());
  return out;
}

template <class Fn>
void Trainer::on_rank0(Fn&& fn) const {
  std::string failure;
  if (rank0()) {
    try {
      fn();
    } catch (const UserError& e) {
      failure = e.what();
      if (failure.empty()) failure = "error";
    }
  }
  int length = static_cast<int>(failure.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, mpi_.world());
  if (length == 0) return;
  failure.resize(static_cast<std::size_t>(length));
  MPI_Bcast(failure.data(), length, MPI_CHAR, 0, mpi_.world());
  throw UserError(failure);
}

// Whether any rank got SIGTERM or SIGUSR1; collective, so that all ranks stop at the same point.
bool Trainer::stop_requested() const {
  int stop = g_stop_signal.load();
  MPI_Allreduce(MPI_IN_PLACE, &stop, 1, MPI_INT, MPI_MAX, mpi_.world());
  return stop != 0;
}

// Before anything else: a --save folder that cannot be written, or that another run uses, must
// not be found after the last iteration.
void Trainer::prepare_save_folder() {
  if (s_.save.empty()) return;
  on_rank0([&] { save_lock_ = std::make_unique<SaveFolderLock>(s_.save); });
}

CheckpointRanks Trainer::checkpoint_ranks() const {
  CheckpointRanks ranks;
  ranks.world = mpi_.world();
  ranks.dp_rank = topo_.at.dp;
  ranks.dp_size = topo_.layout.data_parallel;
  ranks.refuse_non_finite = true;
  return ranks;
}

void Trainer::restore() {
  state_.seed = s_.seed;
  state_.config_json = config_json(options_, config_);
  std::vector<std::string> found;
  // A file named by --load must load; in a folder, unreadable files are reported and skipped.
  bool explicit_file = false;
  if (!s_.load.empty()) {
    if (fs::is_directory(s_.load)) {
      found = list_checkpoints(s_.load);
    } else if (fs::exists(s_.load)) {
      found = {s_.load};
      explicit_file = true;
    }
    if (found.empty() && rank0())
      std::cerr << "fastllm train: no checkpoint in --load=" << s_.load
                << "; starting at iteration 0 "
                << (config_.load_weights
                        ? "from the pretrained weights of " + config_.checkpoint_path
                        : std::string("from random weights"))
                << "\n";
  }
  // Newest first; an unreadable file (a save killed half-way, a truncated copy) is reported and
  // the one before it used, but a readable checkpoint of another model is an error.
  const auto skip = [&](const std::string& path, const UserError& e) {
    if (explicit_file) throw UserError("--load=" + path + ": " + e.what());
    rejected_.insert(path);
    if (rank0()) std::cerr << "fastllm train: skipping " << path << ": " << e.what() << "\n";
  };
  for (auto it = found.rbegin(); it != found.rend(); ++it) {
    std::optional<Architecture> stored;
    try {
      checkpoint_iteration(*it, mpi_.world());
      stored = checkpoint_architecture(*it, mpi_.world());
    } catch (const UserError& e) {
      skip(*it, e);
      continue;
    }
    if (!(*stored == config_.arch))
      throw UserError("--load: " + *it + " holds another architecture (" +
                      architecture_difference(*stored, config_.arch) + ", checkpoint vs this run)");
    try {
      CheckpointRanks ranks = checkpoint_ranks();
      ranks.report_reads = true;
      const TrainState loaded = load_checkpoint(*it, model_, &optimizer_, ranks);
      state_.iteration = loaded.iteration;
      state_.consumed_samples = loaded.consumed_samples;
      loaded_from_ = *it;
      if (rank0()) {
        std::cout << "resumed from " << *it << " at iteration " << state_.iteration << "\n";
        report_resume_changes(loaded, *it);
      }
      return;
    } catch (const UserError& e) {
      skip(*it, e);
    }
  }
  if (config_.load_weights) {
    load_hf_weights(model_, config_.checkpoint_path);
    // The tensors of one model replica: each pipeline stage's, counted on its first tensor rank.
    const double held = topo_.at.dp == 0 && topo_.at.tp == 0
                            ? static_cast<double>(model_.parameters().size())
                            : 0.0;
    const double tensors = allreduce_sum(held);
    if (rank0())
      std::cout << "loaded the pretrained weights of " << config_.checkpoint_path << " ("
                << static_cast<long long>(tensors)
                << " tensors); starting at iteration 0 with a new optimizer state\n";
  } else {
    model_.initialize(s_.seed, s_.init_std);
    if (rank0())
      std::cout << "initialized random weights (--seed=" << s_.seed
                << ", --init_std=" << s_.init_std << "); starting at iteration 0\n";
  }
  optimizer_.model_to_master();
}

// On rank 0: warns of settings that differ from those the checkpoint was trained with.
void Trainer::report_resume_changes(const TrainState& loaded, const std::string& path) const {
  for (const std::string& change : setting_changes(loaded.config_json, state_.config_json))
    std::cerr << "fastllm train: warning: resuming " << path << " with " << change
              << "; the run does not continue as it was\n";
  // With --lr_decay_iters=0 the decay ends at --train_iters: another value reshapes it.
  const nlohmann::json saved = nlohmann::json::parse(loaded.config_json, nullptr, false);
  if (!saved.is_object() || !saved.contains("train_iters") || !saved.contains("lr_decay_iters") ||
      s_.schedule.style == DecayStyle::Constant || options_.get_int("lr_decay_iters") != 0)
    return;
  std::int64_t before = 0, decay_before = 0;
  try {
    before = std::stoll(json_text(saved["train_iters"]));
    decay_before = std::stoll(json_text(saved["lr_decay_iters"]));
  } catch (const std::exception&) {
    return;
  }
  if (decay_before != 0 || before == s_.train_iters) return;
  LrSchedule old = s_.schedule;
  old.decay_iters = before;
  std::cerr << "fastllm train: warning: --train_iters=" << s_.train_iters
            << " (the checkpoint's run: " << before
            << ") with --lr_decay_iters=0 moves the end of the "
            << options_.get_string("lr_decay_style") << " decay from iteration " << before << " to "
            << s_.train_iters << ": the learning rate at iteration " << loaded.iteration << " is "
            << s_.schedule.at(loaded.iteration) << " instead of " << old.at(loaded.iteration)
            << "; set --lr_decay_iters=" << before << " to keep the checkpoint's schedule\n";
}

// Drops the metrics records this run repeats and marks where it starts.
void Trainer::mark_start() {
  if (s_.save.empty()) return;
  on_rank0([&] { drop_metrics_after(fs::path(s_.save) / "metrics.jsonl", state_.iteration); });
  nlohmann::ordered_json line = {{"event", loaded_from_.empty() ? "start" : "resume"},
                                 {"iteration", state_.iteration},
                                 {"time", iso_time_now()}};
  line["from"] = !loaded_from_.empty()  ? nlohmann::ordered_json(loaded_from_)
                 : config_.load_weights ? nlohmann::ordered_json(config_.checkpoint_path)
                                        : nullptr;
  record(line);
}

// The tokenizer and prompt of --sample_interval, before the first iteration.
void Trainer::prepare_samples() {
  if (s_.sample_interval == 0) return;
  std::string path = s_.tokenizer;
  if (path.empty() && !config_.checkpoint_path.empty() &&
      fs::is_regular_file(fs::path(config_.checkpoint_path) / "tokenizer.model"))
    path = config_.checkpoint_path;
  if (path.empty())
    throw UserError("--sample_interval=" + std::to_string(s_.sample_interval) +
                    " needs a tokenizer: pass --tokenizer=tokenizer.model (" +
                    (config_.checkpoint_path.empty()
                         ? std::string("no --pretrained_checkpoint_path to take one from")
                         : config_.checkpoint_path + " has no tokenizer.model") +
                    "), or set --sample_interval=0");
  // Rank 0 first, so that a bad file is reported once.
  on_rank0([&] { tokenizer_.emplace(path); });
  if (!rank0()) tokenizer_.emplace(path);
  if (tokenizer_->vocab_size() > config_.arch.vocab_size)
    throw UserError("--tokenizer=" + tokenizer_->path() + " has " +
                    std::to_string(tokenizer_->vocab_size()) + " pieces, more than the model's " +
                    std::to_string(config_.arch.vocab_size) + " (vocab_size)");
  sample_ids_.clear();
  if (tokenizer_->bos_id() >= 0) sample_ids_.push_back(tokenizer_->bos_id());
  const std::vector<std::int32_t> text = tokenizer_->encode(s_.sample_prompt);
  sample_ids_.insert(sample_ids_.end(), text.begin(), text.end());
  const std::int64_t positions = static_cast<std::int64_t>(sample_ids_.size()) + s_.sample_tokens;
  const std::int64_t limit = config_.run.max_sequence_length;
  if (limit > 0 && positions > limit)
    throw UserError("--sample_prompt has " + std::to_string(sample_ids_.size()) +
                    " tokens; with --sample_tokens=" + std::to_string(s_.sample_tokens) +
                    " that is " + std::to_string(positions) + " positions, more than the model's " +
                    std::to_string(limit) + " (max_sequence_length)");
}

// Collective: every rank of every model replica generates (the replicas hold the same weights, so
// each computes the same tokens); rank 0 prints and records them.
void Trainer::sample(std::int64_t iteration) {
  Generator generator(model_, config_.run,
                      topo_.pipeline->size() > 1 ? topo_.pipeline.get() : nullptr);
  GenerationSettings settings;
  settings.max_new_tokens = s_.sample_tokens;
  settings.eos_ids = {tokenizer_->eos_id()};
  std::vector<std::int32_t> tokens = generator.generate(sample_ids_, settings);
  if (!tokens.empty() && tokens.back() == tokenizer_->eos_id()) tokens.pop_back();
  // Decoded with the prompt, so that the space between them is kept.
  std::vector<std::int32_t> text(sample_ids_.begin(), sample_ids_.end());
  if (!text.empty() && text.front() == tokenizer_->bos_id()) text.erase(text.begin());
  text.insert(text.end(), tokens.begin(), tokens.end());
  // A model whose vocabulary outgrows the tokenizer's can pick ids it cannot decode: "<id>".
  std::string decoded;
  std::vector<std::int32_t> run;
  for (std::size_t i = 0; i <= text.size(); ++i) {
    if (i < text.size() && text[i] < tokenizer_->vocab_size()) {
      run.push_back(text[i]);
      continue;
    }
    decoded += tokenizer_->decode(run);
    run.clear();
    if (i == text.size()) break;
    decoded.push_back('<');
    decoded.append(std::to_string(text[i]));
    decoded.push_back('>');
  }
  record({{"iteration", iteration}, {"sample", decoded}});
  if (rank0()) std::cout << "sample: " << decoded << std::endl;
}

void Trainer::step(std::int64_t iteration) {
  const int dp = topo_.layout.data_parallel;
  const std::int64_t accumulation = s_.batch_size / (dp * s_.micro_batch_size);
  const std::vector<MicroBatch> batches =
      read_micro_batches(*train_data_, state_.consumed_samples, accumulation, topo_.at.dp, dp,
                         s_.micro_batch_size, !config_.run.cross_document_attention);
  double local_predicted = 0;
  for (const MicroBatch& mb : batches) {
    for (auto t : mb.targets)
      local_predicted += t >= 0;
  }
  double predicted = 0;
  MPI_Allreduce(&local_predicted, &predicted, 1, MPI_DOUBLE, MPI_SUM, topo_.data.comm());
  if (predicted == 0)
    throw UserError("iteration " + std::to_string(iteration) +
                    ": the global batch has no token to predict");
  const double coeff = config_.arch.is_moe() ? config_.run.moe_aux_loss_coeff : 0.0;
  const double micro_batches = static_cast<double>(accumulation * dp);

  // The fused update clears the gradients it read (the model's without ZeRO, this rank's shard
  // with it); the model's flat gradients under ZeRO-1 and anything a skipped step left are cleared
  // here.
  const Tensor shard = optimizer_.gradient_shard();
  if (!gradients_cleared_ || shard.data) model_.zero_grads();
  if (!gradients_cleared_ && model_.gradient_buckets()) backend_.fill(shard, 0.0f);
  const PipelineTotals totals =
      pipeline_.forward_backward(batches, 1.0 / predicted, coeff / micro_batches);
  finalize_gradients(model_, topo_, optimizer_.gradient_shard());
  const GlobalLoss loss = global_loss(totals, topo_);
  step_loss_ = loss.ce_sum / predicted + coeff * loss.aux_sum / micro_batches;
  step_aux_loss_ = loss.aux_sum / micro_batches;
  step_expert_load_ = loss.expert_load_sum;
  for (double& l : step_expert_load_)
    l /= micro_batches;
  step_grad_norm_ = std::sqrt(allreduce_sum(optimizer_.grad_sum_squares()));
  // The same values on every rank, so all skip together; a skipped step changes no weight.
  step_skipped_ = !std::isfinite(step_loss_) || !std::isfinite(step_grad_norm_);
  if (!step_skipped_) {
    // torch.nn.utils.clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)).
    const double scale =
        s_.clip_grad > 0 ? std::min(1.0, s_.clip_grad / (step_grad_norm_ + 1e-6)) : 1.0;
    optimizer_.step(s_.schedule.at(iteration), scale, /*zero_grads=*/true);
  }
  gradients_cleared_ = !step_skipped_;
  state_.consumed_samples += s_.batch_size;
  state_.iteration = iteration + 1;
}

std::optional<double> Trainer::evaluate() {
  const int dp = topo_.layout.data_parallel;
  const std::int64_t accumulation = s_.batch_size / (dp * s_.micro_batch_size);
  PipelineTotals totals;
  for (std::int64_t i = 0; i < s_.eval_iters; ++i) {
    if (stop_requested()) return std::nullopt;
    const PipelineTotals batch = pipeline_.forward(
        read_micro_batches(*valid_data_, i * s_.batch_size, accumulation, topo_.at.dp, dp,
                           s_.micro_batch_size, !config_.run.cross_document_attention));
    totals.ce_sum += batch.ce_sum;
    totals.predicted += batch.predicted;
  }
  const GlobalLoss loss = global_loss(totals, topo_);
  return loss.ce_sum / std::max<double>(1.0, static_cast<double>(loss.predicted));
}

void Trainer::save(std::int64_t iteration) {
  if (s_.save.empty()) return;
  if (iteration != state_.iteration)
    throw std::logic_error("save: checkpoint " + std::to_string(iteration) + " of state at " +
                           std::to_string(state_.iteration));
  const std::string path = (fs::path(s_.save) / checkpoint_name(iteration)).string();
  // A complete checkpoint is never replaced; one that failed to load is moved aside.
  on_rank0([&] {
    if (!fs::exists(path)) return;
    if (rejected_.count(path) == 0)
      throw UserError(path + " already exists; a complete checkpoint is never overwritten");
    std::error_code error;
    fs::rename(path, path + ".corrupt", error);
    if (error) throw UserError("cannot move the unreadable " + path + " aside: " + error.message());
    std::cerr << "fastllm train: moved the unreadable " << path << " to " << path << ".corrupt\n";
  });
  save_checkpoint(path, model_, &optimizer_, state_, checkpoint_ranks());
  if (rank0()) {
    std::cout << "saved " << path << "\n";
    for (const std::string& old :
         checkpoints_to_rotate(s_.save, s_.keep_checkpoints, path, iteration, rejected_)) {
      std::error_code ignored;
      fs::remove(old, ignored);
    }
  }
}

// Collective: a write that fails (a full disk) stops every rank.
void Trainer::record(const nlohmann::ordered_json& line) {
  if (s_.save.empty()) return;
  on_rank0([&] {
    const fs::path path = fs::path(s_.save) / "metrics.jsonl";
    std::error_code error;
    const std::uintmax_t before = fs::exists(path, error) ? fs::file_size(path, error) : 0;
    std::ofstream out(path, std::ios::app);
    out << line.dump() << "\n";
    out.flush();
    if (!out) {
      // No half line for readers of the file to trip on.
      out.close();
      fs::resize_file(path, before, error);
      throw UserError("cannot write " + path.string() + " (the disk may be full)");
    }
  });
}

void Trainer::log(std::int64_t iteration, double loss, double aux_loss,
                  const std::vector<double>& expert_load, double lr, double grad_norm,
                  double seconds) {
  const double step_seconds =
      seconds / static_cast<double>(std::max<std::int64_t>(1, interval_iterations_));
  const double tokens_per_s =
      static_cast<double>(s_.batch_size * s_.sequence_length) / std::max(step_seconds, 1e-12);
  const double flops =
      model_flops_per_token(config_.arch, s_.sequence_length, config_.run.window_size);
  const double tflops = flops * tokens_per_s / mpi_.size() / 1e12;
  const double eta = step_seconds * static_cast<double>(s_.train_iters - iteration);
  nlohmann::ordered_json line = {{"iteration", iteration},
                                 {"consumed_samples", state_.consumed_samples},
                                 {"loss", loss},
                                 {"lr", lr},
                                 {"grad_norm", grad_norm},
                                 {"tokens_per_second", tokens_per_s},
                                 {"tflops_per_device", tflops},
                                 {"step_seconds", step_seconds}};
  line["mfu"] = s_.peak_tflops > 0 ? nlohmann::ordered_json(tflops / s_.peak_tflops) : nullptr;
  if (config_.arch.is_moe()) {
    line["aux_loss"] = aux_loss;
    line["expert_load"] = expert_load;
  }
  // The largest of all ranks: the one that runs out first.
  double peaks[2] = {host_peak_bytes(), -1.0};
#if FASTLLM_HAVE_CUDA
  if (options_.get_string("backend") == "cuda")
    peaks[1] = static_cast<double>(cuda_memory_stats(backend_).peak);
#endif
  MPI_Allreduce(MPI_IN_PLACE, peaks, 2, MPI_DOUBLE, MPI_MAX, mpi_.world());
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  line["elapsed_seconds"] = elapsed;
  line["time"] = iso_time_now();
  line["host_peak_bytes"] = peaks[0];
  line["device_peak_bytes"] = peaks[1] >= 0 ? nlohmann::ordered_json(peaks[1]) : nullptr;
  record(line);
  if (!rank0()) return;
  const double gib = 1024.0 * 1024.0 * 1024.0;
  char text[480];
  std::snprintf(text, sizeof text,
                "iteration %6lld/%lld | loss %.5f | lr %.3e | grad norm %.4f | %.0f tokens/s | "
                "%.3f TFLOP/s/device | MFU %s | elapsed %s | ETA %s",
                static_cast<long long>(iteration), static_cast<long long>(s_.train_iters), loss, lr,
                grad_norm, tokens_per_s, tflops,
                s_.peak_tflops > 0
                    ? (std::to_string(100 * tflops / s_.peak_tflops).substr(0, 5) + "%").c_str()
                    : "-",
                duration(elapsed).c_str(), duration(eta).c_str());
  std::string extra;
  char part[96];
  if (config_.arch.is_moe()) {
    // Relative to an even share: 1/1 is perfect balance; 0 is an expert no token chose.
    const auto [least, most] = std::minmax_element(expert_load.begin(), expert_load.end());
    const double even = static_cast<double>(expert_load.size());
    std::snprintf(part, sizeof part, " | aux loss %.5f | expert load min/max %.2f/%.2f", aux_loss,
                  *least * even, *most * even);
    extra += part;
  }
  std::snprintf(part, sizeof part, " | peak memory host %.2f GiB", peaks[0] / gib);
  extra += part;
  if (peaks[1] >= 0) {
    std::snprintf(part, sizeof part, ", device %.2f GiB", peaks[1] / gib);
    extra += part;
  }
  std::cout << text << extra << std::endl;
}

void Trainer::report_evaluation(std::int64_t iteration) {
  const std::optional<double> evaluated = evaluate();
  if (!evaluated) {
    if (rank0())
      std::cout << "iteration " << iteration << " | validation interrupted by a signal\n";
    return;
  }
  const double eval_loss = *evaluated;
  record({{"iteration", iteration}, {"eval_loss", eval_loss}});
  if (rank0())
    std::cout << "iteration " << iteration << " | validation loss " << eval_loss << std::endl;
}

void Trainer::open_data() {
  train_data_ = std::make_unique<DataSampler>(s_.data, DataSplit::kTrain);
  if (train_data_->empty())
    throw UserError("--split=" + options_.get_string("split") +
                    ": the training split holds no document");
  if (s_.eval_interval > 0) {
    valid_data_ = std::make_unique<DataSampler>(s_.data, DataSplit::kValid);
    if (valid_data_->empty()) {
      if (rank0()) std::cerr << "fastllm train: the validation split is empty; no evaluation\n";
      valid_data_.reset();
    }
  }
}

void Trainer::announce_run() {
  if (s_.save.empty()) return;
  // Checkpoints of --save past this one would be overwritten by this run's.
  on_rank0([&] {
    for (const std::string& path : list_checkpoints(s_.save)) {
      const std::optional<std::int64_t> named = iteration_in_name(path);
      if (rejected_.count(path) == 0 && named && *named > state_.iteration)
        throw UserError("--save=" + s_.save + " holds " + path + ", past the iteration " +
                        std::to_string(state_.iteration) + " this run starts from" +
                        (s_.load.empty()
                             ? std::string(" (no --load was given, so it would train from "
                                           "iteration 0 and overwrite them)")
                             : std::string()) +
                        "; nothing was trained: pass --load=" + s_.save +
                        " to resume it, or save to another folder");
    }
  });
  on_rank0([&] {
    const fs::path path = fs::path(s_.save) / "config.json";
    std::ofstream out(path);
    out << nlohmann::json::parse(state_.config_json).dump(1) << "\n";
    out.flush();
    if (!out) throw UserError("cannot write " + path.string() + " (the disk may be full)");
  });
  if (rank0()) {
    const Layout& l = topo_.layout;
    std::cout << "model: " << count_parameters(config_.arch).total << " parameters; layout data "
              << l.data_parallel << " x tensor " << l.tensor_parallel << " x pipeline "
              << l.pipeline_parallel << ", ZeRO stage " << l.zero_stage
              << (l.sequence_parallel ? ", sequence parallel" : "") << "; batch " << s_.batch_size
              << " x " << s_.sequence_length << " tokens" << std::endl;
  }
}

void Trainer::count_skipped_step(std::int64_t done) {
  ++skipped_in_a_row_;
  ++skipped_total_;
  record({{"iteration", done},
          {"skipped", true},
          {"loss", step_loss_},
          {"grad_norm", step_grad_norm_},
          {"skipped_in_a_row", skipped_in_a_row_},
          {"skipped_total", skipped_total_}});
  if (rank0())
    std::cout << "iteration " << done << " | loss " << step_loss_ << " | grad norm "
              << step_grad_norm_ << " | not finite: step skipped (" << skipped_in_a_row_
              << " in a row, " << skipped_total_ << " in all)" << std::endl;
  if (s_.max_skipped_steps > 0 && skipped_in_a_row_ >= s_.max_skipped_steps) {
    const std::vector<std::string> kept =
        s_.save.empty() ? std::vector<std::string>{} : list_checkpoints(s_.save);
    throw UserError(
        "stopping at iteration " + std::to_string(done) + ": " + std::to_string(skipped_in_a_row_) +
        " steps in a row had a non-finite loss or gradient norm (--max_skipped_steps=" +
        std::to_string(s_.max_skipped_steps) + "); the training diverged. Nothing was saved; " +
        (kept.empty() ? std::string("no checkpoint was kept")
                      : "the last checkpoint is " + kept.back()) +
        ". Lower --lr or raise --lr_warmup_iters and resume from it");
  }
}

int Trainer::run() {
  prepare_save_folder();
  open_data();
  restore();
  if (state_.iteration >= s_.train_iters) {
    if (rank0())
      std::cout << "nothing to train: " << loaded_from_ << " is at iteration " << state_.iteration
                << " and --train_iters=" << s_.train_iters << "\n";
    return 0;
  }
  announce_run();

  mark_start();
  prepare_samples();
  // The starting point of the validation curve.
  if (valid_data_ && state_.iteration == 0) report_evaluation(0);
  if (stop_requested()) {
    if (rank0()) std::cout << "signal: stopping before the first iteration; nothing to save\n";
    return 0;
  }
  interval_start_ = std::chrono::steady_clock::now();
  double loss_sum = 0, aux_sum = 0;
  std::vector<double> load_sum(static_cast<std::size_t>(config_.arch.num_experts), 0.0);
  std::int64_t losses = 0;
  for (std::int64_t it = state_.iteration; it < s_.train_iters; ++it) {
    const double lr = s_.schedule.at(it);
    step(it);
    ++interval_iterations_;
    const std::int64_t done = it + 1;
    if (step_skipped_) {
      count_skipped_step(done);
    } else {
      skipped_in_a_row_ = 0;
      loss_sum += step_loss_;
      aux_sum += step_aux_loss_;
      for (std::size_t e = 0; e < load_sum.size(); ++e)
        load_sum[e] += step_expert_load_[e];
      ++losses;
    }
    if (done % s_.log_interval == 0 || done == s_.train_iters) {
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - interval_start_).count();
      const double nan = std::numeric_limits<double>::quiet_NaN();
      const double loss = losses > 0 ? loss_sum / static_cast<double>(losses) : nan;
      const double aux = losses > 0 ? aux_sum / static_cast<double>(losses) : nan;
      std::vector<double> load = load_sum;
      for (double& l : load)
        l = losses > 0 ? l / static_cast<double>(losses) : nan;
      log(done, loss, aux, load, lr, step_grad_norm_, seconds);
      loss_sum = 0;
      aux_sum = 0;
      std::fill(load_sum.begin(), load_sum.end(), 0.0);
      losses = 0;
      interval_iterations_ = 0;
      interval_start_ = std::chrono::steady_clock::now();
    }
    if (valid_data_ && done % s_.eval_interval == 0) report_evaluation(done);
    if (s_.sample_interval > 0 && done % s_.sample_interval == 0) sample(done);
    if (stop_requested()) {
      if (rank0()) std::cout << "signal: saving and stopping at iteration " << done << "\n";
      save(done);
      return 0;
    }
    if (s_.save_interval > 0 && done % s_.save_interval == 0 && done != s_.train_iters) save(done);
  }
  save(s_.train_iters);
  return 0;
}

}  // namespace

TrainSettings train_settings(const Options& o, const ModelConfig& model) {
  TrainSettings s;
  s.train_iters = required_positive(o, "train_iters");
  s.batch_size = required_positive(o, "batch_size");
  s.micro_batch_size = required_positive(o, "micro_batch_size");
  s.sequence_length = required_positive(o, "sequence_length");
  s.recompute = parse_recompute(o.get_string("recompute"));
  if (model.run.max_sequence_length > 0 && s.sequence_length > model.run.max_sequence_length)
    throw UserError("--sequence_length=" + std::to_string(s.sequence_length) +
                    " exceeds the model's --max_sequence_length=" +
                    std::to_string(model.run.max_sequence_length));
  s.schedule.lr = o.get_float("lr");
  s.schedule.min_lr = o.get_float("min_lr");
  s.schedule.warmup_iters = o.get_int("lr_warmup_iters");
  s.schedule.style = parse_decay_style(o.get_string("lr_decay_style"));
  s.schedule.decay_iters =
      o.get_int("lr_decay_iters") > 0 ? o.get_int("lr_decay_iters") : s.train_iters;
  if (s.schedule.warmup_iters < 0)
    throw UserError("--lr_warmup_iters=" + std::to_string(s.schedule.warmup_iters) +
                    ": expected >= 0");
  if (s.schedule.style != DecayStyle::Constant && s.schedule.decay_iters <= s.schedule.warmup_iters)
    throw UserError("--lr_decay_iters=" + std::to_string(s.schedule.decay_iters) +
                    " must exceed --lr_warmup_iters=" + std::to_string(s.schedule.warmup_iters));
  s.adamw.beta1 = o.get_float("adam_beta1");
  s.adamw.beta2 = o.get_float("adam_beta2");
  s.adamw.eps = o.get_float("adam_eps");
  s.adamw.weight_decay = o.get_float("weight_decay");
  s.clip_grad = o.get_float("clip_grad");
  s.seed = static_cast<std::uint64_t>(o.get_int("seed"));
  s.init_std = o.get_float("init_std");
  s.log_interval = required_positive(o, "log_interval");
  s.eval_interval = o.get_int("eval_interval");
  s.eval_iters = o.get_int("eval_iters");
  s.peak_tflops = o.get_float("peak_tflops");
  // Values outside these ranges make AdamW divide by zero, never forget, or climb the loss.
  auto check_range = [&](const char* flag, bool ok, const char* allowed) {
    if (!ok)
      throw UserError("--" + std::string(flag) + "=" + o.get_string(flag) + ": expected " +
                      allowed);
  };
  check_range("lr", s.schedule.lr >= 0, ">= 0");
  check_range("min_lr", s.schedule.min_lr >= 0, ">= 0");
  check_range("adam_beta1", s.adamw.beta1 >= 0 && s.adamw.beta1 < 1, "a value in [0, 1)");
  check_range("adam_beta2", s.adamw.beta2 >= 0 && s.adamw.beta2 < 1, "a value in [0, 1)");
  check_range("adam_eps", s.adamw.eps > 0, "> 0");
  check_range("weight_decay", s.adamw.weight_decay >= 0, ">= 0");
  check_range("clip_grad", s.clip_grad >= 0, ">= 0 (0 = no clipping)");
  // The host backend holds fp32 weights, gradients and two AdamW moments, 16 bytes a parameter,
  // split at best over tensor x pipeline ranks; a model beyond the machine's memory would
  // otherwise be found by the kernel's OOM killer, minutes in.
  if (o.get_string("backend") == "host") {
    const std::int64_t parts =
        std::max<std::int64_t>(1, o.get_int("tensor_parallel") * o.get_int("pipeline_parallel"));
    const double need = 16.0 * static_cast<double>(count_parameters(model.arch).total) / parts;
    std::ifstream meminfo("/proc/meminfo");
    std::string key;
    double kib = 0;
    while (meminfo >> key >> kib && key != "MemTotal:")
      meminfo.ignore(256, '\n');
    const double gib = 1024.0 * 1024 * 1024;
    if (key == "MemTotal:" && need > kib * 1024)
      throw UserError("the model (--num_layers=" + std::to_string(model.arch.num_layers) +
                      " --hidden_size=" + std::to_string(model.arch.hidden_size) +
                      " --ffn_hidden_size=" + std::to_string(model.arch.ffn_hidden_size) +
                      " --vocab_size=" + std::to_string(model.arch.vocab_size) + ") needs " +
                      std::to_string(need / gib) + " GiB per rank on the host backend, but " +
                      "this machine has " + std::to_string(kib * 1024 / gib) +
                      " GiB; lower a size or split the model over more ranks");
  }
  if (s.eval_interval < 0)
    throw UserError("--eval_interval=" + std::to_string(s.eval_interval) +
                    ": expected >= 0 (0 = no evaluation)");
  if (s.eval_interval > 0 && s.eval_iters < 1)
    throw UserError("--eval_iters=" + std::to_string(s.eval_iters) +
                    ": expected >= 1 while --eval_interval=" + std::to_string(s.eval_interval) +
                    " evaluates (or set --eval_interval=0)");

  const std::vector<std::string> paths = o.get_list("data_path");
  if (paths.empty()) throw UserError("--data_path is required: one or more indexed datasets");
  s.data.sources = parse_data_path(paths);
  s.data.split = parse_split(o.get_string("split"));
  if (s.eval_interval > 0 && s.data.split[1] == 0)
    throw UserError("--split=" + o.get_string("split") +
                    " gives the validation split no share, but --eval_interval=" +
                    std::to_string(s.eval_interval) +
                    " evaluates on it; give it a share or set --eval_interval=0");
  s.data.sequence_length = s.sequence_length;
  s.data.mode = parse_sampling_mode(o.get_string("data_sampling"));
  s.data.shuffle = o.get_bool("data_shuffle");
  s.data.seed = s.seed;
  s.data.vocab_size = model.arch.vocab_size;

  s.save = o.get_string("save");
  s.load = o.get_string("load");
  s.save_interval = o.get_int("save_interval");
  s.keep_checkpoints = o.get_int("keep_checkpoints");
  s.max_skipped_steps = o.get_int("max_skipped_steps");
  if (s.max_skipped_steps < 0)
    throw UserError("--max_skipped_steps=" + std::to_string(s.max_skipped_steps) +
                    ": expected >= 0 (0: never stop)");
  s.sample_interval = o.get_int("sample_interval");
  s.sample_tokens = o.get_int("sample_tokens");
  s.sample_prompt = o.get_string("sample_prompt");
  s.tokenizer = o.get_string("tokenizer");
  if (s.sample_interval < 0)
    throw UserError("--sample_interval=" + std::to_string(s.sample_interval) +
                    ": expected >= 0 (0 = no samples)");
  if (s.sample_tokens < 1)
    throw UserError("--sample_tokens=" + std::to_string(s.sample_tokens) + ": expected >= 1");
  return s;
}

int train(const Options& options, const ModelConfig& model, const TrainSettings& settings) {
  // From the start, so that a scheduler's signal during start-up still ends in a checkpoint.
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGUSR1, on_stop_signal);
  // A write past the file size limit (ulimit -f) then fails with EFBIG and is reported, rather
  // than killing the rank.
  std::signal(SIGXFSZ, SIG_IGN);
  MpiSession mpi;
  // Every rank checks the same things before any work, so a bad layout fails everywhere at once.
  const Layout layout = resolve_layout(options, mpi.size(), model.arch);
  layout.validate_sequence(settings.sequence_length, "--sequence_length");
  const std::int64_t per_step =
      static_cast<std::int64_t>(layout.data_parallel) * settings.micro_batch_size;
  if (settings.batch_size % per_step != 0)
    throw UserError("--batch_size=" + std::to_string(settings.batch_size) +
                    " is not a multiple of data-parallel ranks x --micro_batch_size = " +
                    std::to_string(layout.data_parallel) + " x " +
                    std::to_string(settings.micro_batch_size));
  const std::unique_ptr<Backend> backend = backend_from_flags(options);
  const Topology topology =
      make_topology(layout, model.arch, mpi.world(), communicator_factory(*backend));
  TrainSettings resolved = settings;
  resolved.peak_tflops = peak_tflops(options, *backend);
  Trainer trainer(options, model, resolved, mpi, topology, *backend);
  return trainer.run();
}

}  // namespace fastllm
