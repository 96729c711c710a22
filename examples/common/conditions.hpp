#pragma once
/// @file conditions.hpp
/// @brief Condition images for controllable generation (CSC-Tuners): what a condition is made of
/// (`ConditionKind`, parsed from `--condition`), the builders that compute one from an image
/// (Canny edges, colour maps, inpainting's masked image), the reading of a user's own map
/// (depth, segmentation, pose, scribble, ...) and of masks, and the conversion to the range a
/// CSC-Tuner reads (float [3, H, W] in [0, 1]).
///
/// Images travel as uint8 [H, W, 3] RGB (image.hpp's layout); every builder returns that layout
/// and the image's size, so a condition lines up with its image pixel for pixel. Nothing here
/// resizes a condition silently: a map of another size is refused, naming the file.
///
/// The Canny builder is OpenCV's own `cv::Canny`, so that its edges are the ones the reference
/// annotators (ControlNet's, scepter's) give; it is compiled where the build found OpenCV
/// (`SCEDIT_WITH_OPENCV`, CMake; Debian: libopencv-imgproc-dev) and refuses to run elsewhere.

#include <common/image.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(SCEDIT_WITH_OPENCV) && SCEDIT_WITH_OPENCV
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#endif

namespace common {

// ---- kinds -----------------------------------------------------------------------------------

/// What a condition image is made of.
enum class ConditionKind {
  canny,    ///< Canny edges of the image (`canny`)
  colour,   ///< its coarse colours (`colour_map`)
  inpaint,  ///< the image with a masked region blanked out (`inpaint_condition`)
  file      ///< a map the user supplies as an image file (`read_condition`)
};

/// The name of a kind: "canny", "colour", "inpaint" or "file".
inline std::string to_string(ConditionKind kind) {
  switch (kind) {
    case ConditionKind::canny: return "canny";
    case ConditionKind::colour: return "colour";
    case ConditionKind::inpaint: return "inpaint";
    case ConditionKind::file: return "file";
  }
  return "?";
}

/// Parses `--condition`: "canny", "colour" or "inpaint" (the kinds computed from the image; a
/// map from files is given by its folder, not by this flag). Throws naming the choices.
inline ConditionKind parse_condition_kind(const std::string& name) {
  if (name == "canny") return ConditionKind::canny;
  if (name == "colour") return ConditionKind::colour;
  if (name == "inpaint") return ConditionKind::inpaint;
  TORCH_CHECK(false, "--condition: '", name, "' is not canny, colour or inpaint");
  return ConditionKind::file;  // unreachable
}

namespace detail {
inline void check_rgb(const torch::Tensor& image, const char* what) {
  TORCH_CHECK(image.dim() == 3 && image.size(2) == 3 && image.scalar_type() == torch::kUInt8,
              what, ": expected a uint8 RGB image [H, W, 3], got ", image.scalar_type(), " ",
              image.sizes());
  TORCH_CHECK(image.size(0) > 0 && image.size(1) > 0, what, ": empty image ", image.sizes());
}
}  // namespace detail

// ---- Canny -----------------------------------------------------------------------------------

/// Whether this build has the Canny builder (it was built with OpenCV).
constexpr bool canny_available() {
#if defined(SCEDIT_WITH_OPENCV) && SCEDIT_WITH_OPENCV
  return true;
#else
  return false;
#endif
}

/// Throws, saying which package to install, when this build has no Canny builder; a program
/// calls it while checking its flags, before anything expensive.
inline void require_canny() {
  TORCH_CHECK(canny_available(),
              "the canny condition needs OpenCV, and this build has none: install OpenCV's "
              "imgproc module (Debian: apt-get install libopencv-imgproc-dev), then configure "
              "and build again");
}

/// Canny edges of uint8 [H, W, 3] RGB -> uint8 [H, W, 3], 255 on edges and 0 elsewhere, the
/// three channels equal. Exactly OpenCV's `cv::Canny(image, edges, 100, 200)` on the
/// three-channel image (aperture 3, L1 gradient; per pixel the channel with the strongest
/// gradient), as the reference annotators call it. Throws without OpenCV (`require_canny`).
inline torch::Tensor canny(const torch::Tensor& image) {
  detail::check_rgb(image, "canny");
  require_canny();
#if defined(SCEDIT_WITH_OPENCV) && SCEDIT_WITH_OPENCV
  auto input = image.to(torch::kCPU).contiguous();
  const cv::Mat rgb(static_cast<int>(input.size(0)), static_cast<int>(input.size(1)), CV_8UC3,
                    input.data_ptr<uint8_t>());
  cv::Mat edges;  // CV_8UC1, continuous
  cv::Canny(rgb, edges, /*threshold1=*/100, /*threshold2=*/200);
  auto grey = torch::from_blob(edges.data, {input.size(0), input.size(1), 1}, torch::kUInt8);
  return grey.expand({-1, -1, 3}).contiguous();  // [H, W, 1] -> [H, W, 3], copied out of OpenCV
#else
  return torch::Tensor();  // unreachable: require_canny threw
#endif
}

// ---- colour map ------------------------------------------------------------------------------

/// The coarse colours of uint8 [H, W, 3] RGB -> uint8 [H, W, 3]: bicubic downscale to
/// max(1, W/64) x max(1, H/64) (align_corners false, no antialiasing), then nearest-neighbour
/// upscale back to W x H, clamped and rounded: a grid of flat 64 x 64 blocks, the layout of the
/// colours without their detail (T2I-Adapter's colour annotator's recipe, on LibTorch's
/// interpolation).
inline torch::Tensor colour_map(const torch::Tensor& image) {
  detail::check_rgb(image, "colour_map");
  namespace F = torch::nn::functional;
  const int64_t h = image.size(0), w = image.size(1);
  const auto x = image.to(torch::kCPU).permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32);
  const auto small = F::interpolate(  // [1, 3, H, W] -> [1, 3, H/64, W/64]
      x, F::InterpolateFuncOptions()
             .size(std::vector<int64_t>{std::max<int64_t>(1, h / 64), std::max<int64_t>(1, w / 64)})
             .mode(torch::kBicubic)
             .align_corners(false));
  const auto big = F::interpolate(  // -> [1, 3, H, W]
      small, F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kNearest));
  return big.clamp(0, 255).round().to(torch::kUInt8).squeeze(0).permute({1, 2, 0}).contiguous();
}

