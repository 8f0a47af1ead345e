#pragma once
// `fastllm prepare`: tokenizes text or JSONL files with the model's SentencePiece tokenizer into
// one Megatron indexed dataset (<output>.bin + <output>.idx), as Megatron's
// tools/preprocess_data.py does: one sequence per document, uint16 tokens when the vocabulary
// fits, else int32. By default each document starts with the BOS id and ends with the EOS id, as
// Mistral's own pretraining-data tokenization (mistral-finetune's tokenize_pretrain) and Fast-LLM
// do; Megatron's --append-eod adds only the EOS.
//
// Documents:
//  - text files: the whole file is one document, byte for byte; with split_lines each line is one
//    document (the line break and a '\r' before it are not part of it).
//  - JSONL files: one JSON object per line; the document is the string under json_key.
// A document that is empty or only whitespace is skipped (counted in PrepareStats::skipped), and so
// is a blank JSONL line. Documents keep the order of the inputs and of the lines in each.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastllm {

enum class InputFormat {
  kAuto,  // JSONL for names ending in .jsonl or .json, text for anything else
  kText,
  kJsonl,
};

struct PrepareOptions {
  // Files, or folders standing for every regular file under them (recursively, sorted by path,
  // hidden files left out).
  std::vector<std::string> inputs;
  // Writes <output_prefix>.bin and .idx; parent folders are created.
  std::string output_prefix;
  // A tokenizer.model, or a folder holding one (e.g. a Hugging Face checkpoint).
  std::string tokenizer;
  InputFormat format = InputFormat::kAuto;
  bool split_lines = false;       // text files: one document per line
  std::string json_key = "text";  // JSONL files: the field holding the document
  bool prepend_bos = true;        // a tokenizer without a BOS piece is then an error
  bool append_eos = true;
  bool progress = true;  // rank 0 reports to stderr, at most every 2 s
};

struct PrepareStats {
  std::int64_t documents = 0;  // documents written
  std::int64_t tokens = 0;     // tokens written, BOS and EOS included
  std::int64_t skipped = 0;    // empty or whitespace-only documents left out
  std::int64_t bytes = 0;      // bytes of input read
  std::string dtype;           // "uint16" or "int32"
  double seconds = 0;
};

// Collective over `comm`: every rank must call it with the same options. Each rank tokenizes an
// equal share of the input bytes (whole files for one-document-per-file text, line-aligned byte
// ranges otherwise) into a partial dataset next to the output; rank 0 then concatenates them in
// rank order and removes them, so the result is byte-identical for any number of ranks. The ranks
// must share the file system. Every rank returns the same stats, or throws the same UserError
// (naming the file, and the line for JSONL) when any rank fails; no partial output is left behind.
PrepareStats prepare_dataset(const PrepareOptions& options, MPI_Comm comm);

}  // namespace fastllm
