#pragma once
// What the prepare tests share (one rank and under mpiexec): the options of a run with the test
// tokenizer.
#include <string>
#include <utility>
#include <vector>

#include "data/prepare.h"

namespace fastllm::test {

inline PrepareOptions options_for(std::vector<std::string> inputs, const std::string& output) {
  PrepareOptions o;
  o.inputs = std::move(inputs);
  o.output_prefix = output;
  o.tokenizer = FASTLLM_TEST_TOKENIZER;
  o.progress = false;
  return o;
}

}  // namespace fastllm::test
