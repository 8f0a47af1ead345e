// Causal grouped-query attention with an optional sliding window, and optionally over packed
// documents (a query sees only its own document's keys), FlashAttention-2 style: the
// score matrix exists one [32 queries x 32 keys] tile at a time in shared memory, the forward
// keeps an online softmax and saves the log-sum-exp, the backward recomputes the probabilities
// from it. The backward runs as two kernels, one per (KV head, key tile) for dK and dV over every
// query that sees the tile, one per (head, query tile) for dQ, so that each output element has
// one owner: no atomics, and the same bits on every run.
//
// Two paths compute this: tensor cores (mma.sync, bf16 tensors with head_dim 64 or 128, the models
// fastllm trains) and a portable one (f32 arithmetic on the CUDA cores, any head_dim up to 256, f32
// or bf16 tensors) for everything else, or for all when FASTLLM_CUDA_ATTENTION=simt.
#include <cmath>
#include <string>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

constexpr int kRows = 32;  // queries per tile
constexpr int kCols = 32;  // keys per tile
constexpr int kLanes = 8;  // threads sharing one row (a query, or a key in the dK/dV kernel)
constexpr int kThreads = kRows * kLanes;
static_assert(kRows == kCols, "the dK/dV kernel gives one key per row of threads");

struct Geometry {
  std::int64_t batch, seq, heads, kv_heads, dim, group, window;
  float scale;
  // Packed documents: each token's position in its document ([batch, seq]), or null. Trusted to be
  // 0 at a document start and the previous + 1 otherwise (the host checked them where they were
  // made), so a document's start i - positions[i] never decreases along a row.
  const std::int32_t* positions;

  // The first key query sees; not decreasing in query, so a tile's first query has the tile's.
  __host__ __device__ std::int64_t first_key(std::int64_t b, std::int64_t query) const {
    const std::int64_t first = window > 0 ? max(std::int64_t{0}, query - window + 1) : 0;
    return positions ? max(first, query - positions[b * seq + query]) : first;
  }
  __host__ __device__ std::int64_t last_query(std::int64_t key) const {
    return window > 0 ? min(seq - 1, key + window - 1) : seq - 1;
  }
  __host__ __device__ bool sees(std::int64_t b, std::int64_t i, std::int64_t j) const {
    return i < seq && j < seq && j <= i && (window == 0 || j > i - window) &&
           (!positions || j >= i - positions[b * seq + i]);
  }
  __host__ __device__ std::int64_t q_offset(std::int64_t b, std::int64_t pos,
                                            std::int64_t head) const {
    return ((b * seq + pos) * heads + head) * dim;
  }
  __host__ __device__ std::int64_t kv_offset(std::int64_t b, std::int64_t pos,
                                             std::int64_t kv_head) const {
    return ((b * seq + pos) * kv_heads + kv_head) * dim;
  }
  __host__ __device__ std::int64_t lse_offset(std::int64_t b, std::int64_t head,
                                              std::int64_t pos) const {
    return (b * heads + head) * seq + pos;
  }
};

