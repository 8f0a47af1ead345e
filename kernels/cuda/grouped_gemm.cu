// The experts' linear layers as grouped GEMMs whose per-expert row counts stay on the device:
// each block reads the expert offsets itself and either finds its (expert, row tile) or exits, so
// nothing waits for the host. cuBLAS's cublasGemmGroupedBatchedEx was the alternative and is not
// used: it takes the groups' sizes in host arrays, which would need the offsets on the host.
//
// Every variant is C[i, j] = sum_p A(i, p) B(p, j) (+ bias[j]) (+ beta C[i, j]) with per-expert
// operands:
//   forward  y  = x W_e^T:  i = row of e, p over k, j over n
//   data     dx = dy W_e:   i = row of e, p over n, j over k
//   weight   dW_e += dy^T x: i over n, p = row of e, j over k
// bf16 operands run on the tensor cores (mma.sync m16n8k16, f32 accumulation); f32 operands on
// the CUDA cores in f32 (no TF32, like the backend's other GEMMs).
#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/device_util.cuh"

namespace fastllm::cuda {
namespace {

enum class Mode { Forward, Data, Weight };

// Experts per launch: their pointers travel as kernel parameters, within the classic 4 KiB.
constexpr int kGroup = 128;

struct ExpertPointers {
  const void* b[kGroup];     // W_e (forward, data); unused (weight: B is x)
  void* c[kGroup];           // dW_e (weight); unused otherwise (C is a row tensor)
  const void* bias[kGroup];  // b_e (forward) or db_e (weight), null for none
};

// The operands' element strides: A(i, p) = a[i * a_i + p * a_p], B(p, j) = b[p * b_p + j * b_j].
// Which of them is 1 is fixed by the mode, so the loads know which way memory is contiguous.
template <Mode M>
struct Layout {
  // A is dy or x with its rows along i, except for the weight gradient (rows along p).
  static constexpr bool a_depth_contiguous = M != Mode::Weight;
  // B is W_e [n, k]: contiguous along p for the forward (p = k), along j otherwise.
  static constexpr bool b_depth_contiguous = M == Mode::Forward;
};

// Tiles of a block: kRows x kCols outputs over a depth of kDepth per step.
template <class T>
struct Tiles;
template <>
struct Tiles<bf16> {
  static constexpr int kRows = 128, kCols = 128, kDepth = 32, kThreads = 256, kPad = 8;
};
template <>
struct Tiles<float> {
  static constexpr int kRows = 64, kCols = 64, kDepth = 16, kThreads = 256, kPad = 1;
};

// Loads rows x depth elements of a matrix (element (r, d) at base[r * stride_r + d * stride_d])
// into tile[r * ld + d], zero outside [0, rows_left) x [0, depth_left); consecutive threads take
// consecutive addresses of whichever axis is contiguous in memory.
template <int kRows, int kDepth, int kThreads, bool kDepthContiguous, class T>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* base, std::int64_t stride_r,
                                          std::int64_t stride_d, std::int64_t rows_left,
                                          std::int64_t depth_left) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < kRows * kDepth; idx += kThreads) {
    const int r = kDepthContiguous ? idx / kDepth : idx % kRows;
    const int d = kDepthContiguous ? idx % kDepth : idx / kRows;
    T v = from_f32<T>(0.0f);
    if (r < rows_left && d < depth_left) v = base[r * stride_r + d * stride_d];
    tile[r * ld + d] = v;
  }
}

