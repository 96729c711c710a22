#pragma once
/// @file atomic_file.hpp
/// @brief Writing a file atomically: a reader, or a crash, sees either the earlier file or the
/// whole new one, never a half-written file.
///
/// The bytes go to a temporary file beside the target (same folder, hence same file system, so
/// the rename cannot turn into a copy), which is fsynced, then renamed over the target; the
/// folder is fsynced last so that the rename survives a crash too. On any failure the earlier
/// file is untouched and the temporary removed. Linux / POSIX only.
///
/// Example:
/// @code
/// scedit::write_text_file("adapter_config.json", config.dump(2) + "\n");
/// @endcode

#include <torch/torch.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace scedit {

namespace detail {

/// The text of errno `error`.
inline std::string errno_str(int error) { return std::strerror(error); }

/// An open file descriptor, closed on destruction.
class Fd {
 public:
  /// Takes ownership of `fd` (-1: none).
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { close(); }
  /// The descriptor, or -1.
  int get() const { return fd_; }
  /// Closes now; returns 0 or the errno of a failed close.
  int close() {
    if (fd_ < 0) return 0;
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc == 0 ? 0 : errno;
  }

 private:
  int fd_;
};

/// Writes all of [data, data + size) to fd; returns 0 or the errno.
inline int write_all(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, std::min<size_t>(size, size_t{1} << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return 0;
}

/// A temporary file beside the destination, removed unless committed.
class TempFile {
 public:
  /// Creates `.<name>.tmp.XXXXXX` in the folder of `destination` (check fd() >= 0).
  explicit TempFile(const std::string& destination) {
    const std::filesystem::path target(destination);
    const std::filesystem::path folder = target.has_parent_path() ? target.parent_path() : ".";
    std::string pattern =
        (folder / ("." + target.filename().string() + ".tmp.XXXXXX")).string();
    fd_ = ::mkstemp(pattern.data());
    error_ = fd_ < 0 ? errno : 0;
    if (fd_ >= 0) path_ = pattern;
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !path_.empty()) ::unlink(path_.c_str());
  }
  /// The open descriptor, or -1.
  int fd() const { return fd_; }
  /// The errno of a failed creation, else 0.
  int error() const { return error_; }
  /// The temporary file's path ("" when creation failed).
  const std::string& path() const { return path_; }
  /// Closes the descriptor; returns 0 or the errno.
  int close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc == 0 ? 0 : errno;
  }
  /// Keeps the file (it has been renamed into place).
  void commit() { committed_ = true; }

 private:
  int fd_ = -1;
  int error_ = 0;
  bool committed_ = false;
  std::string path_;
};

}  // namespace detail

/// Makes the entries of `folder` durable (fsync on the folder), so that a file renamed into it
/// survives a crash. Best effort: some file systems refuse fsync on folders, and the data of the
/// files themselves is synced by their writers.
inline void sync_folder(const std::string& folder) {
  detail::Fd dir(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() >= 0 && ::fsync(dir.get()) != 0) {
    // Ignored (see above).
  }
}

/// Writes `pieces` (pointer, size) one after the other to `path` atomically: into a temporary
/// file in the same folder, fsync, rename over `path` (keeping an existing file's mode), then
/// fsync the folder. On any failure the previous file is untouched and the temporary removed.
/// `where` starts every error message (e.g. "safetensors save to 'x': ").
inline void write_file_atomically(const std::string& path,
                                  const std::vector<std::pair<const void*, size_t>>& pieces,
                                  const std::string& where) {
  detail::TempFile temp(path);
  TORCH_CHECK(temp.fd() >= 0, where, "cannot create a temporary file beside it: ",
              detail::errno_str(temp.error()));
  struct stat old {};
  const bool replaces = ::stat(path.c_str(), &old) == 0 && S_ISREG(old.st_mode);
  const mode_t mode = replaces ? (old.st_mode & 07777) : 0644;
  const int chmod_rc = ::fchmod(temp.fd(), mode);
  const int chmod_error = errno;
  TORCH_CHECK(chmod_rc == 0, where, "cannot set the mode of '", temp.path(), "': ",
              detail::errno_str(chmod_error));
  int error = 0;
  for (size_t i = 0; i < pieces.size() && !error; ++i) {
    error = detail::write_all(temp.fd(), static_cast<const uint8_t*>(pieces[i].first), pieces[i].second);
  }
  TORCH_CHECK(!error, where, "cannot write '", temp.path(), "': ", detail::errno_str(error));
  const int sync_rc = ::fsync(temp.fd());
  const int sync_error = errno;
  TORCH_CHECK(sync_rc == 0, where, "cannot fsync '", temp.path(), "': ",
              detail::errno_str(sync_error));
  error = temp.close();
  TORCH_CHECK(!error, where, "cannot close '", temp.path(), "': ", detail::errno_str(error));
  const int rename_rc = ::rename(temp.path().c_str(), path.c_str());
  const int rename_error = errno;
  TORCH_CHECK(rename_rc == 0, where, "cannot rename '", temp.path(), "' over it: ",
              detail::errno_str(rename_error));
  temp.commit();
  const std::filesystem::path target(path);
  sync_folder(target.has_parent_path() ? target.parent_path().string() : ".");
}

/// Writes `text` to `path` atomically (see `write_file_atomically`).
inline void write_text_file(const std::string& path, const std::string& text) {
  write_file_atomically(path, {{text.data(), text.size()}}, "writing '" + path + "': ");
}

}  // namespace scedit
