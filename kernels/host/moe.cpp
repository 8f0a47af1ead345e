#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

void require_indices(const std::int32_t* index, std::int64_t n, std::int64_t limit,
                     const char* op) {
  for (std::int64_t i = 0; i < n; ++i) {
    if (index[i] < 0 || index[i] >= limit)
      host::fail(op, "index " + std::to_string(index[i]) + " at position " + std::to_string(i) +
                         " is outside [0, " + std::to_string(limit) + ")");
  }
}

}  // namespace

void HostBackend::router_forward(Tensor logits, int top_k, Tensor probs, Tensor topk_index,
                                 Tensor topk_weight) {
  const char* op = "router_forward";
  host::require_dtype(logits, DType::F32, op, "logits");
  host::require_dtype(probs, DType::F32, op, "probs");
  host::require_dtype(topk_index, DType::I32, op, "topk_index");
  host::require_dtype(topk_weight, DType::F32, op, "topk_weight");
  const std::int64_t experts = host::row_width(logits);
  const std::int64_t tokens = host::row_count(logits);
  host::require(top_k >= 1 && top_k <= experts, op, "top_k is outside [1, experts]");
  host::require_numel(probs, tokens * experts, op, "probs");
  host::require_numel(topk_index, tokens * top_k, op, "topk_index");
  host::require_numel(topk_weight, tokens * top_k, op, "topk_weight");
  const float* in = logits.as<float>();
  float* prob = probs.as<float>();
  std::int32_t* index = topk_index.as<std::int32_t>();
  float* weight = topk_weight.as<float>();
#pragma omp parallel for schedule(static) if (tokens * experts > (1 << 14))
  for (std::int64_t t = 0; t < tokens; ++t) {
    const float* lt = in + t * experts;
    float* pt = prob + t * experts;
    double m = lt[0];
    for (std::int64_t e = 1; e < experts; ++e)
      m = std::max(m, static_cast<double>(lt[e]));
    double sum = 0.0;
    for (std::int64_t e = 0; e < experts; ++e)
      sum += std::exp(lt[e] - m);
    for (std::int64_t e = 0; e < experts; ++e)
      pt[e] = static_cast<float>(std::exp(lt[e] - m) / sum);
    std::int32_t* it = index + t * top_k;
    float* wt = weight + t * top_k;
    // k passes of an arg-max over the unchosen experts; the strict > keeps the lower index on ties.
    float selected = 0.0f;
    for (int s = 0; s < top_k; ++s) {
      std::int64_t best = -1;
      for (std::int64_t e = 0; e < experts; ++e) {
        if (std::find(it, it + s, static_cast<std::int32_t>(e)) != it + s) continue;
        if (best < 0 || pt[e] > pt[best]) best = e;
      }
      it[s] = static_cast<std::int32_t>(best);
      wt[s] = pt[best];
      selected += pt[best];
    }
    for (int s = 0; s < top_k; ++s)
      wt[s] /= selected;
  }
}

void HostBackend::router_backward(Tensor probs, Tensor topk_index, Tensor dtopk_weight,
                                  Tensor dprob_per_expert, Tensor dlogits) {
  const char* op = "router_backward";
  host::require_dtype(probs, DType::F32, op, "probs");
  host::require_dtype(topk_index, DType::I32, op, "topk_index");
  host::require_dtype(dtopk_weight, DType::F32, op, "dtopk_weight");
  host::require_dtype(dlogits, DType::F32, op, "dlogits");
  const std::int64_t experts = host::row_width(probs);
  const std::int64_t tokens = host::row_count(probs);
  const std::int64_t top_k = tokens == 0 ? 0 : topk_index.numel() / tokens;
  host::require_numel(topk_index, tokens * top_k, op, "topk_index");
  host::require_numel(dtopk_weight, tokens * top_k, op, "dtopk_weight");
  host::require_numel(dlogits, tokens * experts, op, "dlogits");
  // An empty per-expert gradient means no load-balancing term.
  const bool has_dprob = !host::is_empty(dprob_per_expert);
  if (has_dprob) {
    host::require_dtype(dprob_per_expert, DType::F32, op, "dprob_per_expert");
    host::require_numel(dprob_per_expert, experts, op, "dprob_per_expert");
  }
  const std::int32_t* index = topk_index.as<std::int32_t>();
  require_indices(index, tokens * top_k, experts, op);
  const float* prob = probs.as<float>();
  const float* dweight = dtopk_weight.as<float>();
  const float* dprob = has_dprob ? dprob_per_expert.as<float>() : nullptr;
  float* out = dlogits.as<float>();
#pragma omp parallel if (tokens * experts > (1 << 14))
  {
    std::vector<double> grad(static_cast<std::size_t>(experts));
#pragma omp for schedule(static)
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float* pt = prob + t * experts;
      const std::int32_t* it = index + t * top_k;
      const float* dwt = dweight + t * top_k;
      for (std::int64_t e = 0; e < experts; ++e)
        grad[e] = has_dprob ? dprob[e] : 0.0;
      // w_j = p_j / S with S the sum of the chosen p: dL/dp_i = (dw_i - sum_j dw_j w_j) / S.
      double selected = 0.0;
      for (std::int64_t s = 0; s < top_k; ++s)
        selected += pt[it[s]];
      double weighted = 0.0;
      for (std::int64_t s = 0; s < top_k; ++s)
        weighted += dwt[s] * (pt[it[s]] / selected);
      for (std::int64_t s = 0; s < top_k; ++s)
        grad[it[s]] += (dwt[s] - weighted) / selected;
      // Softmax backward: dlogit_e = p_e (g_e - sum_f g_f p_f).
      double dot = 0.0;
      for (std::int64_t e = 0; e < experts; ++e)
        dot += grad[e] * pt[e];
      float* dt = out + t * experts;
      for (std::int64_t e = 0; e < experts; ++e)
        dt[e] = static_cast<float>(pt[e] * (grad[e] - dot));
    }
  }
}

