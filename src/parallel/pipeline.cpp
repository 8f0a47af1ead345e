#include "parallel/pipeline.h"

#include <algorithm>
#include <deque>

namespace fastllm {

Pipeline::Pipeline(Model& model, Communicator* stages) : model_(model), comm_(stages) {
  if (comm_) {
    stages_ = comm_->size();
    stage_ = comm_->rank();
  }
}

Model::StageTensors Pipeline::recv_forward(const MicroBatch& mb) {
  if (first()) return {};
  Model::StageTensors in = model_.stage_input_buffers(mb.batch * mb.seq);
  comm_->recv(in.x.t, stage_ - 1);
  if (in.router.t.data) comm_->recv(in.router.t, stage_ - 1);
  return in;
}

void Pipeline::send_forward(const Model::ForwardState& state) {
  if (last()) return;
  comm_->send(model_.stage_output(state), stage_ + 1);
  const Tensor router = model_.stage_router_sums(state);
  if (router.data) comm_->send(router, stage_ + 1);
}

Model::StageTensors Pipeline::send_forward_recv_backward(const Model::ForwardState& state,
                                                         const MicroBatch& next_backward) {
  if (last()) return {};
  Model::StageTensors grad = model_.stage_grad_buffers(next_backward.batch * next_backward.seq);
  comm_->send_recv(model_.stage_output(state), stage_ + 1, grad.x.t, stage_ + 1);
  const Tensor router = model_.stage_router_sums(state);
  if (router.data) comm_->send_recv(router, stage_ + 1, grad.router.t, stage_ + 1);
  return grad;
}

Model::StageTensors Pipeline::send_backward_recv_forward(const Model::StageTensors& grad,
                                                         const MicroBatch& next_forward) {
  if (first()) return {};
  Model::StageTensors in = model_.stage_input_buffers(next_forward.batch * next_forward.seq);
  comm_->send_recv(grad.x.t, stage_ - 1, in.x.t, stage_ - 1);
  if (in.router.t.data) comm_->send_recv(grad.router.t, stage_ - 1, in.router.t, stage_ - 1);
  return in;
}

Model::StageTensors Pipeline::recv_backward(const MicroBatch& mb) {
  if (last()) return {};
  Model::StageTensors grad = model_.stage_grad_buffers(mb.batch * mb.seq);
  comm_->recv(grad.x.t, stage_ + 1);
  if (grad.router.t.data) comm_->recv(grad.router.t, stage_ + 1);
  return grad;
}

void Pipeline::send_backward(const Model::StageTensors& grad) {
  if (first()) return;
  comm_->send(grad.x.t, stage_ - 1);
  if (grad.router.t.data) comm_->send(grad.router.t, stage_ - 1);
}

PipelineTotals Pipeline::forward_backward(const std::vector<MicroBatch>& batches, double ce_scale,
                                          double aux_scale,
                                          std::vector<std::vector<float>>* logits) {
  const auto count = static_cast<std::int64_t>(batches.size());
  const std::int64_t warmup = std::min<std::int64_t>(stages_ - stage_ - 1, count);
  std::deque<std::unique_ptr<Model::ForwardState>> in_flight;
  std::size_t forwarded = 0, backwarded = 0;
  PipelineTotals totals;
  auto forward_one = [&](Model::StageTensors input) {
    const MicroBatch& mb = batches[forwarded++];
    float* out = nullptr;
    if (logits && last()) {
      logits->emplace_back(static_cast<std::size_t>(mb.batch * mb.seq * model_.vocab_rows()));
      out = logits->back().data();
    }
    MicroBatchResult r;
    in_flight.push_back(model_.forward_stage(mb, std::move(input), r, out));
    totals.ce_sum += r.ce_sum;
    totals.aux_sum += r.aux_loss;
    totals.predicted += r.predicted;
  };
  auto backward_one = [&](Model::StageTensors grad) {
    std::unique_ptr<Model::ForwardState> state = std::move(in_flight.front());
    in_flight.pop_front();
    ++backwarded;
    return model_.backward_stage(std::move(state), std::move(grad), ce_scale, aux_scale);
  };

  for (std::int64_t i = 0; i < warmup; ++i) {
    forward_one(recv_forward(batches[forwarded]));
    send_forward(*in_flight.back());
  }
  const std::int64_t steady = count - warmup;
  Model::StageTensors input;
  if (steady > 0) input = recv_forward(batches[forwarded]);
  for (std::int64_t i = 0; i < steady; ++i) {
    forward_one(std::move(input));
    Model::StageTensors grad = send_forward_recv_backward(*in_flight.back(), batches[backwarded]);
    const Model::StageTensors dx = backward_one(std::move(grad));
    if (i + 1 == steady) {
      send_backward(dx);
    } else {
      input = send_backward_recv_forward(dx, batches[forwarded]);
    }
  }
  for (std::int64_t i = 0; i < warmup; ++i)
    send_backward(backward_one(recv_backward(batches[backwarded])));
  return totals;
}

PipelineTotals Pipeline::forward(const std::vector<MicroBatch>& batches) {
  PipelineTotals totals;
  for (const MicroBatch& mb : batches) {
    MicroBatchResult r;
    const std::unique_ptr<Model::ForwardState> state =
        model_.forward_stage(mb, recv_forward(mb), r);
    send_forward(*state);
    totals.ce_sum += r.ce_sum;
    totals.aux_sum += r.aux_loss;
    totals.predicted += r.predicted;
  }
  return totals;
}

void sync_replicated_gradients(Model& model, const Topology& topology) {
  for (Parameter& p : model.parameters()) {
    if (p.sync == GradientSync::KvReplicas && topology.kv_replicas)
      topology.kv_replicas->all_reduce(p.grad, ReduceOp::Sum);
    if (p.sync == GradientSync::TiedEmbedding && topology.tied_embedding)
      topology.tied_embedding->all_reduce(p.grad, ReduceOp::Sum);
  }
}

}  // namespace fastllm
