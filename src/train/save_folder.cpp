#include "train/save_folder.h"

#include <fcntl.h>
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "io/error.h"
#include "train/checkpoint.h"

namespace fastllm {
namespace {

namespace fs = std::filesystem;

std::string host_name() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "unknown-host";
  return name;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Creates `path` holding `content` unless it exists; errno of the failure otherwise (0: created).
int create_exclusive(const std::string& path, const std::string& content) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (fd < 0) return errno;
  const bool written =
      ::write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size());
  const int error = written ? 0 : (errno != 0 ? errno : EIO);
  if (::close(fd) != 0 || !written) {
    ::unlink(path.c_str());
    return error != 0 ? error : EIO;
  }
  return 0;
}

}  // namespace

std::string SaveFolderLock::lock_path(const std::string& folder) {
  return (fs::path(folder) / ".fastllm.lock").string();
}

SaveFolderLock::SaveFolderLock(const std::string& folder) {
  const std::string flag = "--save=" + folder;
  std::error_code error;
  if (fs::exists(folder, error) && !fs::is_directory(folder, error))
    throw UserError(flag + " is a file, expected a folder for the checkpoints");
  fs::create_directories(folder, error);
  if (error) throw UserError(flag + ": cannot create the folder: " + error.message());
  path_ = lock_path(folder);
  const std::string host = host_name();
  content_ = host + " " + std::to_string(::getpid()) + "\n";
  for (int attempt = 0; attempt < 3; ++attempt) {
    const int failed = create_exclusive(path_, content_);
    if (failed == 0) return;
    if (failed != EEXIST)
      throw UserError(flag + " is not writable: cannot create " + path_ + ": " +
                      std::strerror(failed));
    std::istringstream holder(read_all(path_));
    std::string other_host;
    long long pid = 0;
    holder >> other_host >> pid;
    const bool dead =
        other_host == host && pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
    if (!dead)
      throw UserError(flag + " is in use by process " + std::to_string(pid) + " on " +
                      (other_host.empty() ? std::string("an unknown host") : other_host) +
                      " (lock file " + path_ +
                      "); two runs must not share a --save folder. If no run uses it any more, "
                      "remove the lock file");
    // A stale lock of a process that died without releasing it.
    ::unlink(path_.c_str());
  }
  throw UserError(flag + ": cannot take the lock file " + path_ +
                  " (another process keeps taking it)");
}

SaveFolderLock::~SaveFolderLock() {
  if (!path_.empty() && read_all(path_) == content_) ::unlink(path_.c_str());
}

std::vector<std::string> checkpoints_to_rotate(const std::string& folder, std::int64_t keep,
                                               const std::string& saved,
                                               std::int64_t saved_iteration,
                                               const std::set<std::string>& rejected) {
  if (keep <= 0) return {};
  std::vector<std::pair<std::int64_t, std::string>> good;
  for (const std::string& path : list_checkpoints(folder)) {
    if (rejected.count(path) != 0 || path == saved) continue;
    try {
      good.emplace_back(checkpoint_iteration(path, MPI_COMM_SELF), path);
    } catch (const UserError&) {
      continue;
    }
  }
  // `saved` takes one of the places kept, except that a newer good checkpoint is never deleted.
  std::sort(good.begin(), good.end(), std::greater<>());
  std::size_t kept = static_cast<std::size_t>(keep - 1);
  if (!good.empty() && good[0].first > saved_iteration) kept = std::max<std::size_t>(kept, 1);
  std::vector<std::string> out;
  for (std::size_t i = kept; i < good.size(); ++i)
    out.push_back(good[i].second);
  return out;
}

}  // namespace fastllm