// Sum over the kLanes consecutive lanes of a row group.
__device__ __forceinline__ float row_sum(float v) {
  for (int offset = kLanes / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ float row_max(float v) {
  for (int offset = kLanes / 2; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Rows [first, first + count) of a [.., stride_rows, dim] tensor into shared [count][ld], as f32;
// rows past `valid` are zero.
template <class T>
__device__ void load_tile(float* dst, int ld, const T* src, std::int64_t row_stride,
                          std::int64_t dim, int count, int valid) {
  for (int idx = threadIdx.x; idx < count * dim; idx += blockDim.x) {
    const int r = idx / static_cast<int>(dim);
    const int d = idx % static_cast<int>(dim);
    dst[r * ld + d] = r < valid ? to_f32(src[r * row_stride + d]) : 0.0f;
  }
}

template <class T, int kMaxD>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(Geometry g, const T* q, const T* k, const T* v, T* out, float* lse) {
  extern __shared__ float smem[];
  const int dim = static_cast<int>(g.dim);
  const int ld = dim + 1;
  float* q_s = smem;               // [kRows][dim + 1]
  float* k_s = q_s + kRows * ld;   // [kCols][dim + 1]
  float* v_s = k_s + kCols * ld;   // [kCols][dim]
  float* p_s = v_s + kCols * dim;  // [kRows][kCols + 1]
  const std::int64_t b = blockIdx.z;
  const std::int64_t h = blockIdx.y;
  const std::int64_t kv_head = h / g.group;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * kRows;
  const int r = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const std::int64_t i = i0 + r;
  const int q_rows = static_cast<int>(min(std::int64_t{kRows}, g.seq - i0));

  load_tile(q_s, ld, q + g.q_offset(b, i0, h), g.heads * g.dim, g.dim, kRows, q_rows);
  float acc[kMaxD / kLanes];
#pragma unroll
  for (int u = 0; u < kMaxD / kLanes; ++u)
    acc[u] = 0.0f;
  float m = -INFINITY;
  float l = 0.0f;
  const std::int64_t key_end = min(g.seq, i0 + kRows);
  for (std::int64_t j0 = g.first_key(b, i0) / kCols * kCols; j0 < key_end; j0 += kCols) {
    const int k_rows = static_cast<int>(min(std::int64_t{kCols}, g.seq - j0));
    __syncthreads();  // the previous tile is consumed
    load_tile(k_s, ld, k + g.kv_offset(b, j0, kv_head), g.kv_heads * g.dim, g.dim, kCols, k_rows);
    load_tile(v_s, dim, v + g.kv_offset(b, j0, kv_head), g.kv_heads * g.dim, g.dim, kCols, k_rows);
    __syncthreads();
    float s[kCols / kLanes];
    bool visible[kCols / kLanes];
    float tile_max = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < kCols / kLanes; ++jj) {
      const int c = lane + kLanes * jj;
      float dot = 0.0f;
      for (int d = 0; d < dim; ++d)
        dot += q_s[r * ld + d] * k_s[c * ld + d];
      s[jj] = dot * g.scale;
      visible[jj] = g.sees(b, i, j0 + c);
      if (visible[jj]) tile_max = fmaxf(tile_max, s[jj]);
    }
    const float m_new = fmaxf(m, row_max(tile_max));
    float p_sum = 0.0f;
#pragma unroll
    for (int jj = 0; jj < kCols / kLanes; ++jj) {
      // No key seen yet (m_new = -inf): every p is 0 and the state stays empty.
      const float p = visible[jj] && m_new != -INFINITY ? expf(s[jj] - m_new) : 0.0f;
      p_s[r * (kCols + 1) + lane + kLanes * jj] = p;
      p_sum += p;
    }
    const float correction = m_new == -INFINITY ? 1.0f : expf(m - m_new);
    l = l * correction + row_sum(p_sum);
    m = m_new;
    __syncwarp();  // a row's p values come from the lanes of its own warp
#pragma unroll
    for (int u = 0; u < kMaxD / kLanes; ++u) {
      const int d = lane + kLanes * u;
      if (d < dim) {
        float a = acc[u] * correction;
        for (int c = 0; c < kCols; ++c)
          a += p_s[r * (kCols + 1) + c] * v_s[c * dim + d];
        acc[u] = a;
      }
    }
  }
  if (r < q_rows) {
    T* o = out + g.q_offset(b, i, h);
#pragma unroll
    for (int u = 0; u < kMaxD / kLanes; ++u) {
      const int d = lane + kLanes * u;
      if (d < dim) {
        o[d] = from_f32<T>(acc[u] / l);
      }
    }
    if (lane == 0) lse[g.lse_offset(b, h, i)] = m + logf(l);
  }
}

// delta[b, h, i] = sum_d dout * out, the softmax backward's row term.
template <class T>
__global__ void attention_delta_kernel(Geometry g, const T* out, const T* dout, float* delta) {
  const std::int64_t rows = g.batch * g.seq * g.heads;
  const std::int64_t warp = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * blockDim.x / 32;
  for (std::int64_t row = warp; row < rows; row += warps) {
    // row = (b * seq + i) * heads + h, the layout of out.
    const T* o = out + row * g.dim;
    const T* d_o = dout + row * g.dim;
    float sum = 0.0f;
    for (std::int64_t d = lane; d < g.dim; d += 32)
      sum += to_f32(d_o[d]) * to_f32(o[d]);
    sum = warp_sum(sum);
    const std::int64_t h = row % g.heads;
    const std::int64_t i = row / g.heads % g.seq;
    const std::int64_t b = row / (g.heads * g.seq);
    if (lane == 0) delta[g.lse_offset(b, h, i)] = sum;
  }
}

// For query rows [i0, i0 + kRows) against keys [j0, j0 + kCols), in shared memory: P = exp(S - lse)
// into p_s (when given) and dS = P (dP - delta), dP = dout V^T, into ds_s; 0 where not visible.
// Thread (r, lane) computes columns lane + kLanes * jj of row r.
__device__ void probabilities_and_dscores(const Geometry& g, std::int64_t b, std::int64_t i0,
                                          std::int64_t j0, const float* q_s, const float* do_s,
                                          const float* k_s, const float* v_s, int ld,
                                          const float* lse_s, const float* delta_s, float* p_s,
                                          float* ds_s) {
  const int r = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int dim = static_cast<int>(g.dim);
#pragma unroll
  for (int jj = 0; jj < kCols / kLanes; ++jj) {
    const int c = lane + kLanes * jj;
    float p = 0.0f;
    float ds = 0.0f;
    if (g.sees(b, i0 + r, j0 + c)) {
      float dot = 0.0f;
      float dp = 0.0f;
      for (int d = 0; d < dim; ++d) {
        dot += q_s[r * ld + d] * k_s[c * ld + d];
        dp += do_s[r * ld + d] * v_s[c * ld + d];
      }
      p = expf(dot * g.scale - lse_s[r]);
      ds = p * (dp - delta_s[r]);
    }
    if (p_s) p_s[r * (kCols + 1) + c] = p;
    ds_s[r * (kCols + 1) + c] = ds;
  }
}

// Loads the query-side tile [i0, i0 + kRows) of head h: q, dout, lse and delta.
template <class T>
__device__ void load_query_tile(const Geometry& g, std::int64_t b, std::int64_t h, std::int64_t i0,
                                const T* q, const T* dout, const float* lse, const float* delta,
                                float* q_s, float* do_s, float* lse_s, float* delta_s) {
  const int ld = static_cast<int>(g.dim) + 1;
  const int rows = static_cast<int>(min(std::int64_t{kRows}, g.seq - i0));
  load_tile(q_s, ld, q + g.q_offset(b, i0, h), g.heads * g.dim, g.dim, kRows, rows);
  load_tile(do_s, ld, dout + g.q_offset(b, i0, h), g.heads * g.dim, g.dim, kRows, rows);
  for (int t = threadIdx.x; t < kRows; t += blockDim.x) {
    lse_s[t] = t < rows ? lse[g.lse_offset(b, h, i0 + t)] : 0.0f;
    delta_s[t] = t < rows ? delta[g.lse_offset(b, h, i0 + t)] : 0.0f;
  }
}

template <class T, int kMaxD>
__global__ void __launch_bounds__(kThreads)
    attention_dkdv_kernel(Geometry g, const T* q, const T* k, const T* v, const T* dout,
                          const float* lse, const float* delta, T* dk, T* dv) {
  extern __shared__ float smem[];
  const int dim = static_cast<int>(g.dim);
  const int ld = dim + 1;
  float* k_s = smem;
  float* v_s = k_s + kCols * ld;
  float* q_s = v_s + kCols * ld;
  float* do_s = q_s + kRows * ld;
  float* p_s = do_s + kRows * ld;
  float* ds_s = p_s + kRows * (kCols + 1);
  float* lse_s = ds_s + kRows * (kCols + 1);
  float* delta_s = lse_s + kRows;
  const std::int64_t b = blockIdx.z;
  const std::int64_t kv_head = blockIdx.y;
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kCols;
  const int c = threadIdx.x / kLanes;  // this thread's key in the tile
  const int lane = threadIdx.x % kLanes;
  const int k_rows = static_cast<int>(min(std::int64_t{kCols}, g.seq - j0));
  load_tile(k_s, ld, k + g.kv_offset(b, j0, kv_head), g.kv_heads * g.dim, g.dim, kCols, k_rows);
  load_tile(v_s, ld, v + g.kv_offset(b, j0, kv_head), g.kv_heads * g.dim, g.dim, kCols, k_rows);
  float dk_acc[kMaxD / kLanes];
  float dv_acc[kMaxD / kLanes];
#pragma unroll
  for (int u = 0; u < kMaxD / kLanes; ++u) {
    dk_acc[u] = 0.0f;
    dv_acc[u] = 0.0f;
  }
  // Queries that see a key of this tile: from its first key to the last key's last query.
  const std::int64_t query_end = g.last_query(min(g.seq, j0 + kCols) - 1) + 1;
  for (std::int64_t h = kv_head * g.group; h < (kv_head + 1) * g.group; ++h) {
    for (std::int64_t i0 = j0 / kRows * kRows; i0 < query_end; i0 += kRows) {
      // Later queries start their documents after this key tile too (uniform over the block).
      if (g.first_key(b, i0) >= j0 + kCols) break;
      __syncthreads();  // the previous query tile is consumed
      load_query_tile(g, b, h, i0, q, dout, lse, delta, q_s, do_s, lse_s, delta_s);
      __syncthreads();
      probabilities_and_dscores(g, b, i0, j0, q_s, do_s, k_s, v_s, ld, lse_s, delta_s, p_s, ds_s);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kMaxD / kLanes; ++u) {
        const int d = lane + kLanes * u;
        if (d < dim) {
          float a_v = dv_acc[u];
          float a_k = dk_acc[u];
          for (int row = 0; row < kRows; ++row) {
            a_v += p_s[row * (kCols + 1) + c] * do_s[row * ld + d];
            a_k += ds_s[row * (kCols + 1) + c] * q_s[row * ld + d];
          }
          dv_acc[u] = a_v;
          dk_acc[u] = a_k;
        }
      }
    }
  }
  if (c < k_rows) {
    T* dk_row = dk + g.kv_offset(b, j0 + c, kv_head);
    T* dv_row = dv + g.kv_offset(b, j0 + c, kv_head);
#pragma unroll
    for (int u = 0; u < kMaxD / kLanes; ++u) {
      const int d = lane + kLanes * u;
      if (d < dim) {
        dk_row[d] = from_f32<T>(dk_acc[u] * g.scale);
        dv_row[d] = from_f32<T>(dv_acc[u]);
      }
    }
  }
}

template <class T, int kMaxD>
__global__ void __launch_bounds__(kThreads)
    attention_dq_kernel(Geometry g, const T* q, const T* k, const T* v, const T* dout,
                        const float* lse, const float* delta, T* dq) {
  extern __shared__ float smem[];
  const int dim = static_cast<int>(g.dim);
  const int ld = dim + 1;
  float* q_s = smem;
  float* do_s = q_s + kRows * ld;
  float* k_s = do_s + kRows * ld;
  float* v_s = k_s + kCols * ld;
  float* ds_s = v_s + kCols * ld;
  float* lse_s = ds_s + kRows * (kCols + 1);
  float* delta_s = lse_s + kRows;
  const std::int64_t b = blockIdx.z;
  const std::int64_t h = blockIdx.y;
  const std::int64_t kv_head = h / g.group;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * kRows;
  const int r = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  load_query_tile(g, b, h, i0, q, dout, lse, delta, q_s, do_s, lse_s, delta_s);
  float dq_acc[kMaxD / kLanes];
#pragma unroll
  for (int u = 0; u < kMaxD / kLanes; ++u)
    dq_acc[u] = 0.0f;
  const std::int64_t key_end = min(g.seq, i0 + kRows);
  for (std::int64_t j0 = g.first_key(b, i0) / kCols * kCols; j0 < key_end; j0 += kCols) {
    const int k_rows = static_cast<int>(min(std::int64_t{kCols}, g.seq - j0));
    __syncthreads();
    load_tile(k_s, ld, k + g.kv_offset(b, j0, kv_head), g.kv_heads * g.dim, g.dim, kCols, k_rows);
    load_tile(v_s, ld, v + g.kv_offset(b, j0, kv_head), g.kv_heads * g.dim, g.dim, kCols, k_rows);
    __syncthreads();
    probabilities_and_dscores(g, b, i0, j0, q_s, do_s, k_s, v_s, ld, lse_s, delta_s, nullptr, ds_s);
    __syncwarp();  // a row's dS values come from the lanes of its own warp
#pragma unroll
    for (int u = 0; u < kMaxD / kLanes; ++u) {
      const int d = lane + kLanes * u;
      if (d < dim) {
        float a = dq_acc[u];
        for (int c = 0; c < kCols; ++c)
          a += ds_s[r * (kCols + 1) + c] * k_s[c * ld + d];
        dq_acc[u] = a;
      }
    }
  }
  if (i0 + r < g.seq) {
    T* row = dq + g.q_offset(b, i0 + r, h);
#pragma unroll
    for (int u = 0; u < kMaxD / kLanes; ++u) {
      const int d = lane + kLanes * u;
      if (d < dim) {
        row[d] = from_f32<T>(dq_acc[u] * g.scale);
      }
    }
  }
}

// ---- the tensor-core path: bf16 tensors, head_dim 64 or 128 ----
// Tiles of 64 queries x 64 keys; each of the 4 warps owns 16 rows of a tile and multiplies with
// mma.sync m16n8k16 (bf16 in, f32 accumulate). Scores, probabilities and their gradients stay in
// registers: the accumulator layout of one product is the operand layout of the next.

constexpr int kTcRows = 64;
constexpr int kTcThreads = 128;
constexpr int kTcPad = 8;  // bf16 elements of padding per shared row: conflict-free fragment loads
constexpr int kTcTransposedLd = kTcRows + kTcPad;

__device__ __forceinline__ std::uint32_t pack_pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

// c += a b for a 16x16 bf16 A (row-major fragment), a 16x8 bf16 B (column-major), f32 C.
__device__ __forceinline__ void mma(float c[4], const std::uint32_t a[4], std::uint32_t b0,
                                    std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory, lanes 8j..8j+7 giving the row addresses of matrix j;
// register j of lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j: the
// mma fragment layout.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t r[4], const bf16* row) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// The A fragment of rows [0, 16) and columns [k0, k0 + 16) of a row-major shared matrix.
__device__ __forceinline__ void load_a(std::uint32_t a[4], const bf16* base, int ld, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, base + (lane % 16) * ld + k0 + (lane / 16) * 8);
}

// The B fragments of k in [k0, k0 + 16) for n in [n0, n0 + 8) (b[0], b[1]) and [n0 + 8, n0 + 16)
// (b[2], b[3]), where element (k, n) sits at base[n * ld + k]: the rows of the shared matrix are
// B's columns.
__device__ __forceinline__ void load_b_pair(std::uint32_t b[4], const bf16* base, int ld, int k0,
                                            int n0) {
  const int lane = threadIdx.x & 31;
  const int matrix = lane / 8;
  ldmatrix_x4(b, base + (n0 + (matrix / 2) * 8 + lane % 8) * ld + k0 + (matrix % 2) * 8);
}

// acc[16 x 64] = A (16 rows of a, length kDim) times the 64 rows of b, transposed: a product of
// two row-major shared matrices along their rows.
template <int kDim>
__device__ __forceinline__ void rows_times_rows(float acc[8][4], const bf16* a,
                                                const bf16* b_matrix, int ld) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
  for (int k0 = 0; k0 < kDim; k0 += 16) {
    std::uint32_t frag[4];
    load_a(frag, a, ld, k0);
#pragma unroll
    for (int n = 0; n < 8; n += 2) {
      std::uint32_t b[4];
      load_b_pair(b, b_matrix, ld, k0, n * 8);
      mma(acc[n], frag, b[0], b[1]);
      mma(acc[n + 1], frag, b[2], b[3]);
    }
  }
}

// out[16 x kDim] += P (16 x 64, the accumulator of a previous product, in registers) times a
// [64 x kDim] matrix stored transposed in shared memory (element (k, n) at bt[n * ld + k]).
template <int kDim>
__device__ __forceinline__ void registers_times(float out[kDim / 8][4], const float p[8][4],
                                                const bf16* bt, int ld) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    // Columns [16k, 16k + 16) of P: accumulator tiles 2k and 2k + 1 are the A fragment.
    const std::uint32_t frag[4] = {
        pack_pair(p[2 * k][0], p[2 * k][1]), pack_pair(p[2 * k][2], p[2 * k][3]),
        pack_pair(p[2 * k + 1][0], p[2 * k + 1][1]), pack_pair(p[2 * k + 1][2], p[2 * k + 1][3])};
#pragma unroll
    for (int n = 0; n < kDim / 8; n += 2) {
      std::uint32_t b[4];
      load_b_pair(b, bt, ld, 16 * k, n * 8);
      mma(out[n], frag, b[0], b[1]);
      mma(out[n + 1], frag, b[2], b[3]);
    }
  }
}

