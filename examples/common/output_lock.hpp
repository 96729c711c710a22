#pragma once
/// @file output_lock.hpp
/// @brief One writer per output folder: a training run holds `.lock` in its folder, and a second
/// run into the same folder is refused, naming the holder's pid and host.
///
/// The lock is `flock` on the file, so it ends with the process however that ends (SIGKILL
/// included) and never goes stale; the file's text only names the holder for the message.

#include <common/files.hpp>
#include <scedit/atomic_file.hpp>

#include <torch/torch.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

namespace common {

/// Holds a folder's `.lock` while it lives (see the file comment).
class OutputLock {
 public:
  /// Takes `folder`'s lock (creating the folder), or throws naming the holder; `flag` names the
  /// flag that gave the folder, for the message.
  explicit OutputLock(const std::filesystem::path& folder, const std::string& flag = "--output") {
    prepare_output_folder(folder, flag);
    const auto path = (folder / ".lock").string();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    TORCH_CHECK(fd_ >= 0, flag, ": cannot create '", path, "': ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      char holder[256] = {};
      const ssize_t n = ::pread(fd_, holder, sizeof(holder) - 1, 0);
      std::string who(holder, n > 0 ? static_cast<size_t>(n) : 0);
      while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
      ::close(fd_);
      fd_ = -1;
      TORCH_CHECK(false, flag, " '", folder.string(), "' is in use by another run (",
                  who.empty() ? "holder unknown" : who, "; lock: ", path,
                  "): wait for it to end, or give another ", flag);
    }
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    const std::string who = "pid " + std::to_string(::getpid()) + " on " + host + "\n";
    if (::ftruncate(fd_, 0) == 0) (void)scedit::detail::write_all(fd_, reinterpret_cast<const uint8_t*>(who.data()), who.size());
  }
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;
  /// Releases the lock (closing the file releases it; the emptied file stays).
  ~OutputLock() {
    if (fd_ < 0) return;
    (void)::ftruncate(fd_, 0);
    ::close(fd_);
  }

 private:
  int fd_ = -1;
};

}  // namespace common
