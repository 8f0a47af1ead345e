#pragma once
// A Hugging Face `tokenizers` serialization (tokenizer.json) of a SentencePiece model, for an
// export whose tokenizer folder has none: transformers' AutoTokenizer and vLLM load tokenizer.json
// first, and without it transformers converts tokenizer.model itself, which for Mistral models
// drops SentencePiece's dummy prefix ("The" instead of "\u2581The").
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "io/tokenizer.h"

namespace fastllm {

// The tokenizer.json that encodes as SentencePiece does, with BOS first when the model has one
// (tokenizer_config.json's add_bos_token): a BPE model with merges ranked by the merged piece's
// score, or a Unigram model with the scores; the dummy prefix and whitespace escaping as
// normalizers; control and unknown pieces as special added tokens, user-defined ones as plain added
// tokens. Throws UserError for what `tokenizers` cannot express as SentencePiece does (WORD and
// CHAR models, whitespace as a suffix).
nlohmann::ordered_json hf_tokenizer_json(const Tokenizer& tokenizer);

// transformers' AddedToken as the tokenizer files spell it (tokenizer.json, tokenizer_config.json,
// special_tokens_map.json): the text matched as it is, never stripped nor normalised; "special"
// only where given.
nlohmann::ordered_json added_token(const std::string& content,
                                   std::optional<bool> special = std::nullopt);

}  // namespace fastllm
