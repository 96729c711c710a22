#pragma once
/// @file
/// Image I/O and the small geometric transforms of the example programs' data pipeline, on stb.
///
/// Images travel as `uint8 [H, W, 3]` tensors on the CPU (row-major, RGB, the layout stb reads and
/// writes); the models see `float [3, H, W]` in [-1, 1] (`to_float`, `to_uint8` convert).
///
/// **stb linkage.** This header compiles the stb implementations it uses (stb_image,
/// stb_image_write, stb_image_resize) into every translation unit that includes it, with internal
/// linkage (`STB_IMAGE_STATIC`, `STB_IMAGE_WRITE_STATIC`, `STB_IMAGE_RESIZE_STATIC`): several
/// translation units of one program can include it and still link, and nothing has to be defined
/// in exactly one `.cpp` file. The price is a few seconds of compile time per translation unit
/// and a private copy of the decoder in each. Include stb only through this header in a
/// translation unit that includes it: an earlier `#include <stb/stb_image.h>` (without the
/// static macros) would make the implementation external again; the header refuses that case.

#include <scedit/atomic_file.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(STBI_INCLUDE_STB_IMAGE_H) && !defined(COMMON_IMAGE_STB_INCLUDED)
#error "<stb/stb_image.h> was included before <common/image.hpp>: include stb only through common/image.hpp"
#endif
#if defined(INCLUDE_STB_IMAGE_WRITE_H) && !defined(COMMON_IMAGE_STB_INCLUDED)
#error "<stb/stb_image_write.h> was included before <common/image.hpp>: include stb only through common/image.hpp"
#endif
#if defined(STBIR_INCLUDE_STB_IMAGE_RESIZE_H) && !defined(COMMON_IMAGE_STB_INCLUDED)
#error "<stb/stb_image_resize.h> was included before <common/image.hpp>: include stb only through common/image.hpp"
#endif

#ifndef COMMON_IMAGE_STB_INCLUDED
#define COMMON_IMAGE_STB_INCLUDED
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wtype-limits"
#pragma GCC diagnostic ignored "-Wshadow"
#endif
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define STB_IMAGE_RESIZE_STATIC
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#include <stb/stb_image_resize.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#endif  // COMMON_IMAGE_STB_INCLUDED

namespace common {

// ---- files -----------------------------------------------------------------------------------

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

/// A CPU random generator seeded with `seed`, for the random transforms (`random_crop`, the
/// dataset's crop / flip / caption dropout): they draw on the CPU, so they need a CPU generator.
inline torch::Generator make_cpu_generator(uint64_t seed) {
  return at::detail::createCPUGenerator(seed);
}

// ---- decode / convert ------------------------------------------------------------------------

/// Decodes an encoded image (PNG, JPEG, and the other formats stb_image reads) to uint8 [H, W, 3].
/// Grey becomes RGB by replication; an alpha channel is dropped (as PIL's `convert("RGB")` does).
/// `name` names the source in the error message.
inline torch::Tensor decode_image(const std::string& bytes, const std::string& name) {
  TORCH_CHECK(!bytes.empty(), "cannot decode '", name, "': the file is empty");
  int width = 0, height = 0, channels = 0;
  stbi_uc* pixels =
      stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()),
                            static_cast<int>(bytes.size()), &width, &height, &channels, 3);
  TORCH_CHECK(pixels != nullptr, "cannot decode '", name, "' as an image (stb_image: ",
              stbi_failure_reason(), ")");
  auto image = torch::from_blob(pixels, {height, width, 3}, torch::kUInt8).clone();
  stbi_image_free(pixels);
  return image;  // [H, W, 3] uint8
}

/// Reads an image file as uint8 [H, W, 3] (grey and RGBA are converted to RGB). Throws naming the
/// file when it is missing, unreadable or not a decodable image.
inline torch::Tensor read_image(const std::string& path) {
  return decode_image(read_file_bytes(path), path);
}

