#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/error_report.h"
#include "cli/version.h"
#include "io/error.h"

namespace {

struct Command {
  const char* name;
  int (*run)(const fastllm::Args&);
  const char* summary;
};

const Command kCommands[] = {
    {"inspect", fastllm::run_inspect,
     "print the resolved architecture, parameter count and per-rank memory of a layout"},
    {"probe", fastllm::run_probe,
     "one forward and backward pass on given tokens: logits, loss and every gradient"},
    {"train", fastllm::run_train,
     "train a model (from scratch, a Hugging Face folder or a checkpoint)"},
    {"prepare", fastllm::run_prepare, "tokenize text or JSONL into a Megatron indexed dataset"},
    {"convert", fastllm::run_convert,
     "Hugging Face folder -> HDF5 checkpoint (the one-time resharding)"},
    {"export", fastllm::run_export, "HDF5 checkpoint -> Hugging Face folder"},
    {"generate", fastllm::run_generate,
     "continue prompts with a trained model (greedy or sampled, with a key/value cache)"},
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: fastllm <command> [--flag=value ...] [--config run.yaml]\n\ncommands:\n");
  for (const Command& c : kCommands)
    std::fprintf(out, "  %-10s %s\n", c.name, c.summary);
  std::fprintf(out,
               "\n'fastllm <command> --help' lists the command's flags; 'fastllm --version' (or "
               "'fastllm version') prints the version, git revision, backends and library "
               "versions.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return 0;
  }
  if (name == "--version" || name == "version") {
    std::fputs(fastllm::version_text().c_str(), stdout);
    return 0;
  }
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const Command& c : kCommands) {
    if (name != c.name) continue;
    try {
      return c.run(args);
    } catch (const fastllm::UserError& e) {
      fastllm::report_fatal_error("fastllm " + name + ": error: " + e.what(), 2);
      return 2;
    } catch (const std::exception& e) {
      fastllm::report_fatal_error("fastllm " + name + ": internal error: " + e.what(), 1);
      return 1;
    }
  }
  std::fprintf(stderr, "fastllm: unknown command '%s'\n", name.c_str());
  usage(stderr);
  return 2;
}
