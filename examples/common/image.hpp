#pragma once
/// @file
/// Image decoding and the small geometric transforms of the example programs' data pipeline, on
/// stb (PNG writing: png.hpp).
///
/// Images travel as `uint8 [H, W, 3]` tensors on the CPU (row-major, RGB, the layout stb reads and
/// writes); the models see `float [3, H, W]` in [-1, 1] (`sd::to_float`, `sd::to_uint8` convert).
///
/// **stb linkage.** This header compiles the stb implementations it uses (stb_image,
/// stb_image_write, stb_image_resize) into every translation unit that includes it, with internal
/// linkage (`STB_IMAGE_STATIC`, `STB_IMAGE_WRITE_STATIC`, `STB_IMAGE_RESIZE_STATIC`): several
/// translation units of one program can include it and still link, and nothing has to be defined
/// in exactly one `.cpp` file. The price is a few seconds of compile time per translation unit
/// and a private copy of the decoder in each. Include stb only through this header in a
/// translation unit that includes it: an earlier `#include <stb/stb_image.h>` (without the
/// static macros) would make the implementation external again; the header refuses that case.

#include <common/files.hpp>
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
#include <string_view>
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

/// A CPU random generator seeded with `seed`, for the random transforms (`random_crop`, the
/// dataset's crops and flips): they draw on the CPU, so they need a CPU generator.
inline torch::Generator make_cpu_generator(uint64_t seed) {
  return at::detail::createCPUGenerator(seed);
}

// ---- PNG chunks ----------------------------------------------------------------------------

namespace detail {

inline uint32_t get_u32_be(std::string_view in, size_t at) {
  const auto* b = reinterpret_cast<const unsigned char*>(in.data()) + at;
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

inline const std::string& png_signature() {
  static const std::string signature("\x89PNG\r\n\x1a\n", 8);
  return signature;
}

}  // namespace detail

/// Calls `visit(type, data)` for each chunk of the PNG `png` (signature included) up to IEND,
/// after checking that the chunk lies inside the file and that its CRC-32 matches. Throws
/// naming `what` ("'x.png'"), the chunk and its offset otherwise: stb_image ignores the CRCs,
/// so without this a corrupt file decodes to whatever its damaged bytes say.
inline void for_each_png_chunk(
    std::string_view png, const std::string& what,
    const std::function<void(const std::string& type, std::string_view data)>& visit = {}) {
  size_t at = detail::png_signature().size();
  bool ended = false;
  while (at + 12 <= png.size()) {
    const uint32_t length = detail::get_u32_be(png, at);
    TORCH_CHECK(at + 12 + uint64_t{length} <= png.size(), what, ": chunk at byte ", at,
                " runs past the end of the file");
    const std::string type(png.substr(at + 4, 4));
    const uint32_t stored = detail::get_u32_be(png, at + 8 + length);
    TORCH_CHECK(stored == crc32(png.data() + at + 4, 4 + size_t{length}), what,
                ": CRC mismatch in the ", type, " chunk at byte ", at, " (the file is damaged)");
    if (visit) visit(type, png.substr(at + 8, length));
    at += 12 + length;
    if (type == "IEND") {
      ended = true;
      break;
    }
  }
  TORCH_CHECK(ended, what, ": the file ends at byte ", png.size(), " before its IEND chunk (it is cut short)");
}

// ---- decode ------------------------------------------------------------------------------

/// stb_image's decode of `bytes` to uint8 [H, W, components], with the file's own channel count
/// in `channels` when given; a PNG's chunk CRCs are checked first (`for_each_png_chunk`). `what`
/// names the source in the error messages ("'x.png'").
inline torch::Tensor decode_pixels(const std::string& bytes, const std::string& what, int components,
                                   int* channels = nullptr) {
  TORCH_CHECK(!bytes.empty(), "cannot decode ", what, ": the file is empty");
  if (bytes.compare(0, detail::png_signature().size(), detail::png_signature()) == 0) {
    for_each_png_chunk(bytes, "cannot decode " + what);
  }
  int width = 0, height = 0, found = 0;
  stbi_uc* pixels =
      stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()),
                            static_cast<int>(bytes.size()), &width, &height, &found, components);
  const char* reason = pixels == nullptr ? stbi_failure_reason() : nullptr;
  TORCH_CHECK(pixels != nullptr, "cannot decode ", what, " as an image (stb_image: ",
              reason != nullptr && *reason != '\0' ? reason : "no reason given; is the file cut short?", ")");
  auto image = torch::from_blob(pixels, {height, width, components}, torch::kUInt8).clone();
  stbi_image_free(pixels);
  if (channels != nullptr) *channels = found;
  return image;
}

/// Decodes an encoded image (PNG, JPEG, and the other formats stb_image reads) to uint8 [H, W, 3].
/// Grey becomes RGB by replication; an alpha channel is dropped (as PIL's `convert("RGB")` does).
/// `name` names the source in the error message.
inline torch::Tensor decode_image(const std::string& bytes, const std::string& name) {
  return decode_pixels(bytes, "'" + name + "'", 3);
}

/// Reads an image file as uint8 [H, W, 3] (grey and RGBA are converted to RGB). Throws naming the
/// file when it is missing, unreadable or not a decodable image.
inline torch::Tensor read_image(const std::string& path) {
  return decode_image(read_file_bytes(path), path);
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

/// The size (height, width) an h x w image has once `resize_short_side` brings its short side
/// to `size` (the long side scaled in proportion, rounded down).
inline std::pair<int64_t, int64_t> short_side_size(int64_t h, int64_t w, int64_t size) {
  if (std::min(h, w) == size) return {h, w};
  return h <= w ? std::make_pair(size, (size * w) / h) : std::make_pair((size * h) / w, size);
}

/// Resizes uint8 [H, W, C] so that its shorter side becomes `size`, keeping the aspect ratio: the
/// longer side becomes `floor(size * long / short)` (torchvision's `Resize(size)` rule).
/// Antialiased on downscale (see `resize`). Returns the input itself when already that size.
inline torch::Tensor resize_short_side(const torch::Tensor& image, int64_t size) {
  detail::check_hwc(image, "resize_short_side");
  TORCH_CHECK(size > 0, "resize_short_side: size must be positive, got ", size);
  const int64_t h = image.size(0), w = image.size(1);
  TORCH_CHECK(h > 0 && w > 0, "resize_short_side: empty image, shape ", image.sizes());
  const auto [new_h, new_w] = short_side_size(h, w, size);
  return new_h == h && new_w == w ? image : resize(image, new_h, new_w);
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

}  // namespace common