void HostBackend::router_statistics(Tensor probs, Tensor topk_index, Tensor counts,
                                    Tensor prob_sums) {
  const char* op = "router_statistics";
  host::require_dtype(probs, DType::F32, op, "probs");
  host::require_dtype(topk_index, DType::I32, op, "topk_index");
  host::require_dtype(counts, DType::F32, op, "counts");
  host::require_dtype(prob_sums, DType::F32, op, "prob_sums");
  const std::int64_t experts = host::row_width(probs);
  const std::int64_t tokens = host::row_count(probs);
  host::require_numel(counts, experts, op, "counts");
  host::require_numel(prob_sums, experts, op, "prob_sums");
  const std::int32_t* index = topk_index.as<std::int32_t>();
  const std::int64_t slots = topk_index.numel();
  require_indices(index, slots, experts, op);
  // A few numbers per token: one thread, summed in double.
  std::vector<double> count(static_cast<std::size_t>(experts), 0.0);
  std::vector<double> sums(static_cast<std::size_t>(experts), 0.0);
  for (std::int64_t i = 0; i < slots; ++i)
    count[index[i]] += 1.0;
  const float* prob = probs.as<float>();
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t e = 0; e < experts; ++e)
      sums[e] += prob[t * experts + e];
  float* count_out = counts.as<float>();
  float* sum_out = prob_sums.as<float>();
  for (std::int64_t e = 0; e < experts; ++e) {
    count_out[e] += static_cast<float>(count[e]);
    sum_out[e] += static_cast<float>(sums[e]);
  }
}

void HostBackend::moe_permute_offsets(Tensor topk_index, int experts, Tensor sorted_token,
                                      Tensor sorted_slot, Tensor offsets) {
  const char* op = "moe_permute_offsets";
  host::require_dtype(topk_index, DType::I32, op, "topk_index");
  host::require_dtype(sorted_token, DType::I32, op, "sorted_token");
  host::require_dtype(sorted_slot, DType::I32, op, "sorted_slot");
  host::require_dtype(offsets, DType::I32, op, "offsets");
  host::require(experts >= 1, op, "experts must be positive");
  const std::int64_t slots = topk_index.numel();
  const std::int64_t top_k = host::row_width(topk_index);
  host::require(top_k > 0 || slots == 0, op, "topk_index has no columns");
  host::require_numel(sorted_token, slots, op, "sorted_token");
  host::require_numel(sorted_slot, slots, op, "sorted_slot");
  host::require_numel(offsets, static_cast<std::int64_t>(experts) + 1, op, "offsets");
  host::require(slots <= INT32_MAX, op, "more than 2^31 - 1 slots");
  const std::int32_t* index = topk_index.as<std::int32_t>();
  require_indices(index, slots, experts, op);
  // Counting sort: visiting the slots in order keeps it stable.
  std::int32_t* run = offsets.as<std::int32_t>();
  std::fill_n(run, experts + 1, 0);
  for (std::int64_t i = 0; i < slots; ++i)
    ++run[index[i] + 1];
  for (int e = 0; e < experts; ++e)
    run[e + 1] += run[e];
  std::vector<std::int32_t> next(run, run + experts);
  std::int32_t* token_out = sorted_token.as<std::int32_t>();
  std::int32_t* slot_out = sorted_slot.as<std::int32_t>();
  for (std::int64_t i = 0; i < slots; ++i) {
    const std::int32_t at = next[index[i]]++;
    slot_out[at] = static_cast<std::int32_t>(i);
    token_out[at] = static_cast<std::int32_t>(i / top_k);
  }
}

