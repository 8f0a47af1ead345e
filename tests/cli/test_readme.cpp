// The README's flag reference grows with the code: every flag any command accepts is documented.
#include <gtest/gtest.h>

#include <regex>

#include "support/process.h"

namespace fastllm::test {
namespace {

TEST(Readme, DocumentsEveryFlagOfEveryCommand) {
  const std::string readme = read_text(std::string(FASTLLM_SOURCE_DIR) + "/README.md");
  ASSERT_FALSE(readme.empty());
  const std::regex flag(R"(^  --(\w+) )");
  int flags = 0;
  for (const char* command : {"inspect", "probe", "train", "prepare", "convert", "export"}) {
    CommandResult r = run_fastllm(std::string(command) + " --help");
    ASSERT_EQ(r.exit_code, 0) << command << r.err;
    std::istringstream lines(r.out);
    for (std::string line; std::getline(lines, line);) {
      std::smatch m;
      if (!std::regex_search(line, m, flag)) continue;
      ++flags;
      EXPECT_NE(readme.find("`--" + m[1].str() + "`"), std::string::npos)
          << "fastllm " << command << " --" << m[1] << " is not in README.md";
    }
  }
  EXPECT_GT(flags, 50);
}

}  // namespace
}  // namespace fastllm::test