// Rows [0, kTcRows) of a [rows, kDim] slice with `stride` elements between rows into shared
// memory, row-major (ld kDim + pad) or transposed (ld kTcTransposedLd); rows from `valid` on are 0.
template <int kDim>
__device__ void load_rows(bf16* dst, const bf16* src, std::int64_t stride, int valid) {
  constexpr int kChunks = kDim / 8;
  for (int idx = threadIdx.x; idx < kTcRows * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const uint4 v = r < valid ? *reinterpret_cast<const uint4*>(src + r * stride + c * 8)
                              : make_uint4(0u, 0u, 0u, 0u);
    *reinterpret_cast<uint4*>(dst + r * (kDim + kTcPad) + c * 8) = v;
  }
}

// Consecutive threads take consecutive rows here, so that the 2-byte stores into one transposed
// row land in distinct banks.
template <int kDim>
__device__ void load_rows_transposed(bf16* dst, const bf16* src, std::int64_t stride, int valid) {
  constexpr int kChunks = kDim / 8;
  for (int idx = threadIdx.x; idx < kTcRows * kChunks; idx += blockDim.x) {
    const int r = idx % kTcRows;
    const int c = idx / kTcRows;
    const uint4 v = r < valid ? *reinterpret_cast<const uint4*>(src + r * stride + c * 8)
                              : make_uint4(0u, 0u, 0u, 0u);
    const bf16* e = reinterpret_cast<const bf16*>(&v);
#pragma unroll
    for (int u = 0; u < 8; ++u)
      dst[(c * 8 + u) * kTcTransposedLd + r] = e[u];
  }
}