// ---- inpainting ------------------------------------------------------------------------------

/// The value an inpainting condition holds where the image is masked: mid-grey, the middle of
/// the range, so that the blank reads as "unknown" rather than as black or white content.
constexpr uint8_t kInpaintFill = 127;

/// An inpainting condition and the mask it was made with.
struct InpaintCondition {
  torch::Tensor image;  ///< uint8 [H, W, 3]: the image, `kInpaintFill` where masked
  torch::Tensor mask;   ///< uint8 [H, W]: 255 where masked, 0 elsewhere
};

/// A mask as uint8 [H, W] with 255 where masked and 0 elsewhere, from uint8 [H, W] or
/// [H, W, 1 or 3]: a pixel is masked where its value (its largest channel) is at least 128, so an
/// antialiased or JPEG-compressed mask still reads as the mask drawn.
inline torch::Tensor binary_mask(const torch::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == torch::kUInt8 &&
                  (mask.dim() == 2 || (mask.dim() == 3 && (mask.size(2) == 1 || mask.size(2) == 3))),
              "mask: expected uint8 [H, W] or [H, W, 1 or 3] (255 = masked), got ",
              mask.scalar_type(), " ", mask.sizes());
  const auto values = mask.dim() == 3 ? std::get<0>(mask.max(2)) : mask;  // [H, W]
  return (values >= 128).to(torch::kUInt8).mul(255).contiguous();
}

