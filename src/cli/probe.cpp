// `fastllm probe`: one forward and backward pass on given tokens, written out for comparison with
// another implementation (the fixtures made by Hugging Face transformers, or another layout).
#include <algorithm>
#include <cstring>
#include <iostream>

#include "cli/commands.h"
#include "config/architecture.h"
#include "config/layout.h"
#include "io/error.h"
#include "io/safetensors.h"
#include "model/hf_weights.h"
#include "model/model.h"
#include "parallel/backend_setup.h"
#include "parallel/finalize.h"
#include "parallel/mpi_session.h"
#include "parallel/pipeline.h"
#include "parallel/topology.h"

namespace fastllm {
namespace {

std::span<const std::byte> bytes_of(const void* data, std::size_t size) {
  return {static_cast<const std::byte*>(data), size};
}

// An optional integer tensor of the probe input with input_ids' shape [batch, seq], or empty.
std::vector<std::int64_t> read_like_input_ids(const SafetensorsFile& file, const std::string& path,
                                              const char* name, const MicroBatch& mb) {
  const TensorInfo* info = file.find(name);
  if (!info) return {};
  if (info->dtype != SafetensorsDtype::I64 && info->dtype != SafetensorsDtype::I32)
    throw UserError(path + ": " + name + " has dtype " + safetensors_dtype_name(info->dtype) +
                    ", expected I64 (or I32)");
  if (info->shape.size() != 2 || info->shape[0] != mb.batch || info->shape[1] != mb.seq)
    throw UserError(path + ": " + name + " does not have input_ids' shape [" +
                    std::to_string(mb.batch) + ", " + std::to_string(mb.seq) + "]");
  return file.read_i64(name);
}

std::string element(const char* name, std::size_t i, std::int64_t seq) {
  return std::string(name) + "[" + std::to_string(i / seq) + ", " + std::to_string(i % seq) + "]";
}

// position_ids as Hugging Face passes packed batches: each row counts 0, 1, ... from each
// document's first token. Documents become attention boundaries with --cross_document_attention=0;
// otherwise only 0..seq-1 (one document per row) is what the model computes.
void read_position_ids(const SafetensorsFile& file, const std::string& path,
                       const ModelConfig& model, MicroBatch& mb) {
  const std::vector<std::int64_t> ids = read_like_input_ids(file, path, "position_ids", mb);
  if (ids.empty()) return;
  const bool across = model.run.cross_document_attention;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::int64_t s = static_cast<std::int64_t>(i) % mb.seq;
    const std::int64_t next = s == 0 ? 0 : ids[i - 1] + 1;
    if (across && ids[i] != s)
      throw UserError(path + ": " + element("position_ids", i, mb.seq) + " = " +
                      std::to_string(ids[i]) + ", expected " + std::to_string(s) +
                      ": with --cross_document_attention=1 every row is one document; pass "
                      "--cross_document_attention=0 to start a document at each 0");
    if (ids[i] != 0 && ids[i] != next)
      throw UserError(path + ": " + element("position_ids", i, mb.seq) + " = " +
                      std::to_string(ids[i]) + ", expected 0 (a document starts) or " +
                      std::to_string(next));
  }
  if (!across) mb.positions.assign(ids.begin(), ids.end());
}

// input_ids [batch, seq] from the probe input, checked against the model, with the optional
// position_ids and labels (Hugging Face's: labels[b, s] is predicted from the tokens before s,
// -100 where nothing is predicted; without them the labels are input_ids).
MicroBatch read_input(const std::string& path, const ModelConfig& model) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const TensorInfo* info = file.find("input_ids");
  if (!info) throw UserError(path + ": no tensor named input_ids");
  if (info->dtype != SafetensorsDtype::I64 && info->dtype != SafetensorsDtype::I32)
    throw UserError(path + ": input_ids has dtype " + safetensors_dtype_name(info->dtype) +
                    ", expected I64 (or I32)");
  if (info->shape.size() != 2)
    throw UserError(path + ": input_ids has " + std::to_string(info->shape.size()) +
                    " dimensions, expected 2 [batch, seq]");
  MicroBatch mb;
  mb.batch = info->shape[0];
  mb.seq = info->shape[1];
  if (mb.batch < 1 || mb.seq < 2)
    throw UserError(path + ": input_ids is [" + std::to_string(mb.batch) + ", " +
                    std::to_string(mb.seq) + "], expected at least one sequence of 2 tokens");
  const std::int64_t max_seq = model.run.max_sequence_length;
  if (max_seq > 0 && mb.seq > max_seq)
    throw UserError(path + ": input_ids has sequences of " + std::to_string(mb.seq) +
                    " tokens, longer than the model's " + std::to_string(max_seq) +
                    " (--max_sequence_length)");
  const std::vector<std::int64_t> ids = file.read_i64("input_ids");
  const std::int64_t vocab = model.arch.vocab_size;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      throw UserError(path + ": input_ids[" + std::to_string(i / mb.seq) + ", " +
                      std::to_string(i % mb.seq) + "] = " + std::to_string(ids[i]) +
                      " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  mb.input_ids.assign(ids.begin(), ids.end());
  read_position_ids(file, path, model, mb);
  std::vector<std::int64_t> labels = read_like_input_ids(file, path, "labels", mb);
  if (labels.empty()) labels = ids;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] != -100 && (labels[i] < 0 || labels[i] >= vocab))
      throw UserError(path + ": " + element("labels", i, mb.seq) + " = " +
                      std::to_string(labels[i]) + " is outside the vocabulary [0, " +
                      std::to_string(vocab) + ") and not -100 (not predicted)");
  }
  // Targets are the labels shifted by one; the last position of each sequence predicts nothing.
  mb.targets.assign(ids.size(), -1);
  std::int64_t predicted = 0;
  for (std::int64_t b = 0; b < mb.batch; ++b) {
    for (std::int64_t s = 0; s + 1 < mb.seq; ++s) {
      const std::int64_t label = labels[b * mb.seq + s + 1];
      mb.targets[b * mb.seq + s] = label < 0 ? -1 : static_cast<std::int32_t>(label);
      predicted += label >= 0;
    }
  }
  if (predicted == 0) throw UserError(path + ": labels leave no token to predict");
  return mb;
}

