// Document-masked attention (--cross_document_attention=0): a probe of rows packed with several
// documents, under data x tensor x pipeline layouts (with sequence parallelism too), against each
// document probed alone on one rank.
//
// The reference is exact: every target of the packed row counts, also the one at a document's last
// token, which is the next document's first token. Under document masking that prediction depends
// only on its own document, so the reference probe of a document is its tokens followed by the next
// document's first token (the last document of a row alone): its targets are exactly the packed
// row's targets at that document's positions, and its logits those of the packed row. The packed
// loss (the mean over the row's predicted tokens) and gradients are then the combination of the
// references weighted by their predicted-token counts. A second form masks those boundary targets
// with labels = -100 and compares with each document alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <iostream>

#include "parallel_support.h"

#ifndef FASTLLM_SLOW_CASES
#define FASTLLM_SLOW_CASES 0
#endif

namespace fastllm::test {
namespace {

constexpr std::int64_t kSeq = 40;
// Each row's documents: length 1, longer than dev-mistral's window of 16, a row of one document.
const std::vector<std::vector<std::int64_t>> kRows = {{7, 1, 20, 12}, {3, 19, 18}, {40}};

struct Case {
  std::string name;
  std::string model_flags;
  Shape shape;
  bool mask_boundaries = false;  // labels -100 at each document's last token's target
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

std::vector<std::byte> i64_bytes(const std::vector<std::int64_t>& values) {
  std::vector<std::byte> bytes(values.size() * 8);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

void write_input(const std::string& path, std::int64_t batch, std::int64_t seq,
                 const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& positions,
                 const std::vector<std::int64_t>& labels) {
  std::vector<std::vector<std::byte>> storage;
  std::vector<SafetensorsTensor> tensors;
  auto add = [&](const char* name, const std::vector<std::int64_t>& values) {
    if (values.empty()) return;
    storage.push_back(i64_bytes(values));
    tensors.push_back({name, SafetensorsDtype::I64, {batch, seq}, storage.back()});
  };
  storage.reserve(3);
  add("input_ids", ids);
  add("position_ids", positions);
  add("labels", labels);
  write_safetensors(path, tensors);
}

class DocumentMask : public ::testing::TestWithParam<Case> {
 protected:
  static TempDir& dir() {
    static TempDir d;
    return d;
  }
  // Token ids of the packed rows, [rows, kSeq], seeded.
  static const std::vector<std::int64_t>& tokens() {
    static const std::vector<std::int64_t> ids = [] {
      std::vector<std::int64_t> out;
      std::uint64_t state = 12345;
      for (std::size_t i = 0; i < kRows.size() * kSeq; ++i) {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        out.push_back(static_cast<std::int64_t>((state >> 33) % 1000));
      }
      return out;
    }();
    return ids;
  }

  static std::map<std::string, std::vector<float>> single(const std::string& key,
                                                          const std::string& model_flags,
                                                          const std::string& input) {
    return single_rank_probe(dir().path(), key, model_flags, input);
  }
};

TEST_P(DocumentMask, PackedProbeEqualsDocumentsAlone) {
  const Case& c = GetParam();
  const std::string model = c.model_flags + " --cross_document_attention=0";
  const std::string model_key = c.name.substr(0, c.name.rfind('_'));
  const auto rows = static_cast<std::int64_t>(kRows.size());
  const std::vector<std::int64_t>& ids = tokens();
  const std::int64_t vocab = 1000;

  // The references, and the packed input's position_ids (and labels).
  std::vector<std::int64_t> positions, labels;
  std::map<std::string, std::vector<float>> expected;
  expected["logits"].assign(static_cast<std::size_t>(rows * kSeq * vocab), 0.0f);
  std::int64_t predicted = 0;
  std::vector<std::pair<std::map<std::string, std::vector<float>>, std::int64_t>> parts;
  for (std::int64_t b = 0; b < rows; ++b) {
    std::int64_t start = 0;
    const auto& lengths = kRows[static_cast<std::size_t>(b)];
    for (std::size_t d = 0; d < lengths.size(); ++d) {
      const std::int64_t length = lengths[d];
      const bool last = d + 1 == lengths.size();
      for (std::int64_t s = 0; s < length; ++s) {
        positions.push_back(s);
        // Labels: the token itself, except a document's first token (the previous document's
        // boundary target) when boundaries are masked.
        labels.push_back(c.mask_boundaries && s == 0 && start > 0 ? -100
                                                                  : ids[b * kSeq + start + s]);
      }
      // Alone: the document, and the next one's first token unless boundaries are masked. A
      // masked document of one token predicts nothing (probe refuses that): its logits come from
      // it with the next token, whose prediction is left out of the combination.
      const bool alone_predicts = length > 1 || last;
      const bool extra = !last && (!c.mask_boundaries || !alone_predicts);
      const std::int64_t n = length + (extra ? 1 : 0);
      const auto first = ids.begin() + b * kSeq + start;
      const std::vector<std::int64_t> part(first, first + n);
      const std::string key = model_key + "-" + std::to_string(b) + "-" + std::to_string(d) +
                              (c.mask_boundaries ? "-masked" : "");
      const std::string input = (dir() / (key + "-in.safetensors")).string();
      write_input(input, 1, n, part, {}, {});
      const auto result = single(key, model, input);
      const std::vector<float>& logits = result.at("logits");
      std::copy_n(logits.begin(), length * vocab,
                  expected["logits"].begin() + (b * kSeq + start) * vocab);
      if (!c.mask_boundaries || alone_predicts) {
        parts.emplace_back(result, n - 1);
        predicted += n - 1;
      }
      start += length;
    }
  }
  // Masked boundaries are the targets the packed row does not predict: one per document start
  // after a row's first.
  std::int64_t boundaries = 0;
  for (const auto& lengths : kRows)
    boundaries += static_cast<std::int64_t>(lengths.size()) - 1;
  ASSERT_EQ(predicted, rows * (kSeq - 1) - (c.mask_boundaries ? boundaries : 0));
  for (const auto& [result, count] : parts) {
    for (const auto& [name, values] : result) {
      // The MoE load-balancing loss is over a micro-batch's tokens (its coefficient is 0 here).
      if (name == "logits" || name == "aux_loss") continue;
      auto& e = expected[name];
      e.resize(values.size());
      const double weight = static_cast<double>(count) / static_cast<double>(predicted);
      for (std::size_t i = 0; i < values.size(); ++i)
        e[i] += static_cast<float>(values[i] * weight);
    }
  }

  const std::string input = (dir() / (c.name + "-packed.safetensors")).string();
  write_input(input, rows, kSeq, ids, positions,
              c.mask_boundaries ? labels : std::vector<std::int64_t>{});
  const std::string out = (dir() / (c.name + ".safetensors")).string();
  const CommandResult r = run_mpi(c.shape.ranks(), "probe " + model + c.shape.flags() +
                                                       " --input=" + input + " --output=" + out);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  const auto got = read_tensors(out);
  int grads = 0;
  double worst_grad = 0;
  for (const auto& [name, values] : expected) {
    ASSERT_TRUE(got.count(name)) << name;
    const double error = relative_error(got.at(name), values);
    EXPECT_LE(error, 1e-5) << name;
    if (name.rfind("grad.", 0) == 0) {
      ++grads;
      worst_grad = std::max(worst_grad, error);
    }
  }
  std::cout << c.name << ": logits " << relative_error(got.at("logits"), expected.at("logits"))
            << ", loss " << relative_error(got.at("loss"), expected.at("loss"))
            << ", worst gradient " << worst_grad << " (relative errors)\n";
  EXPECT_GT(grads, 10);
}

std::vector<Case> cases() {
  std::vector<Case> out;
  auto add = [&](const std::string& name, const std::string& flags,
                 const std::vector<Shape>& shapes, bool masked = false) {
    for (const Shape& s : shapes)
      out.push_back({name + "_" + s.name(), flags, s, masked});
  };
  const std::string mistral = fixture_model("dev-mistral");  // window 16
  const std::string tied = fixture_model("dev-tied-nowindow");
  add("mistral", mistral, {{1, 1, 1}, {3, 1, 1}, {1, 2, 1}, {1, 1, 2}});
  add("mistralsp", mistral + " --sequence_parallel=1", {{1, 2, 1}});
  add("tiedmasked", tied, {{1, 1, 1}}, true);
  if (FASTLLM_SLOW_CASES) {
    add("mistral", mistral, {{1, 2, 2}, {3, 2, 1}, {1, 4, 1}});
    add("mistralsp", mistral + " --sequence_parallel=1", {{1, 2, 2}, {3, 2, 1}, {1, 4, 1}});
    add("tied", tied, {{1, 1, 1}, {3, 1, 1}, {1, 2, 2}});
    add("tiedwindow", tied + " --window_size=5", {{1, 1, 1}, {1, 2, 1}, {1, 1, 2}});
    add("tiedmasked", tied + " --sequence_parallel=1", {{1, 2, 2}, {3, 2, 1}}, true);
    add("mixtral", fixture_model("dev-mixtral") + " --moe_aux_loss_coeff=0",
        {{1, 1, 1}, {1, 2, 2}});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, DocumentMask, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace fastllm::test
