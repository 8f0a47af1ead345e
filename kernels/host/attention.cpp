// Causal grouped-query attention, FlashAttention-2 style: the score matrix exists one
// [tile rows x key block] piece at a time per thread, the forward keeps an online softmax, and the
// backward recomputes the probabilities from the saved log-sum-exp.
//
// Packed documents (positions given) narrow each query's keys to its own document's; key blocks
// that no query of a tile sees are skipped, forward and backward.
//
// A tile packs the queries of the `group` heads that share one KV head, for a run of positions, as
// the rows of one matrix (row r = (position - first position) * group + head in group): every GEMM
// against that KV head's keys then serves the whole group, and K/V are never repeated.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/host/host_backend.h"
#include "kernels/host/host_util.h"

namespace fastllm {
namespace {

constexpr std::int64_t kTileRows = 128;  // packed query rows per tile (positions x group)
constexpr std::int64_t kKeyBlock = 128;  // keys per block of the score matrix

// The per-block softmax loops are vectorised at each width FASTLLM_VECTOR_CLONES names.

// The forward's online-softmax step on one block of scores [rows, n]: the visible scores [lo, hi)
// of each row become exp(score - new row max), the rest 0; where the row max grows, the running
// sum and the output accumulator [rows, dim] are rescaled to it.
FASTLLM_VECTOR_CLONES
void softmax_step(float* scores, std::int64_t n, std::int64_t rows, const std::int32_t* lo,
                  const std::int32_t* hi, float* row_max, float* row_sum, float* acc,
                  std::int64_t dim) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * n;
    const std::int64_t first = lo[r];
    const std::int64_t end = std::max(hi[r], lo[r]);
    std::fill(s, s + first, 0.0f);
    std::fill(s + end, s + n, 0.0f);
    if (first == end) continue;
    std::int32_t max_bits = std::numeric_limits<std::int32_t>::min();
    for (std::int64_t c = first; c < end; ++c)
      max_bits = std::max(max_bits, host::ordered_bits(std::bit_cast<std::int32_t>(s[c])));
    const float block_max = std::bit_cast<float>(host::ordered_bits(max_bits));
    const float old_max = row_max[r];
    const float new_max = std::max(old_max, block_max);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t c = first; c < end; ++c) {
      const float e = host::exp_lane(s[c] - new_max);
      s[c] = e;
      sum += e;
    }
    if (new_max != old_max) {
      // exp(-inf) = 0 on the row's first visible block, where the accumulator is still zero.
      const float correction = std::exp(old_max - new_max);
      row_sum[r] *= correction;
      float* a = acc + r * dim;
      for (std::int64_t c = 0; c < dim; ++c)
        a[c] *= correction;
      row_max[r] = new_max;
    }
    row_sum[r] += sum;
  }
}

// The backward's step on one block [rows, n]: scores become P = exp(score - lse) and dscores,
// holding dP on entry, become dS = P * (dP - delta), both 0 outside each row's [lo, hi).
FASTLLM_VECTOR_CLONES
void gradient_step(float* scores, float* dscores, std::int64_t n, std::int64_t rows,
                   const std::int32_t* lo, const std::int32_t* hi, const float* row_lse,
                   const float* row_delta) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * n;
    float* ds = dscores + r * n;
    const std::int64_t first = lo[r];
    const std::int64_t end = std::max(hi[r], lo[r]);
    std::fill(s, s + first, 0.0f);
    std::fill(s + end, s + n, 0.0f);
    std::fill(ds, ds + first, 0.0f);
    std::fill(ds + end, ds + n, 0.0f);
    const float lse = row_lse[r];
    const float delta = row_delta[r];
    for (std::int64_t c = first; c < end; ++c) {
      const float p = host::exp_lane(s[c] - lse);
      s[c] = p;
      ds[c] = p * (ds[c] - delta);
    }
  }
}

struct Geometry {
  std::int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, dim = 0, group = 0, window = 0;
  float scale = 0;
  const std::int32_t* positions = nullptr;  // [batch, seq] positions in documents, or none