// Rank 0 receives from `source` (world rank) into data; the source sends. A rank that is both
// copies.
void to_rank0(const Topology& topo, int source, float* data, std::size_t count,
              const float* local) {
  if (topo.rank == 0 && source == 0) {
    std::copy_n(local, count, data);
  } else if (topo.rank == 0) {
    MPI_Recv(data, static_cast<int>(count), MPI_FLOAT, source, 0, topo.world, MPI_STATUS_IGNORE);
  } else if (topo.rank == source) {
    MPI_Send(local, static_cast<int>(count), MPI_FLOAT, 0, 0, topo.world);
  }
}

// The logits [batch, seq, vocab] of the whole input on rank 0: each data-parallel rank's last
// stage holds its sequences, each tensor-parallel rank there its vocabulary rows.
std::vector<float> gather_logits(const Model& model, const Topology& topo,
                                 const std::vector<std::vector<float>>& local,
                                 const MicroBatch& whole) {
  const Layout& l = topo.layout;
  const std::int64_t vocab = model.arch().vocab_size,
                     tokens = whole.batch * whole.seq / l.data_parallel;
  std::vector<float> out(topo.rank == 0 ? static_cast<std::size_t>(whole.batch * whole.seq * vocab)
                                        : 0);
  std::vector<float> part;
  for (int d = 0; d < l.data_parallel; ++d) {
    for (int t = 0; t < l.tensor_parallel; ++t) {
      const int source = l.rank_of({t, d, l.pipeline_parallel - 1});
      const VocabSlice slice = l.vocab_slice(vocab, t);
      part.resize(static_cast<std::size_t>(tokens * slice.rows));
      to_rank0(topo, source, part.data(), part.size(),
               topo.rank == source ? local.at(0).data() : nullptr);
      if (topo.rank != 0) continue;
      for (std::int64_t i = 0; i < tokens; ++i)
        std::copy_n(part.begin() + i * slice.rows, slice.rows,
                    out.begin() + ((d * tokens + i) * vocab + slice.begin));
    }
  }
  return out;
}

// Every whole gradient, in parameter-table order, on rank 0, from the ranks of data-parallel
// replica 0 that hold its parts (the first of any replicas of a part).
std::vector<std::vector<float>> gather_gradients(Model& model, const Topology& topo) {
  const Layout& l = topo.layout;
  const Architecture& arch = model.arch();
  std::vector<std::vector<float>> out(parameter_table(arch).size());
  // Rank 0 lists the parameters each rank of replica 0 holds (the table only, no weights) and
  // receives the primary parts in that order from their holders.
  for (int pp = 0; pp < l.pipeline_parallel; ++pp) {
    for (int tp = 0; tp < l.tensor_parallel; ++tp) {
      const int source = l.rank_of({tp, 0, pp});
      std::vector<Parameter> held;
      if (topo.rank == source) {
        held = model.parameters();
      } else if (topo.rank == 0) {
        ModelPartition partition;
        partition.layout = l;
        partition.at = l.coordinates(source);
        held = partition_parameters(arch, partition);
      } else {
        continue;
      }
      for (const Parameter& p : held) {
        if (!p.primary) continue;
        std::vector<float> part(static_cast<std::size_t>(p.numel));
        std::vector<float> mine;
        if (topo.rank == source) mine = model.read_grad(p);
        to_rank0(topo, source, part.data(), part.size(), mine.data());
        if (topo.rank != 0) continue;
        std::int64_t whole = 1;
        for (auto d : p.global_shape)
          whole *= d;
        out[p.index].resize(static_cast<std::size_t>(whole));
        place_part(p, part, out[p.index]);
      }
    }
  }
  return out;
}

}  // namespace