// Row (e < 2 ? g : g + 8) and column 8 n + 2 t + (e & 1) of an accumulator element.
__device__ __forceinline__ int acc_row(int e) {
  return ((threadIdx.x & 31) >> 2) + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ int acc_col(int n, int e) {
  return 8 * n + 2 * (threadIdx.x & 3) + (e & 1);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <int kDim>
__global__ void __launch_bounds__(kTcThreads)
    attention_forward_tc_kernel(Geometry g, const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                float* lse) {
  extern __shared__ __align__(16) unsigned char tc_smem[];
  constexpr int ld = kDim + kTcPad;
  bf16* q_s = reinterpret_cast<bf16*>(tc_smem);
  bf16* k_s = q_s + kTcRows * ld;
  bf16* vt_s = k_s + kTcRows * ld;  // [kDim][kTcTransposedLd]
  const std::int64_t b = blockIdx.z;
  const std::int64_t h = blockIdx.y;
  const std::int64_t kv_head = h / g.group;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * kTcRows;
  const int warp_row = (threadIdx.x >> 5) * 16;
  const std::int64_t q_stride = g.heads * kDim;
  const std::int64_t kv_stride = g.kv_heads * kDim;
  load_rows<kDim>(q_s, q + g.q_offset(b, i0, h), q_stride,
                  static_cast<int>(min(std::int64_t{kTcRows}, g.seq - i0)));
  float o[kDim / 8][4];
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n)
    o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  const std::int64_t key_end = min(g.seq, i0 + kTcRows);
  for (std::int64_t j0 = g.first_key(b, i0) / kTcRows * kTcRows; j0 < key_end; j0 += kTcRows) {
    const int valid = static_cast<int>(min(std::int64_t{kTcRows}, g.seq - j0));
    __syncthreads();  // the previous tile is consumed
    load_rows<kDim>(k_s, k + g.kv_offset(b, j0, kv_head), kv_stride, valid);
    load_rows_transposed<kDim>(vt_s, v + g.kv_offset(b, j0, kv_head), kv_stride, valid);
    __syncthreads();
    float s[8][4];
    rows_times_rows<kDim>(s, q_s + warp_row * ld, k_s, ld);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool visible = g.sees(b, i0 + warp_row + acc_row(e), j0 + acc_col(n, e));
        s[n][e] = visible ? s[n][e] * g.scale : -INFINITY;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
      }
    }
    float correction[2];
    float p_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
      // No key seen yet (m_new = -inf): every p is 0 and the state stays empty.
      correction[r] = m_new == -INFINITY ? 1.0f : expf(m[r] - m_new);
      m[r] = m_new;
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mr = m[e >> 1];
        s[n][e] = mr == -INFINITY ? 0.0f : expf(s[n][e] - mr);
        p_sum[e >> 1] += s[n][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
      l[r] = l[r] * correction[r] + quad_sum(p_sum[r]);
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n) {
      o[n][0] *= correction[0];
      o[n][1] *= correction[0];
      o[n][2] *= correction[1];
      o[n][3] *= correction[1];
    }
    registers_times<kDim>(o, s, vt_s, kTcTransposedLd);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t i = i0 + warp_row + acc_row(2 * r);
    if (i >= g.seq) continue;
    bf16* row = out + g.q_offset(b, i, h);
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n) {
      const std::uint32_t pair = pack_pair(o[n][2 * r] / l[r], o[n][2 * r + 1] / l[r]);
      *reinterpret_cast<std::uint32_t*>(row + acc_col(n, 2 * r)) = pair;
    }
    if ((threadIdx.x & 3) == 0) lse[g.lse_offset(b, h, i)] = m[r] + logf(l[r]);
  }
}

