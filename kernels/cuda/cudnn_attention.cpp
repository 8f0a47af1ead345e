// Attention through cuDNN's fused scaled-dot-product attention (cuDNN 9, graphs made with the
// header-only cudnn-frontend): causal with top-left diagonal alignment, the sliding window as the
// band's left bound (query i keeps keys j with j + window > i), grouped KV heads read in place
// (cuDNN takes fewer K/V heads than query heads), bf16 or f16 in and out with f32 arithmetic
// (f16 is taken here only: no other op of the backend computes in it). cuDNN's
// softmax statistics ("Stats": max + ln(sum exp) of the scaled scores, [batch, heads, seq, 1])
// are exactly the natural-log lse of kernels/backend.h, in the same layout, so the two kernels'
// lse are interchangeable. Graphs are built once per shape and dtype and kept in a bounded cache.
#include <cmath>
#include <cstdio>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/cuda_backend_impl.h"
#include "kernels/cuda/cuda_util.h"
#include "kernels/lru_cache.h"

#if FASTLLM_HAVE_CUDNN
#include <cudnn.h>

#include <cudnn_frontend.h>
#endif

namespace fastllm::cuda {

#if FASTLLM_HAVE_CUDNN
namespace {

// One attention call's sizes and input dtype (BF16 or F16); window 0 or >= seq means no window.
struct AttentionShape {
  std::int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, dim = 0, window = 0;
  DType dtype = DType::BF16;
  auto key(bool backward) const {
    return std::make_tuple(backward, batch, seq, heads, kv_heads, dim, window, int(dtype));
  }
  std::string describe() const {
    return std::string(dtype_name(dtype)) + ", batch " + std::to_string(batch) + ", seq " +
           std::to_string(seq) + ", heads " + std::to_string(heads) + "/" +
           std::to_string(kv_heads) + ", head_dim " + std::to_string(dim) + ", window " +
           std::to_string(window);
  }
};

bool has_shape(const Tensor& t, DType dtype, std::initializer_list<std::int64_t> shape) {
  if (t.dtype != dtype || t.data == nullptr || t.rank != static_cast<int>(shape.size()))
    return false;
  int axis = 0;
  for (const std::int64_t size : shape)
    if (t.dims[axis++] != size) return false;
  return true;
}

// The cuDNN case: q, k, v (and out) of one dtype, bf16 or f16, [batch, seq, heads or kv_heads,
// dim] with heads a multiple of kv_heads, lse f32 [batch, heads, seq]. Anything else goes to the
// own kernel, which also reports malformed arguments.
bool cudnn_shape(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                 const Tensor& lse, std::int64_t window, AttentionShape& s) {
  if (q.rank != 4 || k.rank != 4 || window < 0) return false;
  if (q.dtype != DType::BF16 && q.dtype != DType::F16) return false;
  s = {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), window >= q.size(1) ? 0 : window,
       q.dtype};
  if (s.kv_heads <= 0 || s.heads % s.kv_heads != 0 || q.numel() == 0) return false;
  return has_shape(q, s.dtype, {s.batch, s.seq, s.heads, s.dim}) &&
         has_shape(k, s.dtype, {s.batch, s.seq, s.kv_heads, s.dim}) &&
         has_shape(v, s.dtype, {s.batch, s.seq, s.kv_heads, s.dim}) &&
         has_shape(out, s.dtype, {s.batch, s.seq, s.heads, s.dim}) &&
         has_shape(lse, DType::F32, {s.batch, s.heads, s.seq});
}

namespace fe = cudnn_frontend;

// Enough for every layer shape of a run (one or two window sizes, forward and backward, a few
// sequence lengths); a run that keeps changing shapes rebuilds rather than grows.
constexpr std::size_t kMaxGraphs = 32;

enum Uid : std::int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

struct HandleDeleter {
  void operator()(cudnnHandle_t handle) const { cudnnDestroy(handle); }
};

// A built graph and its workspace; graph null when cuDNN does not take the shape.
struct Graph {
  std::shared_ptr<fe::graph::Graph> graph;
  std::int64_t workspace = 0;
};

// Logical [batch, heads, seq, dim] over fastllm's [batch, seq, heads, dim] storage.
fe::graph::Tensor_attributes& bshd(fe::graph::Tensor_attributes& t, Uid uid, std::int64_t batch,
                                   std::int64_t heads, std::int64_t seq, std::int64_t dim) {
  return t.set_uid(uid)
      .set_dim({batch, heads, seq, dim})
      .set_stride({seq * heads * dim, dim, heads * dim, 1});
}

// A graph input in that layout.
fe::graph::Tensor_attributes bshd_input(const char* name, Uid uid, std::int64_t batch,
                                        std::int64_t heads, std::int64_t seq, std::int64_t dim) {
  fe::graph::Tensor_attributes t;
  bshd(t.set_name(name), uid, batch, heads, seq, dim);
  return t;
}

// The log-sum-exp statistics kept for backward: [batch, heads, seq, 1] in f32, lse's layout.
fe::graph::Tensor_attributes& stats_layout(fe::graph::Tensor_attributes& t,
                                           const AttentionShape& s) {
  return t.set_uid(kStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({s.batch, s.heads, s.seq, 1})
      .set_stride({s.heads * s.seq, s.seq, 1, 1});
}

// The mask both directions share: causal from the top-left corner, and the window's left bound.
template <class Attributes>
void set_mask(Attributes& attributes, const AttentionShape& s) {
  attributes.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
      .set_diagonal_band_right_bound(0);
  if (s.window > 0) attributes.set_diagonal_band_left_bound(static_cast<int>(s.window));
}

float softmax_scale(const AttentionShape& s) {
  // As the host backend rounds it.
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.dim)));
}

