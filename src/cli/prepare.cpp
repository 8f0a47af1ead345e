// `fastllm prepare`: text or JSONL -> Megatron indexed dataset (see data/prepare.h).
#include <iostream>

#include "cli/commands.h"
#include "config/flags.h"
#include "data/prepare.h"
#include "io/error.h"
#include "parallel/mpi_session.h"

namespace fastllm {

int run_prepare(const Args& args) {
  Options options("prepare", {FlagGroup::Prepare});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  PrepareOptions p;
  p.inputs = options.get_list("input");
  p.tokenizer = options.get_string("tokenizer");
  p.output_prefix = options.get_string("output");
  if (p.inputs.empty()) throw UserError("--input is required: text or JSONL files to tokenize");
  if (p.tokenizer.empty())
    throw UserError("--tokenizer is required: a SentencePiece tokenizer.model");
  if (p.output_prefix.empty()) throw UserError("--output is required: the dataset prefix to write");
  const std::string format = options.get_string("format");
  p.format = format == "text"    ? InputFormat::kText
             : format == "jsonl" ? InputFormat::kJsonl
                                 : InputFormat::kAuto;
  p.split_lines = options.get_bool("split_lines");
  p.json_key = options.get_string("json_key");
  p.prepend_bos = options.get_bool("prepend_bos");
  p.append_eos = options.get_bool("append_eos");

  // prepare_dataset reports progress and a summary itself (rank 0, stderr).
  MpiSession mpi;
  prepare_dataset(p, mpi.world());
  return 0;
}

}  // namespace fastllm