template <int kDim>
__global__ void __launch_bounds__(kTcThreads)
    attention_dkdv_tc_kernel(Geometry g, const bf16* q, const bf16* k, const bf16* v,
                             const bf16* dout, const float* lse, const float* delta, bf16* dk,
                             bf16* dv) {
  extern __shared__ __align__(16) unsigned char tc_smem[];
  constexpr int ld = kDim + kTcPad;
  constexpr int ldt = kTcTransposedLd;
  bf16* k_s = reinterpret_cast<bf16*>(tc_smem);
  bf16* v_s = k_s + kTcRows * ld;
  bf16* q_s = v_s + kTcRows * ld;
  bf16* do_s = q_s + kTcRows * ld;
  bf16* qt_s = do_s + kTcRows * ld;  // [kDim][ldt]
  bf16* dot_s = qt_s + kDim * ldt;   // [kDim][ldt]
  float* lse_s = reinterpret_cast<float*>(dot_s + kDim * ldt);
  float* delta_s = lse_s + kTcRows;
  const std::int64_t b = blockIdx.z;
  const std::int64_t kv_head = blockIdx.y;
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTcRows;
  const int warp_row = (threadIdx.x >> 5) * 16;  // this warp's keys within the tile
  const std::int64_t q_stride = g.heads * kDim;
  const std::int64_t kv_stride = g.kv_heads * kDim;
  const int keys = static_cast<int>(min(std::int64_t{kTcRows}, g.seq - j0));
  load_rows<kDim>(k_s, k + g.kv_offset(b, j0, kv_head), kv_stride, keys);
  load_rows<kDim>(v_s, v + g.kv_offset(b, j0, kv_head), kv_stride, keys);
  float dk_acc[kDim / 8][4];
  float dv_acc[kDim / 8][4];
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n) {
    dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.0f;
    dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.0f;
  }
  // Queries that see a key of this tile: from its first key to the last key's last query.
  const std::int64_t query_end = g.last_query(min(g.seq, j0 + kTcRows) - 1) + 1;
  for (std::int64_t h = kv_head * g.group; h < (kv_head + 1) * g.group; ++h) {
    for (std::int64_t i0 = j0; i0 < query_end; i0 += kTcRows) {
      // Later queries start their documents after this key tile too (uniform over the block).
      if (g.first_key(b, i0) >= j0 + kTcRows) break;
      const int queries = static_cast<int>(min(std::int64_t{kTcRows}, g.seq - i0));
      __syncthreads();  // the previous query tile is consumed
      load_rows<kDim>(q_s, q + g.q_offset(b, i0, h), q_stride, queries);
      load_rows<kDim>(do_s, dout + g.q_offset(b, i0, h), q_stride, queries);
      load_rows_transposed<kDim>(qt_s, q + g.q_offset(b, i0, h), q_stride, queries);
      load_rows_transposed<kDim>(dot_s, dout + g.q_offset(b, i0, h), q_stride, queries);
      for (int t = threadIdx.x; t < kTcRows; t += blockDim.x) {
        lse_s[t] = t < queries ? lse[g.lse_offset(b, h, i0 + t)] : 0.0f;
        delta_s[t] = t < queries ? delta[g.lse_offset(b, h, i0 + t)] : 0.0f;
      }
      __syncthreads();
      // P^T [16 keys x 64 queries] = exp(scale K Q^T - lse), 0 where the query does not see the
      // key.
      float p[8][4];
      rows_times_rows<kDim>(p, k_s + warp_row * ld, q_s, ld);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int query = acc_col(n, e);
          const bool visible = g.sees(b, i0 + query, j0 + warp_row + acc_row(e));
          p[n][e] = visible ? expf(p[n][e] * g.scale - lse_s[query]) : 0.0f;
        }
      }
      registers_times<kDim>(dv_acc, p, dot_s, ldt);  // dV += P^T dO
      // dS^T = P^T (dP^T - delta), dP^T = V dO^T.
      float ds[8][4];
      rows_times_rows<kDim>(ds, v_s + warp_row * ld, do_s, ld);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          ds[n][e] = p[n][e] * (ds[n][e] - delta_s[acc_col(n, e)]);
      }
      registers_times<kDim>(dk_acc, ds, qt_s, ldt);  // dK += dS^T Q (scaled at the end)
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t key = j0 + warp_row + acc_row(2 * r);
    if (key >= g.seq) continue;
    bf16* dk_row = dk + g.kv_offset(b, key, kv_head);
    bf16* dv_row = dv + g.kv_offset(b, key, kv_head);
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n) {
      const int col = acc_col(n, 2 * r);
      *reinterpret_cast<std::uint32_t*>(dk_row + col) =
          pack_pair(dk_acc[n][2 * r] * g.scale, dk_acc[n][2 * r + 1] * g.scale);
      *reinterpret_cast<std::uint32_t*>(dv_row + col) =
          pack_pair(dv_acc[n][2 * r], dv_acc[n][2 * r + 1]);
    }
  }
}