__device__ __forceinline__ std::uint32_t pair_at(const bf16* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

// c += a b for a 16x16 bf16 A (row-major fragment), a 16x8 bf16 B (column-major), f32 C.
__device__ __forceinline__ void mma_bf16(float c[4], const std::uint32_t a[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The (expert, first row, rows) of row tile `tile` when the experts' rows are cut into tiles of
// `rows_per_tile`, expert after expert; false past the last tile. Offsets are clamped to
// [0, rows], so that even offsets moe_permute_offsets did not write stay within the tensors.
__device__ bool find_row_tile(const std::int32_t* offsets, int group, std::int64_t rows,
                              int rows_per_tile, std::int64_t tile, int& expert,
                              std::int64_t& begin, std::int64_t& count) {
  std::int64_t previous = 0;
  for (int e = 0; e < group; ++e) {
    const std::int64_t lo = std::max(previous, std::min<std::int64_t>(offsets[e], rows));
    const std::int64_t hi = std::max(lo, std::min<std::int64_t>(offsets[e + 1], rows));
    previous = hi;
    const std::int64_t tiles = (hi - lo + rows_per_tile - 1) / rows_per_tile;
    if (tile < tiles) {
      expert = e;
      begin = lo + tile * rows_per_tile;
      count = hi - begin;
      return true;
    }
    tile -= tiles;
  }
  return false;
}

// One block: a kRows x kCols tile of C for one expert. TC is C's type (T, or f32 for the weight
// gradient); the bias has T's type forward and f32 as the weight mode's gradient (not here).
template <Mode M, class T, class TC>
__global__ void __launch_bounds__(Tiles<T>::kThreads)
    grouped_gemm_kernel(const T* a_rows, const T* b_rows, TC* c_rows, ExpertPointers experts,
                        const std::int32_t* offsets, int group, std::int64_t rows, std::int64_t n,
                        std::int64_t k, float beta) {
  using Tile = Tiles<T>;
  constexpr int kRows = Tile::kRows, kCols = Tile::kCols, kDepth = Tile::kDepth;
  constexpr int kThreads = Tile::kThreads, kLd = kDepth + Tile::kPad;
  __shared__ __align__(16) T sa[kRows * kLd];
  __shared__ __align__(16) T sb[kCols * kLd];

  int e = 0;
  std::int64_t m_size = 0, n_size = 0, p_size = 0, i0 = 0, j0 = 0;
  const T* a = nullptr;
  const T* b = nullptr;
  TC* c = nullptr;
  std::int64_t a_i = 0, a_p = 0, b_p = 0, b_j = 0, c_i = 0;
  if constexpr (M == Mode::Weight) {
    e = static_cast<int>(blockIdx.z);
    const std::int64_t lo = std::min<std::int64_t>(std::max(offsets[e], 0), rows);
    const std::int64_t hi =
        std::min<std::int64_t>(std::max<std::int64_t>(offsets[e + 1], lo), rows);
    if (hi == lo) return;
    i0 = static_cast<std::int64_t>(blockIdx.y) * kRows;
    j0 = static_cast<std::int64_t>(blockIdx.x) * kCols;
    m_size = n, n_size = k, p_size = hi - lo;
    a = a_rows + lo * n, a_i = 1, a_p = n;  // dy
    b = b_rows + lo * k, b_p = k, b_j = 1;  // x
    c = static_cast<TC*>(experts.c[e]), c_i = k;
  } else {
    std::int64_t begin = 0, count = 0;
    if (!find_row_tile(offsets, group, rows, kRows, blockIdx.y, e, begin, count)) return;
    i0 = 0;
    j0 = static_cast<std::int64_t>(blockIdx.x) * kCols;
    const T* w = static_cast<const T*>(experts.b[e]);
    m_size = count;
    if constexpr (M == Mode::Forward) {
      n_size = n, p_size = k;
      a = a_rows + begin * k, a_i = k, a_p = 1;  // x
      b = w, b_p = 1, b_j = k;                   // W_e [n, k]
      c = c_rows + begin * n, c_i = n;
    } else {
      n_size = k, p_size = n;
      a = a_rows + begin * n, a_i = n, a_p = 1;  // dy
      b = w, b_p = k, b_j = 1;                   // W_e [n, k]
      c = c_rows + begin * k, c_i = k;
    }
  }
  if (j0 >= n_size) return;
  const std::int64_t rows_left = std::min<std::int64_t>(m_size - i0, kRows);
  const std::int64_t cols_left = std::min<std::int64_t>(n_size - j0, kCols);
  const T* a_tile = a + i0 * a_i;
  const T* b_tile = b + j0 * b_j;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // bf16: 8 warps as 2 x 4, each 64 x 32 of C as 4 x 4 mma tiles of 16 x 8. f32: 16 x 16
  // threads, each 4 x 4 outputs 16 apart.
  constexpr bool kTensorCores = std::is_same_v<T, bf16>;
  float acc[4][4][4] = {};
  for (std::int64_t p0 = 0; p0 < p_size; p0 += kDepth) {
    const std::int64_t depth_left = std::min<std::int64_t>(p_size - p0, kDepth);
    load_tile<kRows, kDepth, kThreads, Layout<M>::a_depth_contiguous>(
        sa, kLd, a_tile + p0 * a_p, a_i, a_p, rows_left, depth_left);
    load_tile<kCols, kDepth, kThreads, Layout<M>::b_depth_contiguous>(
        sb, kLd, b_tile + p0 * b_p, b_j, b_p, cols_left, depth_left);
    __syncthreads();
    if constexpr (kTensorCores) {
      const int g = lane >> 2, t = lane & 3;
      const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
#pragma unroll
      for (int k0 = 0; k0 < kDepth; k0 += 16) {
        std::uint32_t af[4][4];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const bf16* row = sa + (wm + mi * 16 + g) * kLd + k0 + 2 * t;
          af[mi][0] = pair_at(row);
          af[mi][1] = pair_at(row + 8 * kLd);
          af[mi][2] = pair_at(row + 8);
          af[mi][3] = pair_at(row + 8 * kLd + 8);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const bf16* col = sb + (wn + ni * 8 + g) * kLd + k0 + 2 * t;
          const std::uint32_t b0 = pair_at(col), b1 = pair_at(col + 8);
#pragma unroll
          for (int mi = 0; mi < 4; ++mi)
            mma_bf16(acc[mi][ni], af[mi], b0, b1);
        }
      }
    } else {
      const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        float av[4], bv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          av[u] = to_f32(sa[(ty + 16 * u) * kLd + d]);
          bv[u] = to_f32(sb[(tx + 16 * u) * kLd + d]);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v)
            acc[u][v][0] = fmaf(av[u], bv[v], acc[u][v][0]);
      }
    }
    __syncthreads();
  }

  const T* bias = nullptr;
  if constexpr (M == Mode::Forward) bias = static_cast<const T*>(experts.bias[e]);
  // The weight gradient accumulates; the others overwrite unless beta says otherwise.
  const float keep = M == Mode::Weight ? 1.0f : beta;
  auto store = [&](int r, int col, float value) {
    if (r >= rows_left || col >= cols_left) return;
    TC* out = c + (i0 + r) * c_i + j0 + col;
    if (bias) value += to_f32(bias[j0 + col]);
    if (keep != 0.0f) value += keep * to_f32(*out);
    *out = from_f32<TC>(value);
  };
  if constexpr (kTensorCores) {
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int r = wm + mi * 16 + g, col = wn + ni * 8 + 2 * t;
        store(r, col, acc[mi][ni][0]);
        store(r, col + 1, acc[mi][ni][1]);
        store(r + 8, col, acc[mi][ni][2]);
        store(r + 8, col + 1, acc[mi][ni][3]);
      }
  } else {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v)
        store(ty + 16 * u, tx + 16 * v, acc[u][v][0]);
  }
}