int run_probe(const Args& args) {
  Options options("probe",
                  {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Probe, FlagGroup::Backend});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const ModelConfig config = resolve_model(options);
  check_pretrained_weights(config);
  const std::string input = options.get_string("input"), output = options.get_string("output");
  if (input.empty()) throw UserError("--input is required: a safetensors file with input_ids");
  if (output.empty()) throw UserError("--output is required: where to write the results");
  const MicroBatch whole = read_input(input, config);

  MpiSession mpi;
  const Layout layout = resolve_layout(options, mpi.size(), config.arch);
  layout.validate_sequence(whole.seq, input + ": the sequence length of input_ids");
  const int dp = layout.data_parallel;
  if (whole.batch % dp != 0)
    throw UserError(input + ": input_ids has a batch of " + std::to_string(whole.batch) +
                    " sequences, not a multiple of the " + std::to_string(dp) +
                    " data-parallel ranks");
  const std::unique_ptr<Backend> backend = backend_from_flags(options);
  const Topology topo =
      make_topology(layout, config.arch, mpi.world(), communicator_factory(*backend));
  // Each data-parallel rank takes its contiguous share of the sequences as one micro-batch.
  const std::int64_t tokens = whole.batch * whole.seq / dp;
  MicroBatch mb;
  mb.batch = whole.batch / dp;
  mb.seq = whole.seq;
  mb.input_ids.assign(whole.input_ids.begin() + topo.at.dp * tokens,
                      whole.input_ids.begin() + (topo.at.dp + 1) * tokens);
  mb.targets.assign(whole.targets.begin() + topo.at.dp * tokens,
                    whole.targets.begin() + (topo.at.dp + 1) * tokens);
  if (!whole.positions.empty())
    mb.positions.assign(whole.positions.begin() + topo.at.dp * tokens,
                        whole.positions.begin() + (topo.at.dp + 1) * tokens);

  Model model(*backend, config.arch, config.run, model_partition(topo),
              parse_recompute(options.get_string("recompute")));
  if (config.load_weights) {
    load_hf_weights(model, config.checkpoint_path);
  } else {
    model.initialize(static_cast<std::uint64_t>(options.get_int("seed")));
  }
  // The loss is the mean over all predicted tokens; the load-balancing loss is per micro-batch, so
  // with several data-parallel ranks it is the mean over their micro-batches.
  const auto predicted = static_cast<std::int64_t>(
      std::count_if(whole.targets.begin(), whole.targets.end(), [](auto t) { return t >= 0; }));
  const double coeff = config.arch.is_moe() ? config.run.moe_aux_loss_coeff : 0.0;
  Pipeline pipeline(model, layout.pipeline_parallel > 1 ? topo.pipeline.get() : nullptr);
  std::vector<std::vector<float>> logits;
  const PipelineTotals totals =
      pipeline.forward_backward({mb}, 1.0 / static_cast<double>(predicted), coeff / dp, &logits);
  finalize_gradients(model, topo);
  const GlobalLoss sums = global_loss(totals, topo);
  const double aux_loss = sums.aux_sum / dp;
  const double loss = sums.ce_sum / static_cast<double>(predicted) + coeff * aux_loss;

  std::vector<float> all_logits = gather_logits(model, topo, logits, whole);
  std::vector<std::vector<float>> grads = gather_gradients(model, topo);
  if (mpi.rank() != 0) return 0;
  const std::vector<ParameterSpec> table = parameter_table(config.arch);
  std::vector<SafetensorsTensor> out;
  const std::int64_t vocab = config.arch.vocab_size;
  out.push_back({"logits",
                 SafetensorsDtype::F32,
                 {whole.batch, whole.seq, vocab},
                 bytes_of(all_logits.data(), all_logits.size() * sizeof(float))});
  out.push_back({"loss", SafetensorsDtype::F64, {1}, bytes_of(&loss, sizeof loss)});
  if (config.arch.is_moe())
    out.push_back({"aux_loss", SafetensorsDtype::F64, {1}, bytes_of(&aux_loss, sizeof aux_loss)});
  for (std::size_t i = 0; i < table.size(); ++i) {
    out.push_back({"grad." + table[i].name, SafetensorsDtype::F32, table[i].shape,
                   bytes_of(grads[i].data(), grads[i].size() * sizeof(float))});
  }
  write_safetensors(output, out);
  std::cout << "loss " << loss
            << (config.arch.is_moe() ? " aux_loss " + std::to_string(aux_loss) : "") << " -> "
            << output << "\n";
  return 0;
}

}  // namespace fastllm