template <int kDim>
__global__ void __launch_bounds__(kTcThreads)
    attention_dq_tc_kernel(Geometry g, const bf16* q, const bf16* k, const bf16* v,
                           const bf16* dout, const float* lse, const float* delta, bf16* dq) {
  extern __shared__ __align__(16) unsigned char tc_smem[];
  constexpr int ld = kDim + kTcPad;
  constexpr int ldt = kTcTransposedLd;
  bf16* q_s = reinterpret_cast<bf16*>(tc_smem);
  bf16* do_s = q_s + kTcRows * ld;
  bf16* k_s = do_s + kTcRows * ld;
  bf16* v_s = k_s + kTcRows * ld;
  bf16* kt_s = v_s + kTcRows * ld;  // [kDim][ldt]
  float* lse_s = reinterpret_cast<float*>(kt_s + kDim * ldt);
  float* delta_s = lse_s + kTcRows;
  const std::int64_t b = blockIdx.z;
  const std::int64_t h = blockIdx.y;
  const std::int64_t kv_head = h / g.group;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * kTcRows;
  const int warp_row = (threadIdx.x >> 5) * 16;
  const std::int64_t q_stride = g.heads * kDim;
  const std::int64_t kv_stride = g.kv_heads * kDim;
  const int queries = static_cast<int>(min(std::int64_t{kTcRows}, g.seq - i0));
  load_rows<kDim>(q_s, q + g.q_offset(b, i0, h), q_stride, queries);
  load_rows<kDim>(do_s, dout + g.q_offset(b, i0, h), q_stride, queries);
  for (int t = threadIdx.x; t < kTcRows; t += blockDim.x) {
    lse_s[t] = t < queries ? lse[g.lse_offset(b, h, i0 + t)] : 0.0f;
    delta_s[t] = t < queries ? delta[g.lse_offset(b, h, i0 + t)] : 0.0f;
  }
  float dq_acc[kDim / 8][4];
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n)
    dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.0f;
  const std::int64_t key_end = min(g.seq, i0 + kTcRows);
  for (std::int64_t j0 = g.first_key(b, i0) / kTcRows * kTcRows; j0 < key_end; j0 += kTcRows) {
    const int keys = static_cast<int>(min(std::int64_t{kTcRows}, g.seq - j0));
    __syncthreads();
    load_rows<kDim>(k_s, k + g.kv_offset(b, j0, kv_head), kv_stride, keys);
    load_rows<kDim>(v_s, v + g.kv_offset(b, j0, kv_head), kv_stride, keys);
    load_rows_transposed<kDim>(kt_s, k + g.kv_offset(b, j0, kv_head), kv_stride, keys);
    __syncthreads();
    float p[8][4];
    rows_times_rows<kDim>(p, q_s + warp_row * ld, k_s, ld);
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = warp_row + acc_row(e);
        const bool visible = g.sees(b, i0 + row, j0 + acc_col(n, e));
        p[n][e] = visible ? expf(p[n][e] * g.scale - lse_s[row]) : 0.0f;
      }
    }
    float ds[8][4];
    rows_times_rows<kDim>(ds, do_s + warp_row * ld, v_s, ld);  // dP = dO V^T
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        ds[n][e] = p[n][e] * (ds[n][e] - delta_s[warp_row + acc_row(e)]);
    }
    registers_times<kDim>(dq_acc, ds, kt_s, ldt);  // dQ += dS K (scaled at the end)
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t i = i0 + warp_row + acc_row(2 * r);
    if (i >= g.seq) continue;
    bf16* row = dq + g.q_offset(b, i, h);
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n)
      *reinterpret_cast<std::uint32_t*>(row + acc_col(n, 2 * r)) =
          pack_pair(dq_acc[n][2 * r] * g.scale, dq_acc[n][2 * r + 1] * g.scale);
  }
}