/// uint8 [H, W, C] (or a batch [B, H, W, C]) -> float [C, H, W] ([B, C, H, W]) in [-1, 1]:
/// `v / 127.5 - 1`.
inline torch::Tensor to_float(const torch::Tensor& image) {
  TORCH_CHECK(image.scalar_type() == torch::kUInt8, "to_float: expected a uint8 image, got ",
              image.scalar_type());
  TORCH_CHECK(image.dim() == 3 || image.dim() == 4,
              "to_float: expected [H, W, C] or [B, H, W, C], got shape ", image.sizes());
  auto chw = image.dim() == 3 ? image.permute({2, 0, 1})      // [H, W, C] -> [C, H, W]
                              : image.permute({0, 3, 1, 2});  // [B, H, W, C] -> [B, C, H, W]
  return chw.to(torch::kFloat32).div(127.5).sub(1.0).contiguous();
}

/// float [C, H, W] (or [B, C, H, W]) in [-1, 1], any floating dtype and device -> uint8
/// [H, W, C] ([B, H, W, C]) on the CPU: values are clamped to [-1, 1], then
/// `round((v + 1) * 127.5)`. Exactly inverts `to_float`.
inline torch::Tensor to_uint8(const torch::Tensor& image) {
  TORCH_CHECK(image.is_floating_point(), "to_uint8: expected a floating-point image, got ",
              image.scalar_type());
  TORCH_CHECK(image.dim() == 3 || image.dim() == 4,
              "to_uint8: expected [C, H, W] or [B, C, H, W], got shape ", image.sizes());
  auto values = image.detach().to(torch::kCPU, torch::kFloat32).clamp(-1.0, 1.0).add(1.0)
                    .mul(127.5).round().to(torch::kUInt8);
  auto hwc = image.dim() == 3 ? values.permute({1, 2, 0})      // [C, H, W] -> [H, W, C]
                              : values.permute({0, 2, 3, 1});  // [B, C, H, W] -> [B, H, W, C]
  return hwc.contiguous();
}

// ---- geometry --------------------------------------------------------------------------------

namespace detail {
inline void check_hwc(const torch::Tensor& image, const char* what) {
  TORCH_CHECK(image.dim() == 3, what, ": expected an image [H, W, C], got shape ", image.sizes());
}
}  // namespace detail

/// Resizes uint8 [H, W, C] (C = 1..4) to [height, width, C] with stb_image_resize's default
/// filters: Mitchell when shrinking (the kernel widens with the scale, so downscaling is
/// antialiased) and Catmull-Rom when enlarging, clamped edges, values treated as linear.
inline torch::Tensor resize(const torch::Tensor& image, int64_t height, int64_t width) {
  detail::check_hwc(image, "resize");
  TORCH_CHECK(image.scalar_type() == torch::kUInt8, "resize: expected a uint8 image, got ",
              image.scalar_type());
  TORCH_CHECK(height > 0 && width > 0, "resize: target size must be positive, got ", height,
              "x", width);
  const int64_t channels = image.size(2);
  TORCH_CHECK(channels >= 1 && channels <= 4, "resize: expected 1 to 4 channels, got ", channels);
  TORCH_CHECK(image.size(0) > 0 && image.size(1) > 0, "resize: empty image, shape ",
              image.sizes());
  if (image.size(0) == height && image.size(1) == width) return image.contiguous();
  auto input = image.to(torch::kCPU).contiguous();
  auto output = torch::empty({height, width, channels}, torch::kUInt8);
  const int ok = stbir_resize_uint8(input.data_ptr<uint8_t>(), static_cast<int>(input.size(1)),
                                    static_cast<int>(input.size(0)), 0,
                                    output.data_ptr<uint8_t>(), static_cast<int>(width),
                                    static_cast<int>(height), 0, static_cast<int>(channels));
  TORCH_CHECK(ok == 1, "resize: stb_image_resize failed resizing ", image.sizes(), " to ",
              height, "x", width);
  return output;
}

