// Option parsing rules, checked directly on the parser.
#include <gtest/gtest.h>

#include <fstream>

#include "config/flags.h"
#include "io/error.h"
#include "support/process.h"

namespace fastllm::test {
namespace {

Options parsed(const std::vector<std::string>& args) {
  Options o("inspect", {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Inspect});
  o.parse(args);
  return o;
}

TEST(Options, BothSpellings) {
  Options o = parsed({"--num_layers=7", "--hidden_size", "96", "--gated", "--format", "json"});
  EXPECT_EQ(o.get_int("num_layers"), 7);
  EXPECT_EQ(o.get_int("hidden_size"), 96);
  EXPECT_TRUE(o.get_bool("gated"));
  EXPECT_EQ(o.get_string("format"), "json");
  EXPECT_EQ(o.source("num_layers"), Source::Flag);
  EXPECT_EQ(o.source("vocab_size"), Source::Default);
}

TEST(Options, ConfigFileThenFlags) {
  TempDir dir;
  std::ofstream(dir / "a.yaml") << "num_layers: 4\nwindow_size: 16\ngated: false\n";
  Options o = parsed({"--window_size=8", "--config", (dir / "a.yaml").string()});
  EXPECT_EQ(o.get_int("num_layers"), 4);
  EXPECT_EQ(o.source("num_layers"), Source::ConfigFile);
  EXPECT_EQ(o.get_int("window_size"), 8);  // the flag wins though it came first
  EXPECT_FALSE(o.get_bool("gated"));
}

TEST(Options, ConfigFileErrors) {
  TempDir dir;
  std::ofstream(dir / "bad.yaml") << "num_layerz: 4\n";
  try {
    parsed({"--config", (dir / "bad.yaml").string()});
    FAIL() << "accepted an unknown key";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("config file key 'num_layerz'"), std::string::npos);
  }
  std::ofstream(dir / "value.yaml") << "num_layers: many\n";
  EXPECT_THROW(parsed({"--config", (dir / "value.yaml").string()}), UserError);
  std::ofstream(dir / "broken.yaml") << "num_layers: [1, 2\n";
  EXPECT_THROW(parsed({"--config", (dir / "broken.yaml").string()}), UserError);
}

TEST(Options, Malformed) {
  EXPECT_THROW(parsed({"--num_layers"}), UserError);
  EXPECT_THROW(parsed({"--num_layers=1.5"}), UserError);
  EXPECT_THROW(parsed({"--norm_epsilon=abc"}), UserError);
  EXPECT_THROW(parsed({"--norm_epsilon=inf"}), UserError);
  EXPECT_THROW(parsed({"--num_layers=3", "4"}), UserError);
  EXPECT_THROW(parsed({"--"}), UserError);
}

TEST(Options, HelpListsEveryFlag) {
  Options o = parsed({"--help"});
  EXPECT_TRUE(o.help_requested());
  const std::string help = o.help_text();
  for (const auto& group : {FlagGroup::Model, FlagGroup::Layout, FlagGroup::Inspect}) {
    for (const auto& spec : flags_of(group)) {
      EXPECT_NE(help.find("--" + spec.name + " "), std::string::npos) << spec.name;
    }
  }
}

}  // namespace
}  // namespace fastllm::test