namespace {

// The offsets of a grouped linear op, checked against the experts and the rows of the row tensors.
const std::int32_t* grouped_offsets(Tensor offsets, std::size_t experts, std::int64_t rows,
                                    const char* op) {
  host::require_dtype(offsets, DType::I32, op, "offsets");
  host::require(experts >= 1, op, "no experts' weights given");
  host::require_numel(offsets, static_cast<std::int64_t>(experts) + 1, op, "offsets");
  const std::int32_t* at = offsets.as<std::int32_t>();
  if (at[0] != 0) host::fail(op, "offsets[0] is " + std::to_string(at[0]) + ", expected 0");
  for (std::size_t e = 0; e < experts; ++e) {
    if (at[e + 1] < at[e])
      host::fail(op, "offsets decrease at expert " + std::to_string(e) + " (" +
                         std::to_string(at[e]) + " then " + std::to_string(at[e + 1]) + ")");
  }
  if (at[experts] > rows)
    host::fail(op, "offsets end at row " + std::to_string(at[experts]) + ", past the " +
                       std::to_string(rows) + " rows");
  return at;
}

void require_per_expert(const std::vector<Tensor>& list, std::size_t experts, const char* op,
                        const char* what) {
  if (!list.empty() && list.size() != experts)
    host::fail(op, std::string(what) + " has " + std::to_string(list.size()) + " tensors for " +
                       std::to_string(experts) + " experts");
}

}  // namespace

// One linear layer per expert on its rows, the same calls the per-expert loop made, so the
// numbers are those of that loop bit for bit.
void HostBackend::grouped_linear_forward(Tensor x, const std::vector<Tensor>& weights,
                                         const std::vector<Tensor>& biases, Tensor offsets,
                                         Tensor y) {
  const char* op = "grouped_linear_forward";
  const std::size_t experts = weights.size();
  const std::int32_t* at = grouped_offsets(offsets, experts, host::row_count(x), op);
  require_per_expert(biases, experts, op, "biases");
  for (std::size_t e = 0; e < experts; ++e) {
    const std::int64_t begin = at[e], count = at[e + 1] - at[e];
    if (count == 0) continue;
    linear_forward(x.rows(begin, count), weights[e], biases.empty() ? Tensor() : biases[e],
                   y.rows(begin, count));
  }
}

void HostBackend::grouped_linear_backward_data(Tensor dy, const std::vector<Tensor>& weights,
                                               Tensor offsets, float beta, Tensor dx) {
  const char* op = "grouped_linear_backward_data";
  const std::size_t experts = weights.size();
  const std::int32_t* at = grouped_offsets(offsets, experts, host::row_count(dy), op);
  const std::int64_t n = weights[0].size(0), k = weights[0].size(1);
  for (std::size_t e = 0; e < experts; ++e) {
    const std::int64_t begin = at[e], count = at[e + 1] - at[e];
    if (count == 0) continue;
    gemm(false, false, count, k, n, 1.0f, dy.rows(begin, count), weights[e], beta,
         dx.rows(begin, count));
  }
}

void HostBackend::grouped_linear_backward_weight(Tensor x, Tensor dy, Tensor offsets,
                                                 const std::vector<Tensor>& dweights,
                                                 const std::vector<Tensor>& dbiases) {
  const char* op = "grouped_linear_backward_weight";
  const std::size_t experts = dweights.size();
  const std::int32_t* at = grouped_offsets(offsets, experts, host::row_count(dy), op);
  require_per_expert(dbiases, experts, op, "dbiases");
  for (std::size_t e = 0; e < experts; ++e) {
    const std::int64_t begin = at[e], count = at[e + 1] - at[e];
    if (count == 0) continue;
    linear_backward_weight(x.rows(begin, count), dy.rows(begin, count), dweights[e],
                           dbiases.empty() ? Tensor() : dbiases[e]);
  }
}