template <int kDim>
constexpr std::size_t tc_forward_shared() {
  return (2 * kTcRows * (kDim + kTcPad) + kDim * kTcTransposedLd) * sizeof(bf16);
}
template <int kDim>
constexpr std::size_t tc_dkdv_shared() {
  return (4 * kTcRows * (kDim + kTcPad) + 2 * kDim * kTcTransposedLd) * sizeof(bf16) +
         2 * kTcRows * sizeof(float);
}
template <int kDim>
constexpr std::size_t tc_dq_shared() {
  return (4 * kTcRows * (kDim + kTcPad) + kDim * kTcTransposedLd) * sizeof(bf16) +
         2 * kTcRows * sizeof(float);
}

// Runs body.template operator()<kDim>() when the tensor-core kernels take this case.
template <class Body>
bool dispatch_tensor_cores(const Geometry& g, DType dtype, bool enabled,
                           std::initializer_list<const Tensor*> tensors, Body&& body) {
  if (!enabled || dtype != DType::BF16) return false;
  // 16-byte vector loads of whole rows.
  for (const Tensor* t : tensors)
    if (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0) return false;
  if (g.dim == 64) {
    body.template operator()<64>();
    return true;
  }
  if (g.dim == 128) {
    body.template operator()<128>();
    return true;
  }
  return false;
}

std::string shape_string(const Tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.rank; ++i)
    s += (i ? ", " : "") + std::to_string(t.dims[i]);
  return s + "]";
}

void require_shape(const Tensor& t, DType dtype, std::initializer_list<std::int64_t> shape,
                   const char* op, const char* name) {
  require_dtype(t, dtype, op, name);
  bool same = t.rank == static_cast<int>(shape.size());
  int axis = 0;
  for (auto d : shape)
    same = same && t.dims[axis++] == d;
  if (!same) {
    Tensor expected(nullptr, dtype, shape);
    fail(op, std::string(name) + " has shape " + shape_string(t) + ", expected " +
                 shape_string(expected));
  }
}

Geometry geometry(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& positions, std::int64_t window) {
  require_float(q, op, "q");
  if (q.rank != 4)
    fail(op, "q has shape " + shape_string(q) + ", expected [batch, seq, heads, head_dim]");
  Geometry g{};
  g.batch = q.size(0);
  g.seq = q.size(1);
  g.heads = q.size(2);
  g.dim = q.size(3);
  g.kv_heads = k.rank == 4 ? k.size(2) : 0;
  g.window = window;
  if (g.dim <= 0 || g.dim > 256)
    fail(op, "head_dim is " + std::to_string(g.dim) + ", expected 1 to 256");
  if (g.kv_heads <= 0 || g.heads % g.kv_heads != 0)
    fail(op, "k has " + std::to_string(g.kv_heads) + " heads, expected a divisor of the " +
                 std::to_string(g.heads) + " query heads");
  if (window < 0) fail(op, "window is " + std::to_string(window) + ", expected >= 0");
  require_shape(k, q.dtype, {g.batch, g.seq, g.kv_heads, g.dim}, op, "k");
  require_shape(v, q.dtype, {g.batch, g.seq, g.kv_heads, g.dim}, op, "v");
  require(g.batch <= 65535 && g.heads <= 65535, op, "batch or heads above 65535");
  g.group = g.heads / g.kv_heads;
  if (positions.data) {
    require_shape(positions, DType::I32, {g.batch, g.seq}, op, "positions");
    g.positions = positions.as<std::int32_t>();
  }
  // As transformers: head_dim^-0.5 rounded to float32.
  g.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.dim)));
  return g;
}

// Runs body.template operator()<T, kMaxD>() with the smallest register tile that holds head_dim.
template <class Body>
void dispatch_head_dim(const Geometry& g, DType dtype, const char* op, Body&& body) {
  dispatch_float(dtype, op, [&]<class T>() {
    if (g.dim <= 64) {
      body.template operator()<T, 64>();
    } else if (g.dim <= 128) {
      body.template operator()<T, 128>();
    } else {
      body.template operator()<T, 256>();
    }
  });
}

template <class Kernel>
void allow_shared(Kernel kernel, std::size_t bytes, std::size_t limit, const char* op) {
  if (bytes > limit)
    fail(op, "needs " + std::to_string(bytes) + " bytes of shared memory, the device has " +
                 std::to_string(limit));
  FASTLLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
}

}  // namespace