std::shared_ptr<fe::graph::Graph> new_graph(const AttentionShape& s) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(s.dtype == DType::F16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return graph;
}

std::shared_ptr<fe::graph::Graph> forward_graph(const AttentionShape& s) {
  auto graph = new_graph(s);
  auto q = graph->tensor(bshd_input("Q", kQ, s.batch, s.heads, s.seq, s.dim));
  auto k = graph->tensor(bshd_input("K", kK, s.batch, s.kv_heads, s.seq, s.dim));
  auto v = graph->tensor(bshd_input("V", kV, s.batch, s.kv_heads, s.seq, s.dim));
  auto options = fe::graph::SDPA_attributes()
                     .set_name("sdpa_forward")
                     .set_generate_stats(true)
                     .set_attn_scale(softmax_scale(s));
  set_mask(options, s);
  auto [o, stats] = graph->sdpa(q, k, v, options);
  bshd(o->set_output(true), kO, s.batch, s.heads, s.seq, s.dim);
  stats_layout(stats->set_output(true), s);
  return graph;
}

std::shared_ptr<fe::graph::Graph> backward_graph(const AttentionShape& s) {
  auto graph = new_graph(s);
  auto q = graph->tensor(bshd_input("Q", kQ, s.batch, s.heads, s.seq, s.dim));
  auto k = graph->tensor(bshd_input("K", kK, s.batch, s.kv_heads, s.seq, s.dim));
  auto v = graph->tensor(bshd_input("V", kV, s.batch, s.kv_heads, s.seq, s.dim));
  auto o = graph->tensor(bshd_input("O", kO, s.batch, s.heads, s.seq, s.dim));
  auto d_o = graph->tensor(bshd_input("dO", kDO, s.batch, s.heads, s.seq, s.dim));
  fe::graph::Tensor_attributes stats_input;
  auto stats = graph->tensor(stats_layout(stats_input.set_name("Stats"), s));
  auto options = fe::graph::SDPA_backward_attributes()
                     .set_name("sdpa_backward")
                     .set_attn_scale(softmax_scale(s));
  set_mask(options, s);
  auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, d_o, stats, options);
  bshd(dq->set_output(true), kDQ, s.batch, s.heads, s.seq, s.dim);
  bshd(dk->set_output(true), kDK, s.batch, s.kv_heads, s.seq, s.dim);
  bshd(dv->set_output(true), kDV, s.batch, s.kv_heads, s.seq, s.dim);
  return graph;
}

}  // namespace

