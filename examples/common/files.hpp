#pragma once
/// @file files.hpp
/// @brief Whole files as bytes: reading one with an error that names it, writing one atomically,
/// so that a reader (or a crash) never sees half of it, and their CRC-32; an output folder made
/// and checked before the work that fills it.

#include <scedit/atomic_file.hpp>
#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

namespace common {

/// CRC-32 (ISO-HDLC / zlib / PNG: polynomial 0xEDB88320 reflected, initial and final XOR
/// 0xFFFFFFFF) of `size` bytes, continuing from `crc` (0 to start). Eight bytes a round
/// ("slicing by 8", on little-endian hosts), so that checking a checkpoint of gigabytes takes
/// seconds, not a minute.
inline uint32_t crc32(const void* data, size_t size, uint32_t crc = 0) {
  static const auto tables = [] {
    std::array<std::array<uint32_t, 256>, 8> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n) {
      for (size_t k = 1; k < 8; ++k) t[k][n] = (t[k - 1][n] >> 8) ^ t[0][t[k - 1][n] & 0xFFu];
    }
    return t;
  }();
  const auto& t = tables;
  const auto* bytes = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (; size >= 8; size -= 8, bytes += 8) {
    uint32_t low, high;
    std::memcpy(&low, bytes, 4);
    std::memcpy(&high, bytes + 4, 4);
    low ^= crc;
    crc = t[7][low & 0xFFu] ^ t[6][(low >> 8) & 0xFFu] ^ t[5][(low >> 16) & 0xFFu] ^ t[4][low >> 24] ^
          t[3][high & 0xFFu] ^ t[2][(high >> 8) & 0xFFu] ^ t[1][(high >> 16) & 0xFFu] ^ t[0][high >> 24];
  }
  for (; size > 0; --size, ++bytes) crc = t[0][(crc ^ *bytes) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

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

/// The length of the UTF-8 byte-order mark that `text` starts with (3), or 0: editors put one at
/// the start of CSV and JSONL files, and it is no part of the first field.
inline size_t utf8_bom_size(const std::string& text) {
  return text.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;
}

/// Writes `bytes` to `path` atomically: into a temporary file beside it, then renamed over `path`,
/// so a reader (or a crash) never sees a half-written file. Throws naming the file on failure.
inline void write_file_atomic(const std::filesystem::path& path, const std::string& bytes) {
  scedit::write_file_atomically(path.string(), {{bytes.data(), bytes.size()}},
                                "writing '" + path.string() + "': ");
}

/// `write_file_atomic`, but only where no file is called `path` yet: false, and nothing written,
/// where one is (another program's output, say, written at the same moment).
inline bool write_new_file_atomic(const std::filesystem::path& path, const std::string& bytes) {
  return scedit::write_new_file_atomically(path.string(), {{bytes.data(), bytes.size()}},
                                           "writing '" + path.string() + "': ");
}

/// Creates `folder` (and its parents) and checks that files can be made in it, so that a program
/// learns before its long work, not after, that it could not keep the results; throws naming
/// `flag` and the folder.
inline void prepare_output_folder(const std::filesystem::path& folder, const std::string& flag) {
  std::error_code error;
  std::filesystem::create_directories(folder, error);
  TORCH_CHECK(!error, flag, " '", folder.string(), "': cannot create the folder: ", error.message());
  TORCH_CHECK(std::filesystem::is_directory(folder), flag, " '", folder.string(), "' is not a folder");
  scedit::detail::TempFile probe((folder / ".write-probe").string());  // removed again at once
  TORCH_CHECK(probe.fd() >= 0, flag, " '", folder.string(), "': cannot create files in it: ",
              scedit::detail::errno_str(probe.error()));
}

}  // namespace common