/// The inpainting condition of uint8 [H, W, 3] RGB under `mask` (see `binary_mask`; the image's
/// height and width): the image with every masked pixel set to `kInpaintFill` in all channels,
/// and the binary mask.
inline InpaintCondition inpaint_condition(const torch::Tensor& image, const torch::Tensor& mask) {
  detail::check_rgb(image, "inpaint_condition");
  const auto binary = binary_mask(mask);
  TORCH_CHECK(binary.size(0) == image.size(0) && binary.size(1) == image.size(1),
              "inpaint_condition: the mask is ", binary.size(1), "x", binary.size(0),
              ", the image ", image.size(1), "x", image.size(0), ": they must line up");
  const auto masked = (binary > 0).unsqueeze(2);  // [H, W] -> [H, W, 1], broadcast over RGB
  return {image.masked_fill(masked, static_cast<int64_t>(kInpaintFill)).contiguous(), binary};
}

/// Reads a mask from an image file (white = masked; see `binary_mask`) for an image of `height`
/// x `width`. Refused, naming the file, when unreadable or of another size: a mask is never
/// resized, so that it lines up with the image exactly.
inline torch::Tensor read_mask(const std::filesystem::path& path, int64_t height, int64_t width) {
  const auto pixels = read_image(path.string());  // [h, w, 3]
  TORCH_CHECK(pixels.size(0) == height && pixels.size(1) == width, "mask '", path.string(),
              "' is ", pixels.size(1), "x", pixels.size(0), ", its image ", width, "x", height,
              ": a mask must have the image's size (it is not resized)");
  return binary_mask(pixels);
}

/// A random inpainting mask uint8 [height, width] (255 = masked) for training: one or two
/// rectangles (15-45% of each side) and one to three brush strokes (polylines of 3-7 segments,
/// each 10-25% of the short side long, 4-10% of it wide, with round joints). Every draw comes
/// from `generator` (a CPU generator), so the mask is a pure function of its state; a mask
/// covers about a fifth of the image on average, never none of it.
inline torch::Tensor random_inpaint_mask(int64_t height, int64_t width, torch::Generator generator) {
  TORCH_CHECK(height > 0 && width > 0, "random_inpaint_mask: size must be positive, got ",
              height, "x", width);
  constexpr double pi = 3.14159265358979323846;
  auto uniform = [&](double lo, double hi) {  // [lo, hi)
    return lo + (hi - lo) * torch::rand({1}, generator, torch::kFloat64).item<double>();
  };
  auto count = [&](int64_t lo, int64_t hi) {  // [lo, hi]
    return std::min(hi, lo + static_cast<int64_t>(uniform(0, static_cast<double>(hi - lo + 1))));
  };
  auto mask = torch::zeros({height, width}, torch::kUInt8);
  auto m = mask.accessor<uint8_t, 2>();
  const double h = static_cast<double>(height), w = static_cast<double>(width);
  for (int64_t b = count(1, 2); b > 0; --b) {
    const int64_t bh = std::max<int64_t>(1, std::lround(h * uniform(0.15, 0.45)));
    const int64_t bw = std::max<int64_t>(1, std::lround(w * uniform(0.15, 0.45)));
    const int64_t top = std::min(height - bh, static_cast<int64_t>(uniform(0, h - bh + 1)));
    const int64_t left = std::min(width - bw, static_cast<int64_t>(uniform(0, w - bw + 1)));
    mask.narrow(0, top, bh).narrow(1, left, bw).fill_(255);
  }
  const double side = std::min(h, w);
  // Pixels whose centre lies within `radius` of the segment (ax, ay)-(bx, by): a capsule.
  auto segment = [&](double ax, double ay, double bx, double by, double radius) {
    const double ex = bx - ax, ey = by - ay, length2 = std::max(ex * ex + ey * ey, 1e-12);
    const int64_t y0 = std::max<int64_t>(0, static_cast<int64_t>(std::min(ay, by) - radius));
    const int64_t y1 = std::min<int64_t>(height - 1, static_cast<int64_t>(std::max(ay, by) + radius));
    const int64_t x0 = std::max<int64_t>(0, static_cast<int64_t>(std::min(ax, bx) - radius));
    const int64_t x1 = std::min<int64_t>(width - 1, static_cast<int64_t>(std::max(ax, bx) + radius));
    for (int64_t y = y0; y <= y1; ++y) {
      for (int64_t x = x0; x <= x1; ++x) {
        const double px = x + 0.5 - ax, py = y + 0.5 - ay;
        const double t = std::clamp((px * ex + py * ey) / length2, 0.0, 1.0);
        const double dx = px - t * ex, dy = py - t * ey;
        if (dx * dx + dy * dy <= radius * radius) m[y][x] = 255;
      }
    }
  };
  for (int64_t s = count(1, 3); s > 0; --s) {
    const double radius = std::max(0.5, side * uniform(0.04, 0.10) / 2);
    double x = uniform(0, w), y = uniform(0, h);
    for (int64_t v = count(3, 7); v > 0; --v) {
      const double angle = uniform(0, 2 * pi), length = side * uniform(0.10, 0.25);
      const double nx = std::clamp(x + length * std::cos(angle), 0.0, w);
      const double ny = std::clamp(y + length * std::sin(angle), 0.0, h);
      segment(x, y, nx, ny, radius);
      x = nx;
      y = ny;
    }
  }
  return mask;
}

