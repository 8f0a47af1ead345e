#pragma once
// `fastllm --version`: what this binary is and what it was built against, for bug reports and for
// checking that a cluster's module set matches the build.
#include <string>

namespace fastllm {

// Several lines: the version and git revision, the backends built, the library versions.
std::string version_text();

}  // namespace fastllm
