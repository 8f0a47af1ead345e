#pragma once
// Errors caused by what the user gave us (a file, a flag, a config): reported as one line,
// exit code 2, before any output is written.
#include <stdexcept>
#include <string>

namespace fastllm {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace fastllm