class CudnnAttention {
 public:
  explicit CudnnAttention(cudaStream_t stream) {
    cudnnHandle_t handle = nullptr;
    if (cudnnCreate(&handle) != CUDNN_STATUS_SUCCESS)
      throw std::runtime_error("cudnnCreate failed: cuDNN attention needs cuDNN 9 installed");
    handle_.reset(handle);
    if (cudnnSetStream(handle, stream) != CUDNN_STATUS_SUCCESS)
      throw std::runtime_error("cudnnSetStream failed");
  }

  cudnnHandle_t handle() const { return handle_.get(); }

  // The graph of a shape and direction, built on first use; graph null when cuDNN refuses the
  // shape, which is reported once on stderr (the own kernel then runs it).
  const Graph& graph(bool backward, const AttentionShape& s) {
    const auto key = s.key(backward);
    if (const Graph* found = graphs_.find(key)) return *found;
    Graph built;
    auto graph = backward ? backward_graph(s) : forward_graph(s);
    fe::error_t status = graph->build(handle(), {fe::HeurMode_t::A});
    if (status.is_good()) status = graph->get_workspace_size(built.workspace);
    if (status.is_good()) {
      built.graph = std::move(graph);
    } else if (refused_.insert(key).second) {
      std::fprintf(stderr,
                   "fastllm: cuDNN fused attention does not take the %s of %s (%s); fastllm's own "
                   "attention kernel runs it\n",
                   backward ? "backward" : "forward", s.describe().c_str(),
                   status.get_message().c_str());
    }
    return graphs_.insert(key, std::move(built));
  }

 private:
  std::unique_ptr<cudnnContext, HandleDeleter> handle_;
  LruCache<decltype(AttentionShape{}.key(false)), Graph> graphs_{kMaxGraphs};
  std::set<decltype(AttentionShape{}.key(false))> refused_;
};

namespace {

void execute(CudaBackend& backend, CudnnAttention& cudnn, const Graph& graph,
             std::unordered_map<std::int64_t, void*> pack, const char* op) {
  Buffer workspace = backend.scratch(static_cast<std::size_t>(graph.workspace));
  fe::error_t status = graph.graph->execute(cudnn.handle(), pack, workspace.data());
  if (!status.is_good())
    throw std::runtime_error(std::string("CudaBackend::") + op +
                             ": cuDNN attention failed: " + status.get_message());
}

}  // namespace

bool CudaBackend::cudnn_attention_forward(Tensor q, Tensor k, Tensor v, std::int64_t window,
                                          Tensor out, Tensor lse) {
  AttentionShape s;
  if (attention_kernel_ != AttentionKernel::Cudnn || !cudnn_shape(q, k, v, out, lse, window, s))
    return false;
  if (!cudnn_) cudnn_ = std::make_shared<CudnnAttention>(stream());
  const Graph& graph = cudnn_->graph(false, s);
  if (!graph.graph) return false;
  execute(*this, *cudnn_, graph,
          {{kQ, q.data}, {kK, k.data}, {kV, v.data}, {kO, out.data}, {kStats, lse.data}},
          "attention_forward");
  return true;
}

bool CudaBackend::cudnn_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                           Tensor dout, std::int64_t window, Tensor dq, Tensor dk,
                                           Tensor dv) {
  AttentionShape s;
  if (attention_kernel_ != AttentionKernel::Cudnn || !cudnn_shape(q, k, v, out, lse, window, s) ||
      !has_shape(dout, s.dtype, {s.batch, s.seq, s.heads, s.dim}) ||
      !has_shape(dq, s.dtype, {s.batch, s.seq, s.heads, s.dim}) ||
      !has_shape(dk, s.dtype, {s.batch, s.seq, s.kv_heads, s.dim}) ||
      !has_shape(dv, s.dtype, {s.batch, s.seq, s.kv_heads, s.dim}))
    return false;
  if (!cudnn_) cudnn_ = std::make_shared<CudnnAttention>(stream());
  const Graph& graph = cudnn_->graph(true, s);
  if (!graph.graph) return false;
  execute(*this, *cudnn_, graph,
          {{kQ, q.data},
           {kK, k.data},
           {kV, v.data},
           {kO, out.data},
           {kDO, dout.data},
           {kStats, lse.data},
           {kDQ, dq.data},
           {kDK, dk.data},
           {kDV, dv.data}},
          "attention_backward");
  return true;
}

