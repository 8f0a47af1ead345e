#pragma once
// The memory one rank needs for a step, before anything is allocated (docs/DESIGN.md section 7):
// what `fastllm inspect` prints against --device_memory. The activation part follows what
// model.cpp keeps for backward under each recompute mode, buffer by buffer; a test holds it to the
// host backend's measured high-water mark.
#include <cstddef>
#include <cstdint>

#include "config/architecture.h"
#include "config/layout.h"
#include "model/model.h"

namespace fastllm {

struct ActivationShape {
  std::int64_t micro_batch_size = 1;
  std::int64_t sequence_length = 0;
  Recompute recompute = Recompute::Selective;
  std::size_t dtype_bytes = 2;  // the compute dtype: 2 for bf16 on CUDA, 4 for fp32
  // Micro-batches whose activations a stage holds at once: with the 1F1B schedule, stage s of P
  // holds P - s of them (fewer when a step has fewer micro-batches).
  std::int64_t in_flight = 1;
};

// Bytes on one rank of pipeline stage `stage` (its tensor-parallel rank 0, the largest share).
struct ActivationMemory {
  double activations = 0;  // what backward keeps of every layer, for every micro-batch in flight
  double logits = 0;       // the last stage's logits, final norm output and loss statistics
  double transient = 0;    // the largest working set of one backward step beyond those
  double total() const { return activations + logits + transient; }
};

ActivationMemory activation_memory(const Architecture& arch, const Layout& layout, int stage,
                                   const ActivationShape& shape);

}  // namespace fastllm
