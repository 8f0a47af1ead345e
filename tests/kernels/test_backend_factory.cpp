// The backend factory's errors name the flag, the value found and the values expected; they are
// std::invalid_argument (kernels/ knows no UserError), which the command line turns into exit
// code 2 (src/parallel/backend_setup.cpp, tested through the CLI).
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "kernels/backend_factory.h"

namespace fastllm::test {
namespace {

// The message of the invalid_argument f throws ("" when it throws none).
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(BackendFactory, ParsesDtypesAndAttentionKernels) {
  EXPECT_EQ(parse_compute_dtype("fp32"), DType::F32);
  EXPECT_EQ(parse_compute_dtype("bf16"), DType::BF16);
  EXPECT_EQ(parse_attention_kernel("cudnn"), AttentionKernel::Cudnn);
  EXPECT_EQ(parse_attention_kernel("own"), AttentionKernel::Own);
  EXPECT_EQ(message_of([] { parse_compute_dtype("fp16"); }),
            "--dtype: 'fp16', expected fp32 or bf16");
  EXPECT_EQ(message_of([] { parse_attention_kernel("flash"); }),
            "--attention_kernel: 'flash', expected cudnn or own");
}

TEST(BackendFactory, BadBackendsNameTheFlag) {
  EXPECT_EQ(message_of([] { make_backend("tpu"); }), "--backend: 'tpu', expected host or cuda");
  EXPECT_NE(message_of([] { make_backend("host", DType::BF16); }).find("--dtype: 'bf16'"),
            std::string::npos);
  // The host backend takes either attention kernel choice and has one kernel.
  EXPECT_EQ(make_backend("host", DType::F32, AttentionKernel::Own)->name(), "host");
  if (!backend_available("cuda")) {
    EXPECT_EQ(message_of([] { make_backend("cuda"); }).rfind("--backend: 'cuda'", 0), 0u);
  }
}

}  // namespace
}  // namespace fastllm::test
