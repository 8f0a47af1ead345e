#pragma once
// Command-line and config-file options: every flag of every command is declared once here with its
// type, default and help text, so parsing, validation, `--help` and the README agree.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace fastllm {

enum class FlagType { Int, Float, Bool, String, Choice, List };

// Where a resolved value came from, in increasing precedence.
enum class Source { Default, Checkpoint, ConfigFile, Flag };
const char* source_name(Source source);

struct FlagSpec {
  std::string name;
  FlagType type;
  std::string default_value;  // as it would be written on the command line; "" = unset
  std::string help;
  std::vector<std::string> choices = {};  // FlagType::Choice
};

// Groups of flags; a command accepts the union of the groups it names.
enum class FlagGroup {
  Common,
  Model,
  Layout,
  Inspect,
  Probe,
  Convert,
  Export,
  Train,
  Data,
  Checkpoint,
  Prepare,
  Backend,
  Generate
};
const std::vector<FlagSpec>& flags_of(FlagGroup group);

struct Value {
  std::vector<std::string> items;  // one item for scalars
  Source source = Source::Default;
};

// The parsed options of one command: flags > config file > defaults. Checkpoint values are merged
// later by the architecture resolver, which knows which fields they may override.
class Options {
 public:
  Options(std::string command, std::vector<FlagGroup> groups);

  // Parses argv (after the command name). Throws UserError on unknown flags or malformed values.
  void parse(const std::vector<std::string>& args);

  const std::string& command() const { return command_; }
  bool help_requested() const { return help_; }
  std::string help_text() const;

  const FlagSpec& spec(const std::string& name) const;
  bool has_spec(const std::string& name) const;
  // Set explicitly by a flag or the config file.
  bool is_explicit(const std::string& name) const;
  bool is_set(const std::string& name) const;  // explicit or has a non-empty default
  Source source(const std::string& name) const;

  std::int64_t get_int(const std::string& name) const;
  double get_float(const std::string& name) const;
  bool get_bool(const std::string& name) const;
  std::string get_string(const std::string& name) const;
  std::vector<std::string> get_list(const std::string& name) const;

  // Values as written, for the resolved config saved next to a run.
  std::map<std::string, Value> all() const;

  // Converts and validates one value of a flag's type; the error names the flag and the value.
  static std::int64_t parse_int(const std::string& flag, const std::string& text);
  static double parse_float(const std::string& flag, const std::string& text);
  static bool parse_bool(const std::string& flag, const std::string& text);

 private:
  void set(const std::string& name, std::vector<std::string> items, Source source);
  void load_config_file(const std::string& path);
  const Value* find(const std::string& name) const;

  std::string command_;
  std::vector<FlagGroup> groups_;
  std::map<std::string, FlagSpec> specs_;
  std::vector<std::string> order_;
  std::map<std::string, Value> values_;
  bool help_ = false;
};

}  // namespace fastllm
