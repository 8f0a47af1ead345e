#pragma once
// The --save folder of a training run: found writable and locked before the first iteration, and
// its checkpoints rotated by what they hold rather than by their names.
#include <cstdint>
#include <set>
#include <string>
#include <vector>

namespace fastllm {

// Creates the folder (and its parents) and takes its lock file, FOLDER/.fastllm.lock, holding
// "HOST PID". UserError naming the folder when it cannot be created or written (a file in the
// way, a read-only file system), or when another live process holds the lock. A lock left by a
// dead process of this host is taken over; one of another host is only reported (this host cannot
// tell whether it is alive). The destructor removes the lock file if it is still this one's.
class SaveFolderLock {
 public:
  explicit SaveFolderLock(const std::string& folder);
  ~SaveFolderLock();
  SaveFolderLock(const SaveFolderLock&) = delete;
  SaveFolderLock& operator=(const SaveFolderLock&) = delete;

  static std::string lock_path(const std::string& folder);

 private:
  std::string path_;
  std::string content_;
};

// The checkpoints of `folder` that rotation deletes after `saved` was written, keeping `keep`
// (0: all): the checkpoints that open and whose iteration attribute matches their name, newest
// first by that attribute, and `saved` (holding `saved_iteration`) always, and the newest of the
// others when it is newer than `saved`. Files that do not open, say another iteration than
// their name, or are in `rejected` (they failed to load) are never counted and never deleted.
// Opens each file on this process alone (MPI_COMM_SELF).
std::vector<std::string> checkpoints_to_rotate(const std::string& folder, std::int64_t keep,
                                               const std::string& saved,
                                               std::int64_t saved_iteration,
                                               const std::set<std::string>& rejected);

}  // namespace fastllm