// db_e[j] += sum over the rows of expert e of dy[r, j]: block (column chunk, expert).
template <class T>
__global__ void grouped_bias_backward_kernel(const T* dy, ExpertPointers experts,
                                             const std::int32_t* offsets, std::int64_t rows,
                                             std::int64_t n) {
  const int e = static_cast<int>(blockIdx.y);
  auto* db = static_cast<float*>(const_cast<void*>(experts.bias[e]));
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!db || j >= n) return;
  const std::int64_t lo = std::min<std::int64_t>(std::max(offsets[e], 0), rows);
  const std::int64_t hi = std::min<std::int64_t>(std::max<std::int64_t>(offsets[e + 1], lo), rows);
  float sum = 0.0f;
  for (std::int64_t r = lo; r < hi; ++r)
    sum += to_f32(dy[r * n + j]);
  if (hi > lo) db[j] += sum;
}

struct GroupedShape {
  std::int64_t rows = 0, n = 0, k = 0;
};

// Checks what the device cannot report back without a round trip: the list sizes, dtypes and
// shapes; the offsets themselves are trusted (and clamped) on the device.
GroupedShape check_grouped(const char* op, const std::vector<Tensor>& weights, Tensor offsets,
                           DType dtype) {
  require(!weights.empty(), op, "no experts' weights given");
  require_dtype(offsets, DType::I32, op, "offsets");
  require_numel(offsets, static_cast<std::int64_t>(weights.size()) + 1, op, "offsets");
  GroupedShape s;
  s.n = weights[0].size(0);
  s.k = weights[0].size(1);
  for (const Tensor& w : weights) {
    require_dtype(w, dtype, op, "a weight");
    require(w.rank == 2 && w.size(0) == s.n && w.size(1) == s.k, op,
            "the experts' weights differ in shape");
  }
  return s;
}

void require_list(const std::vector<Tensor>& list, std::size_t experts, DType dtype, std::int64_t n,
                  const char* op, const char* what) {
  if (list.empty()) return;
  if (list.size() != experts)
    fail(op, std::string(what) + " has " + std::to_string(list.size()) + " tensors for " +
                 std::to_string(experts) + " experts");
  for (const Tensor& t : list) {
    if (is_empty(t)) continue;
    require_dtype(t, dtype, op, what);
    require_numel(t, n, op, what);
  }
}