  std::int64_t kv_stride() const { return kv_heads * dim; }  // between positions of k, v
  std::int64_t tile_positions() const { return std::max<std::int64_t>(1, kTileRows / group); }
  std::int64_t tiles() const { return (seq + tile_positions() - 1) / tile_positions(); }
  std::int64_t max_rows() const { return std::min(tile_positions(), seq) * group; }
  // Non-decreasing in query (documents are contiguous), so a tile's first query has the tile's
  // first key.
  std::int64_t first_key(std::int64_t b, std::int64_t query) const {
    const std::int64_t first = window > 0 ? std::max<std::int64_t>(0, query - window + 1) : 0;
    return positions ? std::max<std::int64_t>(first, query - positions[b * seq + query]) : first;
  }
  std::int64_t last_query(std::int64_t key) const {
    return window > 0 ? std::min(seq - 1, key + window - 1) : seq - 1;
  }
  std::int64_t q_offset(std::int64_t b, std::int64_t pos, std::int64_t head) const {
    return ((b * seq + pos) * heads + head) * dim;
  }
  std::int64_t kv_offset(std::int64_t b, std::int64_t pos, std::int64_t kv_head) const {
    return ((b * seq + pos) * kv_heads + kv_head) * dim;
  }
  std::int64_t lse_offset(std::int64_t b, std::int64_t head, std::int64_t pos) const {
    return (b * heads + head) * seq + pos;
  }
};

std::string shape_string(const Tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.rank; ++i)
    s += (i ? ", " : "") + std::to_string(t.dims[i]);
  return s + "]";
}

void require_shape(const Tensor& t, std::initializer_list<std::int64_t> shape, const char* op,
                   const char* name) {
  host::require_dtype(t, DType::F32, op, name);
  bool same = t.rank == static_cast<int>(shape.size());
  int axis = 0;
  for (auto d : shape)
    same = same && t.dims[axis++] == d;
  if (!same) {
    Tensor expected(nullptr, DType::F32, shape);
    host::fail(op, std::string(name) + " has shape " + shape_string(t) + ", expected " +
                       shape_string(expected));
  }
}

// Each row's positions restart at 0 where a document starts and count up by one within it.
void check_positions(const char* op, const Tensor& positions, Geometry& g) {
  if (!positions.data) return;
  host::require_dtype(positions, DType::I32, op, "positions");
  if (positions.rank != 2 || positions.dims[0] != g.batch || positions.dims[1] != g.seq)
    host::fail(op, "positions has shape " + shape_string(positions) + ", expected [" +
                       std::to_string(g.batch) + ", " + std::to_string(g.seq) + "]");
  const std::int32_t* p = positions.as<std::int32_t>();
  for (std::int64_t b = 0; b < g.batch; ++b) {
    for (std::int64_t i = 0; i < g.seq; ++i) {
      const std::int64_t value = p[b * g.seq + i];
      const std::int64_t previous = i > 0 ? p[b * g.seq + i - 1] : -1;
      if (value != 0 && value != previous + 1)
        host::fail(op, "positions[" + std::to_string(b) + ", " + std::to_string(i) + "] is " +
                           std::to_string(value) + ", expected 0 (a document starts) or " +
                           std::to_string(previous + 1));
    }
  }
  g.positions = p;
}

Geometry geometry(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  std::int64_t window) {
  host::require_dtype(q, DType::F32, op, "q");
  if (q.rank != 4)
    host::fail(op, "q has shape " + shape_string(q) + ", expected [batch, seq, heads, head_dim]");
  Geometry g;
  g.batch = q.size(0);
  g.seq = q.size(1);
  g.heads = q.size(2);
  g.dim = q.size(3);
  g.kv_heads = k.rank == 4 ? k.size(2) : 0;
  g.window = window;
  if (g.dim <= 0) host::fail(op, "head_dim is " + std::to_string(g.dim) + ", expected > 0");
  if (g.kv_heads <= 0 || g.heads % g.kv_heads != 0)
    host::fail(op, "k has " + std::to_string(g.kv_heads) + " heads, expected a divisor of the " +
                       std::to_string(g.heads) + " query heads");
  if (window < 0) host::fail(op, "window is " + std::to_string(window) + ", expected >= 0");
  require_shape(k, {g.batch, g.seq, g.kv_heads, g.dim}, op, "k");
  require_shape(v, {g.batch, g.seq, g.kv_heads, g.dim}, op, "v");
  g.group = g.heads / g.kv_heads;
  // As transformers: the score GEMM's result times head_dim^-0.5 rounded to float32.
  g.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.dim)));
  return g;
}