void CudaBackend::own_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions,
                                        std::int64_t window, Tensor out, Tensor lse) {
  const char* op = "attention_forward";
  const Geometry g = geometry(op, q, k, v, positions, window);
  require_shape(out, q.dtype, {g.batch, g.seq, g.heads, g.dim}, op, "out");
  require_shape(lse, DType::F32, {g.batch, g.heads, g.seq}, op, "lse");
  if (q.numel() == 0) return;
  const unsigned tc_tiles = static_cast<unsigned>((g.seq + kTcRows - 1) / kTcRows);
  const dim3 tc_grid(tc_tiles, static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch));
  if (dispatch_tensor_cores(
          g, q.dtype, tensor_core_attention_, {&q, &k, &v, &out}, [&]<int kDim>() {
            constexpr std::size_t bytes = tc_forward_shared<kDim>();
            allow_shared(attention_forward_tc_kernel<kDim>, bytes, max_shared_per_block(), op);
            attention_forward_tc_kernel<kDim><<<tc_grid, kTcThreads, bytes, stream()>>>(
                g, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), out.as<bf16>(), lse.as<float>());
            FASTLLM_CUDA_LAUNCHED();
          }))
    return;
  const std::size_t ld = static_cast<std::size_t>(g.dim) + 1;
  const std::size_t shared =
      (kRows * ld + kCols * ld + kCols * static_cast<std::size_t>(g.dim) + kRows * (kCols + 1)) *
      sizeof(float);
  const dim3 grid(static_cast<unsigned>((g.seq + kRows - 1) / kRows),
                  static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch));
  dispatch_head_dim(g, q.dtype, op, [&]<class T, int kMaxD>() {
    allow_shared(attention_forward_kernel<T, kMaxD>, shared, max_shared_per_block(), op);
    attention_forward_kernel<T, kMaxD><<<grid, kThreads, shared, stream()>>>(
        g, q.as<T>(), k.as<T>(), v.as<T>(), out.as<T>(), lse.as<float>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

void CudaBackend::own_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                         Tensor dout, Tensor positions, std::int64_t window,
                                         Tensor dq, Tensor dk, Tensor dv) {
  const char* op = "attention_backward";
  const Geometry g = geometry(op, q, k, v, positions, window);
  require_shape(out, q.dtype, {g.batch, g.seq, g.heads, g.dim}, op, "out");
  require_shape(dout, q.dtype, {g.batch, g.seq, g.heads, g.dim}, op, "dout");
  require_shape(dq, q.dtype, {g.batch, g.seq, g.heads, g.dim}, op, "dq");
  require_shape(lse, DType::F32, {g.batch, g.heads, g.seq}, op, "lse");
  require_shape(dk, q.dtype, {g.batch, g.seq, g.kv_heads, g.dim}, op, "dk");
  require_shape(dv, q.dtype, {g.batch, g.seq, g.kv_heads, g.dim}, op, "dv");
  if (q.numel() == 0) return;
  Buffer delta = scratch(static_cast<std::size_t>(g.batch * g.heads * g.seq) * sizeof(float));
  auto* delta_data = static_cast<float*>(delta.data());
  dispatch_float(q.dtype, op, [&]<class T>() {
    attention_delta_kernel<T><<<grid_for(g.batch * g.seq * g.heads * 32, 256), 256, 0, stream()>>>(
        g, out.as<T>(), dout.as<T>(), delta_data);
    FASTLLM_CUDA_LAUNCHED();
  });
  const unsigned tc_tiles = static_cast<unsigned>((g.seq + kTcRows - 1) / kTcRows);
  if (dispatch_tensor_cores(
          g, q.dtype, tensor_core_attention_, {&q, &k, &v, &out, &dout, &dq, &dk, &dv},
          [&]<int kDim>() {
            constexpr std::size_t dkdv_bytes = tc_dkdv_shared<kDim>();
            allow_shared(attention_dkdv_tc_kernel<kDim>, dkdv_bytes, max_shared_per_block(), op);
            attention_dkdv_tc_kernel<kDim><<<dim3(tc_tiles, static_cast<unsigned>(g.kv_heads),
                                                  static_cast<unsigned>(g.batch)),
                                             kTcThreads, dkdv_bytes, stream()>>>(
                g, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), dout.as<bf16>(), lse.as<float>(),
                delta_data, dk.as<bf16>(), dv.as<bf16>());
            FASTLLM_CUDA_LAUNCHED();
            constexpr std::size_t dq_bytes = tc_dq_shared<kDim>();
            allow_shared(attention_dq_tc_kernel<kDim>, dq_bytes, max_shared_per_block(), op);
            attention_dq_tc_kernel<kDim>
                <<<dim3(tc_tiles, static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch)),
                   kTcThreads, dq_bytes, stream()>>>(g, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(),
                                                     dout.as<bf16>(), lse.as<float>(), delta_data,
                                                     dq.as<bf16>());
            FASTLLM_CUDA_LAUNCHED();
          }))
    return;
  const std::size_t ld = static_cast<std::size_t>(g.dim) + 1;
  const std::size_t shared =
      (2 * kCols * ld + 2 * kRows * ld + 2 * kRows * (kCols + 1) + 2 * kRows) * sizeof(float);
  const unsigned tiles = static_cast<unsigned>((g.seq + kRows - 1) / kRows);
  dispatch_head_dim(g, q.dtype, op, [&]<class T, int kMaxD>() {
    allow_shared(attention_dkdv_kernel<T, kMaxD>, shared, max_shared_per_block(), op);
    attention_dkdv_kernel<T, kMaxD>
        <<<dim3(tiles, static_cast<unsigned>(g.kv_heads), static_cast<unsigned>(g.batch)), kThreads,
           shared, stream()>>>(g, q.as<T>(), k.as<T>(), v.as<T>(), dout.as<T>(), lse.as<float>(),
                               delta_data, dk.as<T>(), dv.as<T>());
    FASTLLM_CUDA_LAUNCHED();
    allow_shared(attention_dq_kernel<T, kMaxD>, shared, max_shared_per_block(), op);
    attention_dq_kernel<T, kMaxD>
        <<<dim3(tiles, static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch)), kThreads,
           shared, stream()>>>(g, q.as<T>(), k.as<T>(), v.as<T>(), dout.as<T>(), lse.as<float>(),
                               delta_data, dq.as<T>());
    FASTLLM_CUDA_LAUNCHED();
  });
}

}  // namespace fastllm::cuda
