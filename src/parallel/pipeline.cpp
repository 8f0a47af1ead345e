#include "parallel/pipeline.h"

#include <algorithm>
#include <deque>

namespace fastllm {

Pipeline::Pipeline(Model& model, Communicator* stages)
    : model_(model),
      loss_(model.backend(), model.partition().tensor, model.vocab()),
      comm_(stages) {
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

Pipeline::InFlight Pipeline::forward_one(const MicroBatch& mb, Model::StageTensors input,
                                         PipelineTotals& totals,
                                         std::vector<std::vector<float>>* logits) {
  InFlight flight{model_.forward_stage(mb, std::move(input)), {}};
  if (!last()) return flight;
  const Tensor stage_logits = model_.logits(*flight.state);
  if (logits) {
    logits->emplace_back(static_cast<std::size_t>(stage_logits.numel()));
    model_.copy_to_host_f32(logits->back().data(), stage_logits);
  }
  totals.ce_sum += loss_.forward(stage_logits, mb.targets, flight.loss);
  totals.aux_sum += model_.aux_loss(*flight.state);
  const std::vector<double>& load = model_.expert_load(*flight.state);
  for (std::size_t e = 0; e < load.size(); ++e)
    totals.expert_load_sum[e] += load[e];
  totals.predicted +=
      std::count_if(mb.targets.begin(), mb.targets.end(), [](std::int32_t t) { return t >= 0; });
  return flight;
}

Model::StageTensors Pipeline::backward_one(InFlight flight, double ce_scale, double aux_scale,
                                           Model::StageTensors grad) {
  if (last())
    loss_.backward(model_.logits(*flight.state), flight.loss, static_cast<float>(ce_scale));
  return model_.backward_stage(std::move(flight.state), std::move(grad), aux_scale);
}

PipelineTotals Pipeline::empty_totals() const {
  PipelineTotals totals;
  totals.expert_load_sum.assign(static_cast<std::size_t>(model_.arch().num_experts), 0.0);
  return totals;
}

PipelineTotals Pipeline::forward_backward(const std::vector<MicroBatch>& batches, double ce_scale,
                                          double aux_scale,
                                          std::vector<std::vector<float>>* logits) {
  const auto count = static_cast<std::int64_t>(batches.size());
  const std::int64_t warmup = std::min<std::int64_t>(stages_ - stage_ - 1, count);
  std::deque<InFlight> in_flight;
  std::size_t forwarded = 0, backwarded = 0;
  PipelineTotals totals = empty_totals();
  auto forward_next = [&](Model::StageTensors input) {
    in_flight.push_back(forward_one(batches[forwarded++], std::move(input), totals, logits));
  };
  auto backward_next = [&](Model::StageTensors grad) {
    InFlight flight = std::move(in_flight.front());
    in_flight.pop_front();
    ++backwarded;
    return backward_one(std::move(flight), ce_scale, aux_scale, std::move(grad));
  };

  for (std::int64_t i = 0; i < warmup; ++i) {
    forward_next(recv_forward(batches[forwarded]));
    send_forward(*in_flight.back().state);
  }
  const std::int64_t steady = count - warmup;
  Model::StageTensors input;
  if (steady > 0) input = recv_forward(batches[forwarded]);
  for (std::int64_t i = 0; i < steady; ++i) {
    forward_next(std::move(input));
    Model::StageTensors grad =
        send_forward_recv_backward(*in_flight.back().state, batches[backwarded]);
    const Model::StageTensors dx = backward_next(std::move(grad));
    if (i + 1 == steady) {
      send_backward(dx);
    } else {
      input = send_backward_recv_forward(dx, batches[forwarded]);
    }
  }
  for (std::int64_t i = 0; i < warmup; ++i)
    send_backward(backward_next(recv_backward(batches[backwarded])));
  return totals;
}

PipelineTotals Pipeline::forward(const std::vector<MicroBatch>& batches) {
  PipelineTotals totals = empty_totals();
  for (const MicroBatch& mb : batches) {
    const InFlight flight = forward_one(mb, recv_forward(mb), totals, nullptr);
    send_forward(*flight.state);
  }
  return totals;
}

}  // namespace fastllm
