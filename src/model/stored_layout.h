#pragma once
// Where each parameter lives in an HDF5 checkpoint (DESIGN.md section 6): one dataset per kind of
// weight with the global shape, a leading layer axis (and an expert axis for MoE), row-parallel
// weights (o_proj, down_proj, w2) stored transposed so that a tensor-parallel slice of them is a
// contiguous block of rows, like the column-parallel ones.
#include <cstdint>
#include <string>
#include <vector>

#include "config/architecture.h"

namespace fastllm {

struct StoredAs {
  std::string dataset;                      // "/model/layers/q"
  std::vector<std::int64_t> dataset_shape;  // global: [L, (E,) rows, cols]
  std::vector<std::int64_t> index;  // leading coordinates of this parameter: {layer(, expert)}
  bool transposed = false;          // stored as the transpose of the Hugging Face [out, in]
};

// Throws std::invalid_argument for a name that is not a parameter of this architecture.
StoredAs stored_as(const Architecture& arch, const std::string& hf_name);

}  // namespace fastllm
