#include "train/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "io/error.h"
#include "model/hf_weights.h"
#include "parallel/backend_setup.h"
#include "parallel/mpi_session.h"
#include "parallel/pipeline.h"
#include "parallel/topology.h"
#include "train/checkpoint.h"

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

// One data-parallel rank's share of a step: its micro-batches, read before any compute so that
// the number of predicted tokens of the whole global batch is known for the loss normalisation.
std::vector<MicroBatch> read_micro_batches(const DataSampler& sampler, std::int64_t first_sample,
                                           std::int64_t steps, int dp_rank, int dp_size,
                                           std::int64_t micro_batch_size) {
  const std::int64_t seq = sampler.sequence_length();
  std::vector<MicroBatch> out(static_cast<std::size_t>(steps));
  for (std::int64_t m = 0; m < steps; ++m) {
    MicroBatch& mb = out[m];
    mb.batch = micro_batch_size;
    mb.seq = seq;
    mb.input_ids.resize(static_cast<std::size_t>(micro_batch_size * seq));
    mb.targets.resize(mb.input_ids.size());
    const std::int64_t first =
        micro_batch_first_sample(first_sample, m, dp_rank, dp_size, micro_batch_size);
    for (std::int64_t b = 0; b < micro_batch_size; ++b) {
      sampler.sample(first + b, std::span(mb.input_ids).subspan(b * seq, seq),
                     std::span(mb.targets).subspan(b * seq, seq));
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
        model_(backend_, model.arch, model.run, model_partition(topology)),
        optimizer_(backend_, model_, settings.adamw, topology.data.get(),
                   topology.layout.zero_stage == 1),
        pipeline_(model_, topology.pipeline->size() > 1 ? topology.pipeline.get() : nullptr) {}

  int run();

 private:
  bool rank0() const { return mpi_.rank() == 0; }
  void restore();
  void step(std::int64_t iteration);
  double evaluate();
  void report_evaluation(std::int64_t iteration);
  void save(std::int64_t iteration);
  void log(std::int64_t iteration, double loss, double lr, double grad_norm, double seconds);
  void record(const nlohmann::ordered_json& line);
  double allreduce_sum(double value) const;
  // The sum over the data-parallel replicas of what the last stage's first tensor-parallel rank
  // holds (the loss sums), on every rank.
  double loss_sum(double value) const;
  CheckpointRanks checkpoint_ranks() const;

  const Options& options_;
  const ModelConfig& config_;
  TrainSettings s_;
  MpiSession& mpi_;
  const Topology& topo_;
  Backend& backend_;
  Model model_;
  AdamW optimizer_;
  Pipeline pipeline_;
  std::unique_ptr<DataSampler> train_data_, valid_data_;
  TrainState state_;
  double step_loss_ = 0, step_grad_norm_ = 0;
  std::chrono::steady_clock::time_point interval_start_;
  std::int64_t interval_iterations_ = 0;
};

double Trainer::allreduce_sum(double value) const {
  double out = 0;
  MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, MPI_SUM, mpi_.world());
  return out;
}

double Trainer::loss_sum(double value) const {
  return allreduce_sum(topo_.last_stage() && topo_.tp_rank == 0 ? value : 0.0);
}

CheckpointRanks Trainer::checkpoint_ranks() const {
  CheckpointRanks ranks;
  ranks.world = mpi_.world();
  ranks.dp_rank = topo_.dp_rank;
  ranks.dp_size = topo_.layout.data_parallel;
  return ranks;
}

void Trainer::restore() {
  state_.seed = s_.seed;
  state_.config_json = config_json(options_, config_);
  std::vector<std::string> found;
  if (!s_.load.empty()) {
    if (fs::is_directory(s_.load)) {
      found = list_checkpoints(s_.load);
    } else if (fs::exists(s_.load)) {
      found = {s_.load};
    }
    if (found.empty() && rank0())
      std::cerr << "fastllm train: no checkpoint in --load=" << s_.load << "; starting fresh\n";
  }
  // Newest first; an unreadable file (a save killed half-way, a truncated copy) is reported and
  // the one before it used, but a readable checkpoint of another model is an error.
  for (auto it = found.rbegin(); it != found.rend(); ++it) {
    std::optional<Architecture> stored;
    try {
      stored = checkpoint_architecture(*it, mpi_.world());
    } catch (const UserError& e) {
      if (rank0()) std::cerr << "fastllm train: skipping " << *it << ": " << e.what() << "\n";
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
      if (rank0())
        std::cout << "resumed from " << *it << " at iteration " << state_.iteration << "\n";
      return;
    } catch (const UserError& e) {
      if (rank0()) std::cerr << "fastllm train: skipping " << *it << ": " << e.what() << "\n";
    }
  }
  if (config_.load_weights) {
    load_hf_weights(model_, config_.checkpoint_path);
  } else {
    model_.initialize(s_.seed, s_.init_std);
  }
  optimizer_.model_to_master();
}

void Trainer::step(std::int64_t iteration) {
  const int dp = topo_.layout.data_parallel;
  const std::int64_t accumulation = s_.batch_size / (dp * s_.micro_batch_size);
  const std::vector<MicroBatch> batches = read_micro_batches(
      *train_data_, state_.consumed_samples, accumulation, topo_.dp_rank, dp, s_.micro_batch_size);
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

  model_.zero_grads();
  const PipelineTotals totals =
      pipeline_.forward_backward(batches, 1.0 / predicted, coeff / micro_batches);
  sync_replicated_gradients(model_, topo_);
  optimizer_.reduce_gradients();
  step_loss_ =
      loss_sum(totals.ce_sum) / predicted + coeff * loss_sum(totals.aux_sum) / micro_batches;
  step_grad_norm_ = std::sqrt(allreduce_sum(optimizer_.grad_sum_squares()));
  // torch.nn.utils.clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)).
  const double scale =
      s_.clip_grad > 0 ? std::min(1.0, s_.clip_grad / (step_grad_norm_ + 1e-6)) : 1.0;
  optimizer_.step(s_.schedule.at(iteration), scale);
  state_.consumed_samples += s_.batch_size;
  state_.iteration = iteration + 1;
}

double Trainer::evaluate() {
  const int dp = topo_.layout.data_parallel;
  const std::int64_t accumulation = s_.batch_size / (dp * s_.micro_batch_size);
  double ce = 0, predicted = 0;
  for (std::int64_t i = 0; i < s_.eval_iters; ++i) {
    const PipelineTotals totals = pipeline_.forward(read_micro_batches(
        *valid_data_, i * s_.batch_size, accumulation, topo_.dp_rank, dp, s_.micro_batch_size));
    ce += totals.ce_sum;
    predicted += static_cast<double>(totals.predicted);
  }
  return loss_sum(ce) / std::max(1.0, loss_sum(predicted));
}

void Trainer::save(std::int64_t iteration) {
  if (s_.save.empty()) return;
  const std::string path = (fs::path(s_.save) / checkpoint_name(iteration)).string();
  save_checkpoint(path, model_, &optimizer_, state_, checkpoint_ranks());
  if (rank0()) {
    std::cout << "saved " << path << "\n";
    const auto all = list_checkpoints(s_.save);
    for (std::size_t i = 0;
         s_.keep_checkpoints > 0 && i + static_cast<std::size_t>(s_.keep_checkpoints) < all.size();
         ++i)
      fs::remove(all[i]);
  }
}

void Trainer::record(const nlohmann::ordered_json& line) {
  if (!rank0() || s_.save.empty()) return;
  std::ofstream(fs::path(s_.save) / "metrics.jsonl", std::ios::app) << line.dump() << "\n";
}

void Trainer::log(std::int64_t iteration, double loss, double lr, double grad_norm,
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
  record(line);
  if (!rank0()) return;
  char text[320];
  std::snprintf(text, sizeof text,
                "iteration %6lld/%lld | loss %.5f | lr %.3e | grad norm %.4f | %.0f tokens/s | "
                "%.3f TFLOP/s/device | MFU %s | ETA %s",
                static_cast<long long>(iteration), static_cast<long long>(s_.train_iters), loss, lr,
                grad_norm, tokens_per_s, tflops,
                s_.peak_tflops > 0
                    ? (std::to_string(100 * tflops / s_.peak_tflops).substr(0, 5) + "%").c_str()
                    : "-",
                duration(eta).c_str());
  std::cout << text << std::endl;
}

void Trainer::report_evaluation(std::int64_t iteration) {
  const double eval_loss = evaluate();
  record({{"iteration", iteration}, {"eval_loss", eval_loss}});
  if (rank0())
    std::cout << "iteration " << iteration << " | validation loss " << eval_loss << std::endl;
}

int Trainer::run() {
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
  restore();
  if (rank0() && !s_.save.empty()) {
    fs::create_directories(s_.save);
    std::ofstream(fs::path(s_.save) / "config.json")
        << nlohmann::json::parse(state_.config_json).dump(1) << "\n";
    const Layout& l = topo_.layout;
    std::cout << "model: " << count_parameters(config_.arch).total << " parameters; layout data "
              << l.data_parallel << " x tensor " << l.tensor_parallel << " x pipeline "
              << l.pipeline_parallel << ", ZeRO-1 " << (l.zero_stage == 1 ? "on" : "off")
              << "; batch " << s_.batch_size << " x " << s_.sequence_length << " tokens\n";
  }

  // The starting point of the validation curve.
  if (valid_data_ && state_.iteration == 0) report_evaluation(0);
  interval_start_ = std::chrono::steady_clock::now();
  double loss_sum = 0;
  for (std::int64_t it = state_.iteration; it < s_.train_iters; ++it) {
    const double lr = s_.schedule.at(it);
    step(it);
    loss_sum += step_loss_;
    ++interval_iterations_;
    const std::int64_t done = it + 1;
    if (done % s_.log_interval == 0 || done == s_.train_iters) {
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - interval_start_).count();
      log(done, loss_sum / static_cast<double>(interval_iterations_), lr, step_grad_norm_, seconds);
      loss_sum = 0;
      interval_iterations_ = 0;
      interval_start_ = std::chrono::steady_clock::now();
    }
    if (valid_data_ && done % s_.eval_interval == 0) report_evaluation(done);
    int stop = g_stop_signal.load();
    MPI_Allreduce(MPI_IN_PLACE, &stop, 1, MPI_INT, MPI_MAX, mpi_.world());
    if (stop) {
      if (rank0())
        std::cout << "signal " << stop << ": saving and stopping at iteration " << done << "\n";
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

  const std::vector<std::string> paths = o.get_list("data_path");
  if (paths.empty()) throw UserError("--data_path is required: one or more indexed datasets");
  s.data.sources = parse_data_path(paths);
  s.data.split = parse_split(o.get_string("split"));
  s.data.sequence_length = s.sequence_length;
  s.data.mode = parse_sampling_mode(o.get_string("data_sampling"));
  s.data.shuffle = o.get_bool("data_shuffle");
  s.data.seed = s.seed;
  s.data.vocab_size = model.arch.vocab_size;

  s.save = o.get_string("save");
  s.load = o.get_string("load");
  s.save_interval = o.get_int("save_interval");
  s.keep_checkpoints = o.get_int("keep_checkpoints");
  return s;
}

int train(const Options& options, const ModelConfig& model, const TrainSettings& settings) {
  // From the start, so that a scheduler's signal during start-up still ends in a checkpoint.
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGUSR1, on_stop_signal);
  MpiSession mpi;
  // Every rank checks the same things before any work, so a bad layout fails everywhere at once.
  const Layout layout = resolve_layout(options, mpi.size(), model.arch);
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
