// The activation memory `fastllm inspect` plans (model/memory_plan.h) against what the host backend
// actually holds at its high-water mark during a forward and backward pass, for dense and MoE
// layers under every recompute mode: within 10%.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "kernels/host/host_backend.h"
#include "model/memory_plan.h"
#include "parallel/pipeline.h"

namespace fastllm::test {
namespace {

Architecture small(bool moe) {
  Architecture a;
  a.num_layers = 3;
  a.hidden_size = 96;
  a.vocab_size = 80;
  a.num_attention_heads = 6;
  a.head_groups = 2;
  a.kv_channels = 16;
  a.ffn_hidden_size = 256;
  a.rotary_embedding_scale = -9.210340371976184;
  if (moe) {
    a.num_experts = 4;
    a.num_experts_per_token = 2;
  }
  return a;
}

MicroBatch batch(std::int64_t b, std::int64_t s, std::int64_t vocab) {
  MicroBatch mb;
  mb.batch = b;
  mb.seq = s;
  std::mt19937 gen(7);
  std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(vocab - 1));
  for (std::int64_t i = 0; i < b * s; ++i)
    mb.input_ids.push_back(token(gen));
  for (std::int64_t i = 0; i < b * s; ++i)
    mb.targets.push_back((i + 1) % s == 0 ? -1 : mb.input_ids[i + 1]);
  return mb;
}

struct Case {
  bool moe;
  Recompute recompute;
};

class MemoryPlan : public ::testing::TestWithParam<Case> {};

TEST_P(MemoryPlan, MatchesTheHostHighWaterMark) {
  const Case c = GetParam();
  const Architecture arch = small(c.moe);
  HostBackend backend;
  RunSettings run;
  run.window_size = 40;
  Model model(backend, arch, run, {}, c.recompute);
  model.initialize(3);
  const MicroBatch mb = batch(2, 120, arch.vocab_size);
  Pipeline pipeline(model);
  const std::size_t before = backend.bytes_in_use();
  backend.reset_peak();
  pipeline.forward_backward({mb}, 1.0 / 238, 0.01);
  const double measured = static_cast<double>(backend.peak_bytes() - before);

  ActivationShape shape;
  shape.micro_batch_size = mb.batch;
  shape.sequence_length = mb.seq;
  shape.recompute = c.recompute;
  shape.dtype_bytes = 4;
  const double planned = activation_memory(arch, Layout{}, 0, shape).total();
  RecordProperty("planned_over_measured", std::to_string(planned / measured));
  EXPECT_NEAR(planned / measured, 1.0, 0.10) << "planned " << planned << ", measured " << measured;
}

INSTANTIATE_TEST_SUITE_P(
    Modes, MemoryPlan,
    ::testing::Values(Case{false, Recompute::None}, Case{false, Recompute::Selective},
                      Case{false, Recompute::Full}, Case{true, Recompute::None},
                      Case{true, Recompute::Selective}, Case{true, Recompute::Full}),
    [](const auto& info) {
      return std::string(info.param.moe ? "moe_" : "dense_") + recompute_name(info.param.recompute);
    });

}  // namespace
}  // namespace fastllm::test