template <Mode M>
void launch(CudaBackend& be, const char* op, Tensor a_rows, Tensor b_rows, Tensor c_rows,
            const std::vector<Tensor>& weights, const std::vector<Tensor>& biases, Tensor offsets,
            float beta, const GroupedShape& s) {
  const auto experts = static_cast<int>(weights.size());
  for (int first = 0; first < experts; first += kGroup) {
    const int group = std::min(kGroup, experts - first);
    ExpertPointers pointers{};
    for (int e = 0; e < group; ++e) {
      const Tensor& w = weights[static_cast<std::size_t>(first + e)];
      if constexpr (M == Mode::Weight) {
        pointers.c[e] = w.data;
      } else {
        pointers.b[e] = w.data;
      }
      if (!biases.empty() && !is_empty(biases[static_cast<std::size_t>(first + e)]))
        pointers.bias[e] = biases[static_cast<std::size_t>(first + e)].data;
    }
    const std::int32_t* group_offsets = offsets.as<std::int32_t>() + first;
    auto run = [&]<class T, class TC>() {
      using Tile = Tiles<T>;
      dim3 grid;
      if constexpr (M == Mode::Weight) {
        grid = dim3(static_cast<unsigned>((s.k + Tile::kCols - 1) / Tile::kCols),
                    static_cast<unsigned>((s.n + Tile::kRows - 1) / Tile::kRows),
                    static_cast<unsigned>(group));
      } else {
        // Every expert's last tile may be partial: at most rows / kRows + group tiles in all.
        const std::int64_t cols = M == Mode::Forward ? s.n : s.k;
        grid = dim3(static_cast<unsigned>((cols + Tile::kCols - 1) / Tile::kCols),
                    static_cast<unsigned>(s.rows / Tile::kRows + group));
      }
      require(grid.y <= 65535, op, "too many rows for one launch");
      grouped_gemm_kernel<M, T, TC><<<grid, Tile::kThreads, 0, be.stream()>>>(
          a_rows.as<T>(), b_rows.as<T>(), c_rows.as<TC>(), pointers, group_offsets, group, s.rows,
          s.n, s.k, beta);
      FASTLLM_CUDA_LAUNCHED();
      if constexpr (M == Mode::Weight) {
        if (!biases.empty()) {
          constexpr int kThreads = 256;
          grouped_bias_backward_kernel<T>
              <<<dim3(static_cast<unsigned>((s.n + kThreads - 1) / kThreads),
                      static_cast<unsigned>(group)),
                 kThreads, 0, be.stream()>>>(a_rows.as<T>(), pointers, group_offsets, s.rows, s.n);
          FASTLLM_CUDA_LAUNCHED();
        }
      }
    };
    const bool bf = a_rows.dtype == DType::BF16;
    if constexpr (M == Mode::Weight) {
      if (bf) {
        run.template operator()<bf16, float>();
      } else {
        run.template operator()<float, float>();
      }
    } else if (bf) {
      run.template operator()<bf16, bf16>();
    } else {
      run.template operator()<float, float>();
    }
  }
}

}  // namespace

void CudaBackend::grouped_linear_forward(Tensor x, const std::vector<Tensor>& weights,
                                         const std::vector<Tensor>& biases, Tensor offsets,
                                         Tensor y) {
  const char* op = "grouped_linear_forward";
  require_float(x, op, "x");
  GroupedShape s = check_grouped(op, weights, offsets, x.dtype);
  require_dtype(y, x.dtype, op, "y");
  s.rows = row_count(y);
  require_numel(x, s.rows * s.k, op, "x");
  require_numel(y, s.rows * s.n, op, "y");
  require_list(biases, weights.size(), x.dtype, s.n, op, "biases");
  if (s.rows == 0 || s.n == 0) return;
  launch<Mode::Forward>(*this, op, x, Tensor(), y, weights, biases, offsets, 0.0f, s);
}

void CudaBackend::grouped_linear_backward_data(Tensor dy, const std::vector<Tensor>& weights,
                                               Tensor offsets, float beta, Tensor dx) {
  const char* op = "grouped_linear_backward_data";
  require_float(dy, op, "dy");
  GroupedShape s = check_grouped(op, weights, offsets, dy.dtype);
  require_dtype(dx, dy.dtype, op, "dx");
  s.rows = row_count(dy);
  require_numel(dy, s.rows * s.n, op, "dy");
  require_numel(dx, s.rows * s.k, op, "dx");
  if (s.rows == 0 || s.k == 0) return;
  launch<Mode::Data>(*this, op, dy, Tensor(), dx, weights, {}, offsets, beta, s);
}

void CudaBackend::grouped_linear_backward_weight(Tensor x, Tensor dy, Tensor offsets,
                                                 const std::vector<Tensor>& dweights,
                                                 const std::vector<Tensor>& dbiases) {
  const char* op = "grouped_linear_backward_weight";
  require_float(dy, op, "dy");
  require_dtype(x, dy.dtype, op, "x");
  GroupedShape s = check_grouped(op, dweights, offsets, DType::F32);
  s.rows = row_count(dy);
  require_numel(dy, s.rows * s.n, op, "dy");
  require_numel(x, s.rows * s.k, op, "x");
  require_list(dbiases, dweights.size(), DType::F32, s.n, op, "dbiases");
  if (s.rows == 0 || s.n == 0 || s.k == 0) return;
  launch<Mode::Weight>(*this, op, dy, x, Tensor(), dweights, dbiases, offsets, 1.0f, s);
}

}  // namespace fastllm::cuda