#else

// Built without cuDNN: the own kernel runs every case, said once when cuDNN was asked for.
class CudnnAttention {};

namespace {
bool report_no_cudnn(AttentionKernel kernel) {
  static bool reported = false;
  if (kernel == AttentionKernel::Cudnn && !reported) {
    reported = true;
    std::fprintf(stderr,
                 "fastllm: --attention_kernel=cudnn, but this fastllm was built without cuDNN "
                 "(run scripts/setup.sh and reconfigure); fastllm's own attention kernel runs\n");
  }
  return false;
}
}  // namespace

bool CudaBackend::cudnn_attention_forward(Tensor, Tensor, Tensor, std::int64_t, Tensor, Tensor) {
  return report_no_cudnn(attention_kernel_);
}

bool CudaBackend::cudnn_attention_backward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                           std::int64_t, Tensor, Tensor, Tensor) {
  return report_no_cudnn(attention_kernel_);
}

#endif

namespace {

// f16 attention that cuDNN did not take: the own kernel has no f16 path, so say what would.
void require_not_f16(const Tensor& q, const char* op) {
  if (q.dtype == DType::F16)
    fail(op,
         "q is f16, which only cuDNN's fused attention takes (--attention_kernel=cudnn, a build "
         "with cuDNN, consistent f16 tensors and a shape cuDNN supports); expected f32 or bf16 for "
         "the own kernel");
}

void require_no_document_f16(const Tensor& q, const char* op) {
  if (q.dtype == DType::F16)
    fail(op,
         "q is f16, expected f32 or bf16: packed documents run on the own kernel, and only "
         "cuDNN's fused attention takes f16");
}

}  // namespace

void CudaBackend::attention_forward(Tensor q, Tensor k, Tensor v, std::int64_t window, Tensor out,
                                    Tensor lse) {
  if (cudnn_attention_forward(q, k, v, window, out, lse)) {
    ++cudnn_attention_calls_;
    return;
  }
  require_not_f16(q, "attention_forward");
  own_attention_forward(q, k, v, Tensor(), window, out, lse);
  ++own_attention_calls_;
}

void CudaBackend::attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                     Tensor dout, std::int64_t window, Tensor dq, Tensor dk,
                                     Tensor dv) {
  if (cudnn_attention_backward(q, k, v, out, lse, dout, window, dq, dk, dv)) {
    ++cudnn_attention_calls_;
    return;
  }
  require_not_f16(q, "attention_backward");
  own_attention_backward(q, k, v, out, lse, dout, Tensor(), window, dq, dk, dv);
  ++own_attention_calls_;
}

// Packed documents run on the own kernel, whatever --attention_kernel says (counted with its calls
// in cuda_kernel_stats). cuDNN's variable-length SDPA (ragged offsets and per-sequence lengths)
// could take each document as a sequence of its own, but it needs the document boundaries on the
// host at every call and keeps its statistics per document rather than in the [batch, heads, seq]
// layout this op's lse has; the own kernel takes the positions on the device as they are.
void CudaBackend::document_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions,
                                             std::int64_t window, Tensor out, Tensor lse) {
  require_no_document_f16(q, "document_attention_forward");
  own_attention_forward(q, k, v, positions, window, out, lse);
  ++own_attention_calls_;
}

void CudaBackend::document_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                              Tensor dout, Tensor positions, std::int64_t window,
                                              Tensor dq, Tensor dk, Tensor dv) {
  require_no_document_f16(q, "document_attention_backward");
  own_attention_backward(q, k, v, out, lse, dout, positions, window, dq, dk, dv);
  ++own_attention_calls_;
}

}  // namespace fastllm::cuda