void HostBackend::gather_rows(Tensor src, Tensor index, Tensor dst) {
  const char* op = "gather_rows";
  host::require_dtype(src, DType::F32, op, "src");
  host::require_dtype(dst, DType::F32, op, "dst");
  host::require_dtype(index, DType::I32, op, "index");
  const std::int64_t width = host::row_width(src);
  const std::int64_t n = index.numel();
  host::require_numel(dst, n * width, op, "dst");
  const std::int32_t* idx = index.as<std::int32_t>();
  require_indices(idx, n, host::row_count(src), op);
  const float* in = src.as<float>();
  float* out = dst.as<float>();
#pragma omp parallel for schedule(static) if (n * width > (1 << 15))
  for (std::int64_t i = 0; i < n; ++i)
    std::memcpy(out + i * width, in + idx[i] * width,
                static_cast<std::size_t>(width) * sizeof(float));
}

void HostBackend::scatter_add_rows(Tensor src, Tensor index, Tensor weight, Tensor dst) {
  const char* op = "scatter_add_rows";
  host::require_dtype(src, DType::F32, op, "src");
  host::require_dtype(dst, DType::F32, op, "dst");
  host::require_dtype(index, DType::I32, op, "index");
  const std::int64_t width = host::row_width(dst);
  const std::int64_t rows = host::row_count(dst);
  const std::int64_t n = index.numel();
  host::require_numel(src, n * width, op, "src");
  const bool weighted = !host::is_empty(weight);
  if (weighted) {
    host::require_dtype(weight, DType::F32, op, "weight");
    host::require_numel(weight, n, op, "weight");
  }
  const std::int32_t* idx = index.as<std::int32_t>();
  require_indices(idx, n, rows, op);
  // Group the sources by destination row (a stable counting sort), then let each thread own whole
  // destination rows and add their sources in index order: race-free and deterministic.
  std::vector<std::int64_t> start(static_cast<std::size_t>(rows) + 1, 0);
  for (std::int64_t i = 0; i < n; ++i)
    ++start[idx[i] + 1];
  for (std::int64_t r = 0; r < rows; ++r)
    start[r + 1] += start[r];
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  {
    std::vector<std::int64_t> next(start.begin(), start.end() - 1);
    for (std::int64_t i = 0; i < n; ++i)
      order[next[idx[i]]++] = i;
  }
  const float* in = src.as<float>();
  const float* w = weighted ? weight.as<float>() : nullptr;
  float* out = dst.as<float>();
#pragma omp parallel for schedule(dynamic, 16) if (n * width > (1 << 15))
  for (std::int64_t r = 0; r < rows; ++r) {
    float* dr = out + r * width;
    for (std::int64_t p = start[r]; p < start[r + 1]; ++p) {
      const std::int64_t i = order[p];
      const float* sr = in + i * width;
      const float scale = weighted ? w[i] : 1.0f;
#pragma omp simd
      for (std::int64_t j = 0; j < width; ++j)
        dr[j] += scale * sr[j];
    }
  }
}

void HostBackend::scale_rows(Tensor y, Tensor weight) {
  const char* op = "scale_rows";
  host::require_dtype(y, DType::F32, op, "y");
  host::require_dtype(weight, DType::F32, op, "weight");
  const std::int64_t rows = weight.numel();
  const std::int64_t width = rows == 0 ? 0 : y.numel() / rows;
  host::require_numel(y, rows * width, op, "y");
  const float* w = weight.as<float>();
  float* out = y.as<float>();
#pragma omp parallel for schedule(static) if (rows * width > (1 << 15))
  for (std::int64_t r = 0; r < rows; ++r) {
    float* yr = out + r * width;
    const float scale = w[r];
#pragma omp simd
    for (std::int64_t j = 0; j < width; ++j)
      yr[j] *= scale;
  }
}

void HostBackend::dot_rows_gathered(Tensor a, Tensor b, Tensor index, Tensor out) {
  const char* op = "dot_rows_gathered";
  host::require_dtype(a, DType::F32, op, "a");
  host::require_dtype(b, DType::F32, op, "b");
  host::require_dtype(out, DType::F32, op, "out");
  host::require_dtype(index, DType::I32, op, "index");
  const std::int64_t width = host::row_width(b);
  const std::int64_t n = index.numel();
  host::require_numel(a, n * width, op, "a");
  host::require_numel(out, n, op, "out");
  const std::int32_t* idx = index.as<std::int32_t>();
  require_indices(idx, n, host::row_count(b), op);
  const float* pa = a.as<float>();
  const float* pb = b.as<float>();
  float* po = out.as<float>();
#pragma omp parallel for schedule(static) if (n * width > (1 << 15))
  for (std::int64_t i = 0; i < n; ++i) {
    const float* ar = pa + i * width;
    const float* br = pb + static_cast<std::int64_t>(idx[i]) * width;
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (std::int64_t j = 0; j < width; ++j)
      dot += static_cast<double>(ar[j]) * br[j];
    po[i] = static_cast<float>(dot);
  }
}

}  // namespace fastllm
