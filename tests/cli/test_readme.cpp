// The README's flag reference grows with the code: every command `fastllm --help` lists has its
// own table (scripts/flag_reference.py), and every flag the command accepts is in that table.
#include <gtest/gtest.h>

#include <regex>

#include "support/process.h"

namespace fastllm::test {
namespace {

TEST(Readme, DocumentsEveryFlagOfEveryCommandInItsTable) {
  const std::string readme = read_text(std::string(FASTLLM_SOURCE_DIR) + "/README.md");
  ASSERT_FALSE(readme.empty());
  const CommandResult usage = run_fastllm("--help");
  ASSERT_EQ(usage.exit_code, 0) << usage.err;
  const std::regex command_line(R"(^  (\w+) +\S)"), flag_line(R"(^  --(\w+) )");
  int commands = 0, flags = 0;
  std::istringstream usage_lines(usage.out.substr(usage.out.find("commands:")));
  for (std::string line; std::getline(usage_lines, line);) {
    std::smatch c;
    if (!std::regex_search(line, c, command_line)) continue;
    const std::string command = c[1].str();
    ++commands;
    const auto begin = readme.find("<summary><code>fastllm " + command + "</code>");
    ASSERT_NE(begin, std::string::npos) << "README.md has no flag table for 'fastllm " << command
                                        << "'; run scripts/flag_reference.py BINARY README.md";
    const std::string table = readme.substr(begin, readme.find("</details>", begin) - begin);
    const CommandResult help = run_fastllm(command + " --help");
    ASSERT_EQ(help.exit_code, 0) << command << help.err;
    std::istringstream help_lines(help.out);
    for (std::string flag_text; std::getline(help_lines, flag_text);) {
      std::smatch m;
      if (!std::regex_search(flag_text, m, flag_line)) continue;
      ++flags;
      EXPECT_NE(table.find("| `--" + m[1].str() + "` |"), std::string::npos)
          << "fastllm " << command << " --" << m[1] << " is not in its table in README.md";
    }
  }
  EXPECT_GE(commands, 6);
  EXPECT_GT(flags, 100);
}

}  // namespace
}  // namespace fastllm::test
