#pragma once
/// @file png.hpp
/// @brief PNG files with text chunks: the images the programs write carry their settings (prompt,
/// seed, ...) as `tEXt` / `iTXt` chunks, which other Stable Diffusion tools read, and a test
/// reads them back. Pixels are compressed by stb_image_write, text chunks are added here.

#include <common/files.hpp>
#include <common/image.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace common {

// ---- PNG with text chunks --------------------------------------------------------------------

namespace detail {

inline void put_u32_be(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>((v >> 24) & 0xFF));
  out.push_back(static_cast<char>((v >> 16) & 0xFF));
  out.push_back(static_cast<char>((v >> 8) & 0xFF));
  out.push_back(static_cast<char>(v & 0xFF));
}

/// One PNG chunk: length, type, data, CRC-32 over type + data.
inline std::string png_chunk(const std::string& type, const std::string& data) {
  std::string chunk;
  put_u32_be(chunk, static_cast<uint32_t>(data.size()));
  const std::string body = type + data;
  chunk += body;
  put_u32_be(chunk, crc32(body.data(), body.size()));
  return chunk;
}

/// A tEXt chunk (Latin-1 text) when the text is ASCII, else an uncompressed iTXt chunk (UTF-8).
inline std::string png_text_chunk(const std::string& key, const std::string& value) {
  TORCH_CHECK(!key.empty() && key.size() <= 79,
              "write_png: a text keyword must have 1 to 79 characters, got '", key, "'");
  for (unsigned char ch : key) {
    TORCH_CHECK(ch >= 32 && ch <= 126, "write_png: text keyword '", key,
                "' must be printable ASCII");
  }
  bool ascii = true;
  for (unsigned char ch : value) {
    TORCH_CHECK(ch != 0, "write_png: the text of keyword '", key, "' contains a NUL byte");
    if (ch >= 128) ascii = false;
  }
  if (ascii) return png_chunk("tEXt", key + std::string(1, '\0') + value);
  // keyword \0, compression flag 0, method 0, language tag "" \0, translated keyword "" \0, text
  return png_chunk("iTXt", key + std::string("\0\0\0\0\0", 5) + value);
}

}  // namespace detail

/// Encodes uint8 [H, W, C] (C = 1, 3 or 4; or grey [H, W]) as PNG bytes with stb_image_write, then
/// inserts one text chunk per key/value before IEND: `tEXt` for ASCII text, uncompressed `iTXt`
/// (UTF-8) otherwise. Keywords: 1-79 printable ASCII characters.
inline std::string encode_png(
    const torch::Tensor& image,
    const std::vector<std::pair<std::string, std::string>>& text_chunks = {}) {
  TORCH_CHECK(image.scalar_type() == torch::kUInt8, "write_png: expected a uint8 image, got ",
              image.scalar_type());
  auto hwc = image.dim() == 2 ? image.unsqueeze(2) : image;
  TORCH_CHECK(hwc.dim() == 3 && (hwc.size(2) == 1 || hwc.size(2) == 3 || hwc.size(2) == 4),
              "write_png: expected [H, W, 1|3|4] or [H, W], got shape ", image.sizes());
  TORCH_CHECK(hwc.size(0) > 0 && hwc.size(1) > 0, "write_png: empty image, shape ",
              image.sizes());
  hwc = hwc.to(torch::kCPU).contiguous();
  std::string png;
  auto sink = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                               static_cast<size_t>(size));
  };
  const int w = static_cast<int>(hwc.size(1)), c = static_cast<int>(hwc.size(2));
  const int ok = stbi_write_png_to_func(sink, &png, w, static_cast<int>(hwc.size(0)), c,
                                        hwc.data_ptr<uint8_t>(), w * c);
  TORCH_CHECK(ok != 0 && png.size() > 8 + 12, "write_png: stb_image_write failed to encode ",
              image.sizes());
  if (text_chunks.empty()) return png;
  // Walk the chunks to find IEND (stb writes IHDR, IDAT, IEND) and insert the text before it.
  size_t at = 8;
  while (at + 12 <= png.size()) {
    const uint32_t length = detail::get_u32_be(png, at);
    if (png.compare(at + 4, 4, "IEND") == 0) break;
    at += 12 + length;
  }
  TORCH_CHECK(at + 12 <= png.size(), "write_png: no IEND chunk in the encoded PNG");
  std::string text;
  for (const auto& [key, value] : text_chunks) text += detail::png_text_chunk(key, value);
  png.insert(at, text);
  return png;
}

/// Writes uint8 [H, W, 3] (also 1 or 4 channels) to a PNG file with the given text chunks
/// (`tEXt` / `iTXt`, e.g. {"prompt", "..."}, {"seed", "42"}), atomically (temp file + rename).
/// Throws naming the file on failure.
inline void write_png(const std::string& path, const torch::Tensor& image,
                      std::vector<std::pair<std::string, std::string>> text_chunks = {}) {
  std::string png;
  try {
    png = encode_png(image, text_chunks);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "writing '", path, "': ", error.what_without_backtrace());
  }
  write_file_atomic(path, png);
}

/// The text chunks of a PNG file in file order: `tEXt`, `iTXt` (compressed or not) and `zTXt`,
/// as key/value pairs. Throws naming the file when it is not a PNG or a chunk is corrupt.
inline std::vector<std::pair<std::string, std::string>> read_png_text(const std::string& path) {
  const std::string png = read_file_bytes(path);
  TORCH_CHECK(png.size() >= 8 && png.compare(0, 8, detail::png_signature()) == 0, "'", path,
              "' is not a PNG file (bad signature)");
  auto inflate = [&](const std::string& data, const std::string& key) {
    int size = 0;
    char* out = stbi_zlib_decode_malloc(data.data(), static_cast<int>(data.size()), &size);
    TORCH_CHECK(out != nullptr, "'", path, "': cannot inflate the compressed text of keyword '",
                key, "'");
    std::string text(out, static_cast<size_t>(size));
    STBI_FREE(out);
    return text;
  };
  std::vector<std::pair<std::string, std::string>> texts;
  for_each_png_chunk(png, "'" + path + "'", [&](const std::string& type, std::string_view chunk) {
    const std::string data(chunk);
    const size_t nul = data.find('\0');
    if ((type != "tEXt" && type != "iTXt" && type != "zTXt") || nul == std::string::npos) return;
    const std::string key = data.substr(0, nul);
    if (type == "tEXt") {
      texts.emplace_back(key, data.substr(nul + 1));
    } else if (type == "zTXt") {
      TORCH_CHECK(nul + 2 <= data.size(), "'", path, "': truncated zTXt chunk '", key, "'");
      texts.emplace_back(key, inflate(data.substr(nul + 2), key));
    } else {  // iTXt: flag, method, language \0, translated keyword \0, text
      TORCH_CHECK(nul + 3 <= data.size(), "'", path, "': truncated iTXt chunk '", key, "'");
      const bool compressed = data[nul + 1] != 0;
      const size_t language_end = data.find('\0', nul + 3);
      const size_t translated_end =
          language_end == std::string::npos ? language_end : data.find('\0', language_end + 1);
      TORCH_CHECK(translated_end != std::string::npos, "'", path, "': malformed iTXt chunk '",
                  key, "'");
      const std::string text = data.substr(translated_end + 1);
      texts.emplace_back(key, compressed ? inflate(text, key) : text);
    }
  });
  return texts;
}

}  // namespace common
