#pragma once
// The training loop: data-parallel micro-batches with gradient accumulation, AdamW with clipping
// and a learning-rate schedule, progress and metrics on rank 0, validation, greedy samples,
// checkpoints that survive a kill, and a checkpoint on SIGTERM/SIGUSR1.
#include <cstdint>
#include <string>

#include "config/architecture.h"
#include "config/flags.h"
#include "config/layout.h"
#include "data/sampler.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace fastllm {

struct TrainSettings {
  std::int64_t train_iters = 0;
  std::int64_t batch_size = 0;
  std::int64_t micro_batch_size = 1;
  std::int64_t sequence_length = 0;
  Recompute recompute = Recompute::Selective;
  LrSchedule schedule;
  AdamWSettings adamw;
  double clip_grad = 1.0;
  std::uint64_t seed = 1234;
  double init_std = 0.02;
  std::int64_t log_interval = 10;
  std::int64_t eval_interval = 0;
  std::int64_t eval_iters = 10;
  double peak_tflops = 0;
  SamplerConfig data;
  std::string save, load;
  std::int64_t save_interval = 0;
  std::int64_t keep_checkpoints = 3;
  std::int64_t max_skipped_steps = 10;  // 0: never stop
  // Greedy samples every sample_interval iterations (0: none), decoded with `tokenizer` (empty:
  // the pretrained checkpoint folder's tokenizer.model).
  std::int64_t sample_interval = 0;
  std::int64_t sample_tokens = 32;
  std::string sample_prompt, tokenizer;
};

// Reads the Train, Data and Checkpoint flag groups; UserError for missing or inconsistent values.
TrainSettings train_settings(const Options& options, const ModelConfig& model);

// Runs the whole training job on MPI_COMM_WORLD. Returns the process exit code.
int train(const Options& options, const ModelConfig& model, const TrainSettings& settings);

}  // namespace fastllm