// ---- maps from files -------------------------------------------------------------------------

/// Decodes an encoded condition map to uint8 [H, W, 3]: grey is replicated to RGB, 16-bit
/// samples are scaled to 8 bits, an alpha channel is dropped when fully opaque. A map with
/// transparent pixels is refused naming `name`: what its colour means under transparency is
/// undefined (pose and scribble tools draw on transparent layers), so dropping the alpha would
/// change what the map says.
inline torch::Tensor decode_condition(const std::string& bytes, const std::string& name) {
  int channels = 0;
  const auto rgba = decode_pixels(bytes, "condition image '" + name + "'", 4, &channels);
  if (channels == 2 || channels == 4) {
    const int64_t transparent = (rgba.select(2, 3) != 255).sum().item<int64_t>();
    TORCH_CHECK(transparent == 0, "condition image '", name, "' has ", channels,
                " channels with ", transparent, " transparent pixels: a condition map must be "
                "opaque grey or RGB (its colour under transparency is undefined)");
  }
  return rgba.narrow(2, 0, 3).contiguous();  // [H, W, 4] -> [H, W, 3]
}

/// Reads a user-supplied condition map (depth, segmentation, pose, soft edge, scribble, ...: any
/// image file; see `decode_condition`) for an image of `height` x `width`, as given: uint8
/// [H, W, 3]. Refused, naming the file, when unreadable, when its sides are not multiples of 8
/// (a CSC-Tuner's hint meets latents 1/8 of its size), or when its size is not the target's: a
/// map is never resized, so that it lines up with what it conditions.
inline torch::Tensor read_condition(const std::filesystem::path& path, int64_t height,
                                    int64_t width) {
  const auto map = decode_condition(read_file_bytes(path), path.string());
  const int64_t h = map.size(0), w = map.size(1);
  TORCH_CHECK(h % 8 == 0 && w % 8 == 0, "condition image '", path.string(), "' is ", w, "x", h,
              ": its sides must be multiples of 8 (the latents are 1/8 of the image)");
  TORCH_CHECK(h == height && w == width, "condition image '", path.string(), "' is ", w, "x",
              h, ", the image it conditions ", width, "x", height,
              ": they must be the same size (a condition is not resized)");
  return map;
}

// ---- computed conditions ---------------------------------------------------------------------

/// The condition of kind `kind` computed from uint8 [H, W, 3] RGB: Canny edges, the colour map,
/// or the inpainting condition under a `random_inpaint_mask` drawn from `generator`. A `file`
/// condition is read (`read_condition`), not computed: refused.
inline torch::Tensor make_condition(ConditionKind kind, const torch::Tensor& image,
                                    torch::Generator generator) {
  switch (kind) {
    case ConditionKind::canny: return canny(image);
    case ConditionKind::colour: return colour_map(image);
    case ConditionKind::inpaint:
      detail::check_rgb(image, "make_condition");
      return inpaint_condition(image, random_inpaint_mask(image.size(0), image.size(1),
                                                          std::move(generator)))
          .image;
    case ConditionKind::file: break;
  }
  TORCH_CHECK(false, "make_condition: a '", to_string(kind),
              "' condition is read from its file (read_condition), not computed");
  return torch::Tensor();  // unreachable
}

}  // namespace common
