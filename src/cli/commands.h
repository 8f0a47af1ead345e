#pragma once
// One function per `fastllm <command>`; each takes the arguments after the command name and
// returns the process exit code. UserError escapes to main, which prints it and exits 2.
#include <string>
#include <vector>

namespace fastllm {

using Args = std::vector<std::string>;

int run_inspect(const Args& args);
int run_probe(const Args& args);
int run_convert(const Args& args);
int run_export(const Args& args);
int run_train(const Args& args);
int run_prepare(const Args& args);
int run_generate(const Args& args);

}  // namespace fastllm