/// Resizes uint8 [H, W, C] so that its shorter side becomes `size`, keeping the aspect ratio: the
/// longer side becomes `floor(size * long / short)` (torchvision's `Resize(size)` rule).
/// Antialiased on downscale (see `resize`). Returns the input itself when already that size.
inline torch::Tensor resize_short_side(const torch::Tensor& image, int64_t size) {
  detail::check_hwc(image, "resize_short_side");
  TORCH_CHECK(size > 0, "resize_short_side: size must be positive, got ", size);
  const int64_t h = image.size(0), w = image.size(1);
  TORCH_CHECK(h > 0 && w > 0, "resize_short_side: empty image, shape ", image.sizes());
  if (std::min(h, w) == size) return image;
  const int64_t new_h = h <= w ? size : (size * h) / w;
  const int64_t new_w = h <= w ? (size * w) / h : size;
  return resize(image, new_h, new_w);
}

/// A crop window: rows [top, top + height), columns [left, left + width).
struct CropBox {
  int64_t top = 0;     ///< first row
  int64_t left = 0;    ///< first column
  int64_t height = 0;  ///< number of rows
  int64_t width = 0;   ///< number of columns
};

/// The centred `height` x `width` window of an `image_height` x `image_width` image (offsets
/// rounded down). Throws when the window does not fit.
inline CropBox center_crop_box(int64_t image_height, int64_t image_width, int64_t height,
                               int64_t width) {
  TORCH_CHECK(height > 0 && width > 0 && height <= image_height && width <= image_width,
              "crop: a ", height, "x", width, " window does not fit a ", image_height, "x",
              image_width, " image");
  return CropBox{(image_height - height) / 2, (image_width - width) / 2, height, width};
}

/// A uniformly random `height` x `width` window of an `image_height` x `image_width` image, drawn
/// from `generator` (a CPU generator; two draws: top, then left). Pass the same box to `crop` to
/// cut an image and its condition image identically.
inline CropBox random_crop_box(int64_t image_height, int64_t image_width, int64_t height,
                               int64_t width, torch::Generator generator) {
  auto box = center_crop_box(image_height, image_width, height, width);  // checks the fit
  box.top = torch::randint(0, image_height - height + 1, {1}, generator, torch::kLong)
                .item<int64_t>();
  box.left = torch::randint(0, image_width - width + 1, {1}, generator, torch::kLong)
                 .item<int64_t>();
  return box;
}

/// Cuts `box` out of an image [H, W, C] (any dtype): [H, W, C] -> [box.height, box.width, C].
inline torch::Tensor crop(const torch::Tensor& image, const CropBox& box) {
  detail::check_hwc(image, "crop");
  TORCH_CHECK(box.top >= 0 && box.left >= 0 && box.height > 0 && box.width > 0 &&
                  box.top + box.height <= image.size(0) && box.left + box.width <= image.size(1),
              "crop: window (top ", box.top, ", left ", box.left, ", ", box.height, "x",
              box.width, ") outside an image of shape ", image.sizes());
  return image.narrow(0, box.top, box.height).narrow(1, box.left, box.width).contiguous();
}

/// The centred `height` x `width` crop of an image [H, W, C].
inline torch::Tensor center_crop(const torch::Tensor& image, int64_t height, int64_t width) {
  detail::check_hwc(image, "center_crop");
  return crop(image, center_crop_box(image.size(0), image.size(1), height, width));
}

/// A uniformly random `height` x `width` crop of an image [H, W, C], drawn from `generator` (a
/// CPU generator; the handle shares its state with the caller's copy).
inline torch::Tensor random_crop(const torch::Tensor& image, int64_t height, int64_t width,
                                 torch::Generator generator) {
  detail::check_hwc(image, "random_crop");
  return crop(image,
              random_crop_box(image.size(0), image.size(1), height, width, std::move(generator)));
}

