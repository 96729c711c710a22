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

namespace detail {

/// Fills `temp` with `pieces` under `mode`, fsynced and closed; throws starting with `where` on
/// failure (the temporary is then removed by its destructor).
inline void fill_temporary(TempFile& temp, mode_t mode,
                           const std::vector<std::pair<const void*, size_t>>& pieces,
                           const std::string& where) {
  TORCH_CHECK(temp.fd() >= 0, where, "cannot create a temporary file beside it: ", errno_str(temp.error()));
  const int chmod_rc = ::fchmod(temp.fd(), mode);
  const int chmod_error = errno;
  TORCH_CHECK(chmod_rc == 0, where, "cannot set the mode of '", temp.path(), "': ", errno_str(chmod_error));
  int error = 0;
  for (size_t i = 0; i < pieces.size() && !error; ++i) {
    error = write_all(temp.fd(), static_cast<const uint8_t*>(pieces[i].first), pieces[i].second);
  }
  TORCH_CHECK(!error, where, "cannot write '", temp.path(), "': ", errno_str(error));
  const int sync_rc = ::fsync(temp.fd());
  const int sync_error = errno;
  TORCH_CHECK(sync_rc == 0, where, "cannot fsync '", temp.path(), "': ", errno_str(sync_error));
  error = temp.close();
  TORCH_CHECK(!error, where, "cannot close '", temp.path(), "': ", errno_str(error));
}

/// The folder of `path` ("." for a bare file name).
inline std::string folder_of(const std::string& path) {
  const std::filesystem::path target(path);
  return target.has_parent_path() ? target.parent_path().string() : ".";
}

}  // namespace detail

/// Writes `pieces` (pointer, size) one after the other to `path` atomically: into a temporary
/// file in the same folder, fsync, rename over `path` (keeping an existing file's mode), then
/// fsync the folder. On any failure the previous file is untouched and the temporary removed.
/// `where` starts every error message (e.g. "safetensors save to 'x': ").
inline void write_file_atomically(const std::string& path,
                                  const std::vector<std::pair<const void*, size_t>>& pieces,
                                  const std::string& where) {
  detail::TempFile temp(path);
  struct stat old {};
  const bool replaces = ::stat(path.c_str(), &old) == 0 && S_ISREG(old.st_mode);
  detail::fill_temporary(temp, replaces ? (old.st_mode & 07777) : 0644, pieces, where);
  const int rename_rc = ::rename(temp.path().c_str(), path.c_str());
  const int rename_error = errno;
  TORCH_CHECK(rename_rc == 0, where, "cannot rename '", temp.path(), "' over it: ",
              detail::errno_str(rename_error));
  temp.commit();
  sync_folder(detail::folder_of(path));
}

/// Writes `pieces` to `path` as `write_file_atomically` does, but only if no file is called
/// `path` yet: returns false, writing nothing, when one is (or appears while writing: the file
/// is linked into place, which fails rather than replace, so that programs running side by
/// side never overwrite each other's files).
inline bool write_new_file_atomically(const std::string& path,
                                      const std::vector<std::pair<const void*, size_t>>& pieces,
                                      const std::string& where) {
  detail::TempFile temp(path);
  detail::fill_temporary(temp, 0644, pieces, where);
  if (::link(temp.path().c_str(), path.c_str()) != 0) {
    const int error = errno;
    if (error == EEXIST) return false;
    // File systems without hard links (FAT, some network ones): a check, then a rename, which
    // only a program writing the same name in between can race.
    const bool no_links = error == EPERM || error == EOPNOTSUPP || error == ENOTSUP || error == EMLINK ||
                          error == ENOSYS;
    TORCH_CHECK(no_links, where, "cannot link '", temp.path(), "' into place: ", detail::errno_str(error));
    if (std::filesystem::exists(path)) return false;
    const int rename_rc = ::rename(temp.path().c_str(), path.c_str());
    const int rename_error = errno;
    TORCH_CHECK(rename_rc == 0, where, "cannot rename '", temp.path(), "' to it: ",
                detail::errno_str(rename_error));
    temp.commit();
  }
  // Linked: the temporary's name goes with `temp` (not committed), the file stays under `path`.
  sync_folder(detail::folder_of(path));
  return true;
}

/// Writes `text` to `path` atomically (see `write_file_atomically`).
inline void write_text_file(const std::string& path, const std::string& text) {
  write_file_atomically(path, {{text.data(), text.size()}}, "writing '" + path + "': ");
}

}  // namespace scedit
