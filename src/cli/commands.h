#pragma once
// One function per `fastllm <command>`; each takes the arguments after the command name and
// returns the process exit code. UserError escapes to main, which prints it and exits 2.
#include <string>
#include <vector>

namespace fastllm {

using Args = std::vector<std::string>;

int run_inspect(const Args& args);

}  // namespace fastllm
