#pragma once
// Parses arguments as `fastllm train` does and converts every value to its flag's type, as the
// commands do later; only UserError may come out.
#include <string>
#include <vector>

#include "config/flags.h"
#include "io/error.h"

namespace fastllm::fuzz {

inline void parse_train_flags(const std::vector<std::string>& args) {
  Options options("train", {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Train, FlagGroup::Data,
                            FlagGroup::Checkpoint, FlagGroup::Backend});
  try {
    options.parse(args);
    for (const auto& [name, value] : options.all()) {
      switch (options.spec(name).type) {
        case FlagType::Int:
          (void)options.get_int(name);
          break;
        case FlagType::Float:
          (void)options.get_float(name);
          break;
        case FlagType::Bool:
          (void)options.get_bool(name);
          break;
        case FlagType::List:
          (void)options.get_list(name);
          break;
        case FlagType::String:
        case FlagType::Choice:
          (void)options.get_string(name);
          break;
      }
    }
    (void)options.help_text();
  } catch (const UserError&) {
  }
}

}  // namespace fastllm::fuzz