// Query positions [p0, p1) of the heads sharing KV head kv_head in batch row b.
struct Tile {
  std::int64_t b, kv_head, p0, p1;
  std::int64_t rows(const Geometry& g) const { return (p1 - p0) * g.group; }
  std::int64_t position(const Geometry& g, std::int64_t row) const { return p0 + row / g.group; }
  std::int64_t head(const Geometry& g, std::int64_t row) const {
    return kv_head * g.group + row % g.group;
  }
};

// Per-thread scratch, sized for the largest tile.
struct Workspace {
  std::vector<float> q, dout, acc, scores, dscores, row_max, row_sum, row_lse, row_delta;
  std::vector<std::int32_t> lo, hi;  // each row's visible columns in the current key block
  explicit Workspace(const Geometry& g)
      : q(static_cast<std::size_t>(g.max_rows() * g.dim)),
        dout(q.size()),
        acc(q.size()),
        scores(static_cast<std::size_t>(g.max_rows() * kKeyBlock)),
        dscores(scores.size()),
        row_max(static_cast<std::size_t>(g.max_rows())),
        row_sum(row_max.size()),
        row_lse(row_max.size()),
        row_delta(row_max.size()),
        lo(row_max.size()),
        hi(row_max.size()) {}
};

// The group's rows of a [batch, seq, heads, dim] tensor for the tile's positions are one contiguous
// run of group * dim floats per position.
void pack(const Geometry& g, const float* src, const Tile& t, float* dst) {
  const std::int64_t width = g.group * g.dim;
  for (std::int64_t p = t.p0; p < t.p1; ++p)
    std::copy_n(src + g.q_offset(t.b, p, t.kv_head * g.group), width, dst + (p - t.p0) * width);
}

void unpack(const Geometry& g, const float* src, const Tile& t, float* dst) {
  const std::int64_t width = g.group * g.dim;
  for (std::int64_t p = t.p0; p < t.p1; ++p)
    std::copy_n(src + (p - t.p0) * width, width, dst + g.q_offset(t.b, p, t.kv_head * g.group));
}

// For each tile row, the keys [lo, hi) of the block [j0, j0 + n) its query sees, relative to j0;
// lo >= hi when it sees none. Returns whether any row sees a key of the block.
bool visible_keys(const Geometry& g, const Tile& t, std::int64_t j0, std::int64_t n,
                  Workspace& ws) {
  bool any = false;
  for (std::int64_t r = 0; r < t.rows(g); ++r) {
    const std::int64_t position = t.position(g, r);
    ws.lo[r] =
        static_cast<std::int32_t>(std::clamp<std::int64_t>(g.first_key(t.b, position) - j0, 0, n));
    ws.hi[r] = static_cast<std::int32_t>(std::clamp<std::int64_t>(position + 1 - j0, 0, n));
    any = any || ws.lo[r] < ws.hi[r];
  }
  return any;
}

void zero_kv_rows(const Geometry& g, float* dst, std::int64_t b, std::int64_t kv_head,
                  std::int64_t p0, std::int64_t p1) {
  for (std::int64_t p = p0; p < p1; ++p)
    std::fill_n(dst + g.kv_offset(b, p, kv_head), g.dim, 0.0f);
}

struct Inputs {
  const float* q;
  const float* k;
  const float* v;
};

