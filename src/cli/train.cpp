// `fastllm train`: the training job (see train/trainer.h).
#include <iostream>

#include "cli/commands.h"
#include "model/hf_weights.h"
#include "train/trainer.h"

namespace fastllm {

int run_train(const Args& args) {
  Options options("train", {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Train, FlagGroup::Data,
                            FlagGroup::Checkpoint, FlagGroup::Backend});
  options.parse(args);
  if (options.help_requested()) {
    std::cout << options.help_text();
    return 0;
  }
  const ModelConfig model = resolve_model(options);
  check_pretrained_weights(model);
  const TrainSettings settings = train_settings(options, model);
  return train(options, model, settings);
}

}  // namespace fastllm
