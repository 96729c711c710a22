#pragma once
/// @file files.hpp
/// @brief Whole files as bytes: reading one with an error that names it, and writing one
/// atomically, so that a reader (or a crash) never sees half of it.

#include <scedit/atomic_file.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

namespace common {

/// The whole content of a file as bytes; throws naming the file when it is missing or unreadable.
inline std::string read_file_bytes(const std::filesystem::path& path) {
  std::error_code error;
  TORCH_CHECK(std::filesystem::is_regular_file(path, error), "no such file: '", path.string(), "'");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "cannot open '", path.string(), "' for reading");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TORCH_CHECK(!in.bad(), "error while reading '", path.string(), "'");
  return bytes;
}

/// Writes `bytes` to `path` atomically: into a temporary file beside it, then renamed over `path`,
/// so a reader (or a crash) never sees a half-written file. Throws naming the file on failure.
inline void write_file_atomic(const std::filesystem::path& path, const std::string& bytes) {
  scedit::write_file_atomically(path.string(), {{bytes.data(), bytes.size()}},
                                "writing '" + path.string() + "': ");
}

}  // namespace common