void forward_tile(const Geometry& g, const Inputs& in, const Tile& t, Workspace& ws, float* out,
                  float* lse) {
  const std::int64_t rows = t.rows(g);
  const std::int64_t d = g.dim;
  pack(g, in.q, t, ws.q.data());
  std::fill_n(ws.acc.data(), rows * d, 0.0f);
  std::fill_n(ws.row_max.data(), rows, -std::numeric_limits<float>::infinity());
  std::fill_n(ws.row_sum.data(), rows, 0.0f);
  for (std::int64_t j0 = g.first_key(t.b, t.p0); j0 < t.p1; j0 += kKeyBlock) {
    const std::int64_t n = std::min(kKeyBlock, t.p1 - j0);
    if (!visible_keys(g, t, j0, n, ws)) continue;
    float* s = ws.scores.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                static_cast<int>(n), static_cast<int>(d), g.scale, ws.q.data(), static_cast<int>(d),
                in.k + g.kv_offset(t.b, j0, t.kv_head), static_cast<int>(g.kv_stride()), 0.0f, s,
                static_cast<int>(n));
    softmax_step(s, n, rows, ws.lo.data(), ws.hi.data(), ws.row_max.data(), ws.row_sum.data(),
                 ws.acc.data(), d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                static_cast<int>(d), static_cast<int>(n), 1.0f, s, static_cast<int>(n),
                in.v + g.kv_offset(t.b, j0, t.kv_head), static_cast<int>(g.kv_stride()), 1.0f,
                ws.acc.data(), static_cast<int>(d));
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    // Every query sees at least itself, so the sum is >= 1.
    const float inv = 1.0f / ws.row_sum[r];
    float* acc = ws.acc.data() + r * d;
#pragma omp simd
    for (std::int64_t c = 0; c < d; ++c)
      acc[c] *= inv;
    lse[g.lse_offset(t.b, t.head(g, r), t.position(g, r))] =
        ws.row_max[r] + std::log(ws.row_sum[r]);
  }
  unpack(g, ws.acc.data(), t, out);
}

struct Gradients {
  const float* out;
  const float* lse;
  const float* dout;
  float* dq;
  float* dk;
  float* dv;
};

// Loads the tile's queries, output gradients, lse and D = rowsum(dout * out) into the workspace.
void load_backward_tile(const Geometry& g, const Inputs& in, const Gradients& gr, const Tile& t,
                        Workspace& ws) {
  const std::int64_t d = g.dim;
  pack(g, in.q, t, ws.q.data());
  pack(g, gr.dout, t, ws.dout.data());
  for (std::int64_t r = 0; r < t.rows(g); ++r) {
    const std::int64_t p = t.position(g, r);
    const std::int64_t h = t.head(g, r);
    const float* o = gr.out + g.q_offset(t.b, p, h);
    const float* dout = ws.dout.data() + r * d;
    float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
    for (std::int64_t c = 0; c < d; ++c)
      delta += dout[c] * o[c];
    ws.row_delta[r] = delta;
    ws.row_lse[r] = gr.lse[g.lse_offset(t.b, h, p)];
  }
}

// For the loaded tile against keys [j0, j0 + n): P = exp(S - lse) into ws.scores and
// dS = P * (dP - D), dP = dout V^T, into ws.dscores; invisible entries are 0 in both. Returns
// false, computing nothing, when no query of the tile sees a key of the block.
bool probabilities_and_dscores(const Geometry& g, const Inputs& in, const Tile& t, std::int64_t j0,
                               std::int64_t n, Workspace& ws) {
  if (!visible_keys(g, t, j0, n, ws)) return false;
  const auto rows = static_cast<int>(t.rows(g));
  const auto keys = static_cast<int>(n);
  const auto d = static_cast<int>(g.dim);
  const auto ld = static_cast<int>(g.kv_stride());
  const std::int64_t offset = g.kv_offset(t.b, j0, t.kv_head);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, d, g.scale, ws.q.data(), d,
              in.k + offset, ld, 0.0f, ws.scores.data(), keys);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, d, 1.0f, ws.dout.data(), d,
              in.v + offset, ld, 0.0f, ws.dscores.data(), keys);
  gradient_step(ws.scores.data(), ws.dscores.data(), n, rows, ws.lo.data(), ws.hi.data(),
                ws.row_lse.data(), ws.row_delta.data());
  return true;
}

// dV[j0, j0 + n) += P^T dout, dK[j0, j0 + n) += scale dS^T Q.
void accumulate_dkdv(const Geometry& g, const Gradients& gr, const Tile& t, std::int64_t j0,
                     std::int64_t n, const Workspace& ws) {
  const auto rows = static_cast<int>(t.rows(g));
  const auto keys = static_cast<int>(n);
  const auto d = static_cast<int>(g.dim);
  const auto ld = static_cast<int>(g.kv_stride());
  const std::int64_t offset = g.kv_offset(t.b, j0, t.kv_head);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, d, rows, 1.0f, ws.scores.data(), keys,
              ws.dout.data(), d, 1.0f, gr.dv + offset, ld);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, d, rows, g.scale, ws.dscores.data(),
              keys, ws.q.data(), d, 1.0f, gr.dk + offset, ld);
}