/// Mirrors an image [H, W, C] left to right.
inline torch::Tensor hflip(const torch::Tensor& image) {
  detail::check_hwc(image, "hflip");
  return image.flip({1}).contiguous();
}

/// Tiles equally sized images [H, W, C] into one image, row by row, `columns` per row, with
/// `padding` pixels of `pad_value` between the cells and around them:
/// -> [rows * (H + padding) + padding, columns * (W + padding) + padding, C]. Empty cells of the
/// last row are filled with `pad_value`.
inline torch::Tensor make_grid(const std::vector<torch::Tensor>& images, int64_t columns,
                               int64_t padding = 0, int64_t pad_value = 0) {
  TORCH_CHECK(!images.empty(), "make_grid: no images");
  TORCH_CHECK(columns > 0, "make_grid: columns must be positive, got ", columns);
  TORCH_CHECK(padding >= 0, "make_grid: padding must be >= 0, got ", padding);
  const auto& first = images.front();
  detail::check_hwc(first, "make_grid");
  for (size_t i = 0; i < images.size(); ++i) {
    TORCH_CHECK(images[i].sizes() == first.sizes() &&
                    images[i].scalar_type() == first.scalar_type(),
                "make_grid: image ", i, " has shape ", images[i].sizes(), " and dtype ",
                images[i].scalar_type(), ", image 0 has ", first.sizes(), " and ",
                first.scalar_type());
  }
  const int64_t n = static_cast<int64_t>(images.size());
  const int64_t cols = std::min(columns, n);
  const int64_t rows = (n + cols - 1) / cols;
  const int64_t h = first.size(0), w = first.size(1), c = first.size(2);
  auto grid = torch::full({rows * (h + padding) + padding, cols * (w + padding) + padding, c},
                          pad_value, first.options().device(torch::kCPU));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t top = padding + (i / cols) * (h + padding);
    const int64_t left = padding + (i % cols) * (w + padding);
    grid.narrow(0, top, h).narrow(1, left, w).copy_(images[static_cast<size_t>(i)]);
  }
  return grid;
}

// ---- PNG with text chunks --------------------------------------------------------------------

/// CRC-32 (ISO-HDLC / zlib / PNG: polynomial 0xEDB88320 reflected, initial and final XOR
/// 0xFFFFFFFF) of `size` bytes, continuing from `crc` (0 to start).
inline uint32_t crc32(const void* data, size_t size, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  const auto* bytes = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ bytes[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

namespace detail {

inline void put_u32_be(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>((v >> 24) & 0xFF));
  out.push_back(static_cast<char>((v >> 16) & 0xFF));
  out.push_back(static_cast<char>((v >> 8) & 0xFF));
  out.push_back(static_cast<char>(v & 0xFF));
}

inline uint32_t get_u32_be(const std::string& in, size_t at) {
  const auto* b = reinterpret_cast<const unsigned char*>(in.data()) + at;
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
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

inline const std::string& png_signature() {
  static const std::string signature("\x89PNG\r\n\x1a\n", 8);
  return signature;
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
  size_t at = 8;
  while (at + 12 <= png.size()) {
    const uint32_t length = detail::get_u32_be(png, at);
    TORCH_CHECK(at + 12 + uint64_t{length} <= png.size(), "'", path, "': chunk at byte ", at,
                " runs past the end of the file");
    const std::string type = png.substr(at + 4, 4);
    const std::string data = png.substr(at + 8, length);
    const uint32_t stored = detail::get_u32_be(png, at + 8 + length);
    TORCH_CHECK(stored == crc32(png.data() + at + 4, 4 + size_t{length}), "'", path,
                "': CRC mismatch in the ", type, " chunk at byte ", at);
    at += 12 + length;
    if (type == "IEND") break;
    const size_t nul = data.find('\0');
    if ((type != "tEXt" && type != "iTXt" && type != "zTXt") || nul == std::string::npos) continue;
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
  }
  return texts;
}

}  // namespace common