// The tile's dQ accumulator += scale dS K.
void accumulate_dq(const Geometry& g, const Inputs& in, const Tile& t, std::int64_t j0,
                   std::int64_t n, Workspace& ws) {
  const auto keys = static_cast<int>(n);
  const auto d = static_cast<int>(g.dim);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(t.rows(g)), d, keys,
              g.scale, ws.dscores.data(), keys, in.k + g.kv_offset(t.b, j0, t.kv_head),
              static_cast<int>(g.kv_stride()), 1.0f, ws.acc.data(), d);
}

// One task per (batch, KV head) does everything for its group: its dq rows and its dk, dv rows
// belong to it alone. Five GEMMs per (tile, key block).
void backward_by_kv_head(const Geometry& g, const Inputs& in, const Gradients& gr) {
  const std::int64_t tasks = g.batch * g.kv_heads;
#pragma omp parallel
  {
    Workspace ws(g);
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t b = task / g.kv_heads;
      const std::int64_t kv_head = task % g.kv_heads;
      zero_kv_rows(g, gr.dk, b, kv_head, 0, g.seq);
      zero_kv_rows(g, gr.dv, b, kv_head, 0, g.seq);
      for (std::int64_t p0 = 0; p0 < g.seq; p0 += g.tile_positions()) {
        const Tile t{b, kv_head, p0, std::min(g.seq, p0 + g.tile_positions())};
        load_backward_tile(g, in, gr, t, ws);
        std::fill_n(ws.acc.data(), t.rows(g) * g.dim, 0.0f);
        for (std::int64_t j0 = g.first_key(b, t.p0); j0 < t.p1; j0 += kKeyBlock) {
          const std::int64_t n = std::min(kKeyBlock, t.p1 - j0);
          if (!probabilities_and_dscores(g, in, t, j0, n, ws)) continue;
          accumulate_dkdv(g, gr, t, j0, n, ws);
          accumulate_dq(g, in, t, j0, n, ws);
        }
        unpack(g, ws.acc.data(), t, gr.dq);
      }
    }
  }
}

// When (batch, KV head) pairs are too few to keep the threads busy: one pass per key block for
// dK, dV, one per tile for dQ, which recomputes P and dS (seven GEMMs per block pair, not five).
void backward_two_passes(const Geometry& g, const Inputs& in, const Gradients& gr) {
  const std::int64_t key_blocks = (g.seq + kKeyBlock - 1) / kKeyBlock;
  const std::int64_t tiles = g.tiles();
#pragma omp parallel
  {
    Workspace ws(g);
    // Early key blocks are seen by the most queries: dynamic scheduling in this order balances.
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < g.batch * g.kv_heads * key_blocks; ++task) {
      const std::int64_t b = task / (g.kv_heads * key_blocks);
      const std::int64_t kv_head = task / key_blocks % g.kv_heads;
      const std::int64_t j0 = task % key_blocks * kKeyBlock;
      const std::int64_t n = std::min(kKeyBlock, g.seq - j0);
      zero_kv_rows(g, gr.dk, b, kv_head, j0, j0 + n);
      zero_kv_rows(g, gr.dv, b, kv_head, j0, j0 + n);
      const std::int64_t query_end = g.last_query(j0 + n - 1) + 1;
      for (std::int64_t p0 = j0; p0 < query_end; p0 += g.tile_positions()) {
        // Later queries start their documents after the block too.
        if (g.first_key(b, p0) >= j0 + n) break;
        const Tile t{b, kv_head, p0, std::min(query_end, p0 + g.tile_positions())};
        load_backward_tile(g, in, gr, t, ws);
        if (!probabilities_and_dscores(g, in, t, j0, n, ws)) continue;
        accumulate_dkdv(g, gr, t, j0, n, ws);
      }
    }
    // Late tiles see the most keys: start with them.
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < g.batch * g.kv_heads * tiles; ++task) {
      const std::int64_t b = task / (g.kv_heads * tiles);
      const std::int64_t kv_head = task / tiles % g.kv_heads;
      const std::int64_t p0 = (tiles - 1 - task % tiles) * g.tile_positions();
      const Tile t{b, kv_head, p0, std::min(g.seq, p0 + g.tile_positions())};
      load_backward_tile(g, in, gr, t, ws);
      std::fill_n(ws.acc.data(), t.rows(g) * g.dim, 0.0f);
      for (std::int64_t j0 = g.first_key(b, t.p0); j0 < t.p1; j0 += kKeyBlock) {
        const std::int64_t n = std::min(kKeyBlock, t.p1 - j0);
        if (!probabilities_and_dscores(g, in, t, j0, n, ws)) continue;
        accumulate_dq(g, in, t, j0, n, ws);
      }
      unpack(g, ws.acc.data(), t, gr.dq);
    }
  }
}

}  // namespace

void HostBackend::attention_forward(Tensor q, Tensor k, Tensor v, std::int64_t window, Tensor out,
                                    Tensor lse) {
  document_attention_forward(q, k, v, Tensor(), window, out, lse);
}

void HostBackend::attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                     Tensor dout, std::int64_t window, Tensor dq, Tensor dk,
                                     Tensor dv) {
  document_attention_backward(q, k, v, out, lse, dout, Tensor(), window, dq, dk, dv);
}

void HostBackend::document_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions,
                                             std::int64_t window, Tensor out, Tensor lse) {
  const char* op = "attention_forward";
  Geometry g = geometry(op, q, k, v, window);
  check_positions(op, positions, g);
  require_shape(out, {g.batch, g.seq, g.heads, g.dim}, op, "out");
  require_shape(lse, {g.batch, g.heads, g.seq}, op, "lse");
  if (q.numel() == 0) return;
  const Inputs in{q.as<float>(), k.as<float>(), v.as<float>()};
  float* out_data = out.as<float>();
  float* lse_data = lse.as<float>();
  const std::int64_t tiles = g.tiles();
#pragma omp parallel
  {
    Workspace ws(g);
    // Late tiles see the most keys: start with them.
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < g.batch * g.kv_heads * tiles; ++task) {
      const std::int64_t b = task / (g.kv_heads * tiles);
      const std::int64_t kv_head = task / tiles % g.kv_heads;
      const std::int64_t p0 = (tiles - 1 - task % tiles) * g.tile_positions();
      const Tile t{b, kv_head, p0, std::min(g.seq, p0 + g.tile_positions())};
      forward_tile(g, in, t, ws, out_data, lse_data);
    }
  }
}

void HostBackend::document_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                              Tensor dout, Tensor positions, std::int64_t window,
                                              Tensor dq, Tensor dk, Tensor dv) {
  const char* op = "attention_backward";
  Geometry g = geometry(op, q, k, v, window);
  check_positions(op, positions, g);
  require_shape(out, {g.batch, g.seq, g.heads, g.dim}, op, "out");
  require_shape(dout, {g.batch, g.seq, g.heads, g.dim}, op, "dout");
  require_shape(dq, {g.batch, g.seq, g.heads, g.dim}, op, "dq");
  require_shape(lse, {g.batch, g.heads, g.seq}, op, "lse");
  require_shape(dk, {g.batch, g.seq, g.kv_heads, g.dim}, op, "dk");
  require_shape(dv, {g.batch, g.seq, g.kv_heads, g.dim}, op, "dv");
  if (q.numel() == 0) return;
  const Inputs in{q.as<float>(), k.as<float>(), v.as<float>()};
  const Gradients gr{out.as<float>(), lse.as<float>(), dout.as<float>(),
                     dq.as<float>(),  dk.as<float>(),  dv.as<float>()};
  // Per (batch, KV head) task is cheaper per block pair; it wins while its share of busy threads
  // stays above 5/7, the two-pass cost ratio.
  const std::int64_t tasks = g.batch * g.kv_heads;
  const std::int64_t threads = omp_get_max_threads();
  const std::int64_t rounds = (tasks + threads - 1) / threads;
  if (7 * tasks >= 5 * threads * rounds)
    backward_by_kv_head(g, in, gr);
  else
    backward_two_passes(g, in, gr);
}

}  // namespace fastllm
