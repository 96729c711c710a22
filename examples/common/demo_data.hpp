#pragma once
/// @file demo_data.hpp
/// @brief The generated demo datasets of the embedded default: flat-coloured shapes with a
/// thick outline and a hard shadow, captioned, in the metadata.jsonl layout that
/// `CaptionedImageDataset` reads (style), or with each picture's layout (a segmentation map) in diffusers' ControlNet
/// layout that `ConditionedImageDataset` reads (control). The same seed gives the same files on
/// every machine.

#include <common/files.hpp>
#include <common/png.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace common {

namespace detail {

/// SplitMix64: a tiny generator whose sequence is fixed by its definition (std's distributions
/// are not portable across standard libraries).
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) {  // [lo, hi)
    return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1.0p-53;
  }
  size_t index(size_t n) { return static_cast<size_t>(next() % n); }
};

struct DemoColour {
  const char* name;
  std::array<double, 3> rgb;
};

inline const std::vector<DemoColour>& demo_palette() {
  static const std::vector<DemoColour> palette{
      {"red", {214, 48, 49}},     {"orange", {243, 139, 33}}, {"yellow", {246, 206, 58}},
      {"green", {67, 160, 71}},   {"teal", {38, 166, 154}},   {"blue", {41, 98, 205}},
      {"purple", {126, 68, 178}}, {"pink", {240, 128, 170}},  {"white", {246, 244, 236}},
      {"grey", {140, 140, 146}}};
  return palette;
}

/// Signed distance from (x, y) to a closed polygon: negative inside (even-odd rule).
inline double polygon_distance(const std::vector<std::array<double, 2>>& v, double x, double y) {
  double best = 1e30;
  bool inside = false;
  for (size_t i = 0, j = v.size() - 1; i < v.size(); j = i++) {
    const double ax = v[j][0], ay = v[j][1], bx = v[i][0], by = v[i][1];
    const double ex = bx - ax, ey = by - ay;
    const double t = std::clamp(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0);
    const double dx = x - (ax + t * ex), dy = y - (ay + t * ey);
    best = std::min(best, dx * dx + dy * dy);
    if ((ay > y) != (by > y) && x < ax + (y - ay) * ex / ey) inside = !inside;
  }
  return inside ? -std::sqrt(best) : std::sqrt(best);
}

/// The shapes of the demo data.
inline const std::array<const char*, 6>& demo_shapes() {
  static const std::array<const char*, 6> shapes{"circle",  "square",  "triangle",
                                                 "diamond", "hexagon", "star"};
  return shapes;
}

/// One demo picture: a flat-coloured shape on a flat background.
struct DemoShape {
  size_t shape = 0;   // index into demo_shapes()
  size_t fill = 0;    // palette index of the shape
  size_t back = 0;    // palette index of the background, never the shape's
  double cx = 0, cy = 0, radius = 0;  // centre and size, pixels
  double tilt = 0;    // radians
};

/// A shape drawn from `rng` for a picture of side `side`, in this order: the shape, its colour,
/// the background's, the centre (each coordinate uniform in `centre` times the side), the radius
/// (uniform in `radius` times the side), the tilt (uniform in [-0.2, 0.2) radians).
inline DemoShape random_demo_shape(SplitMix64& rng, double side, std::array<double, 2> centre,
                                   std::array<double, 2> radius) {
  DemoShape s;
  s.shape = rng.index(demo_shapes().size());
  s.fill = rng.index(demo_palette().size());
  s.back = rng.index(demo_palette().size() - 1);
  if (s.back >= s.fill) ++s.back;  // never the shape's colour
  s.cx = side * rng.uniform(centre[0], centre[1]);
  s.cy = side * rng.uniform(centre[0], centre[1]);
  s.radius = side * rng.uniform(radius[0], radius[1]);
  s.tilt = rng.uniform(-0.2, 0.2);
  return s;
}

/// Signed distance from a point to a shape's contour, in pixels: negative inside.
class DemoShapeDistance {
 public:
  /// The contour of `s`: a circle, or a polygon (counter-clockwise, pointing up).
  explicit DemoShapeDistance(const DemoShape& s) : s_(s) {
    constexpr double pi = 3.14159265358979323846;
    auto regular = [&](int sides, double phase, double r_outer, double r_inner) {
      const int count = r_inner > 0 ? 2 * sides : sides;
      for (int i = 0; i < count; ++i) {
        const double r = (r_inner > 0 && i % 2 == 1) ? r_inner : r_outer;
        const double a = phase + s.tilt - pi / 2 + 2 * pi * i / count;
        poly_.push_back({s.cx + r * std::cos(a), s.cy + r * std::sin(a)});
      }
    };
    const std::string name = demo_shapes()[s.shape];
    if (name == "square") regular(4, pi / 4, s.radius * 1.1, 0);
    if (name == "triangle") regular(3, 0, s.radius * 1.2, 0);
    if (name == "diamond") regular(4, 0, s.radius * 1.2, 0);
    if (name == "hexagon") regular(6, pi / 6, s.radius, 0);
    if (name == "star") regular(5, 0, s.radius * 1.2, s.radius * 0.5);
  }
  /// The distance at (x, y).
  double operator()(double x, double y) const {
    if (poly_.empty()) return std::hypot(x - s_.cx, y - s_.cy) - s_.radius;
    return polygon_distance(poly_, x, y);
  }

 private:
  DemoShape s_;
  std::vector<std::array<double, 2>> poly_;  // empty: the circle
};

/// An R x R picture, uint8 [R, R, 3]: `value(x, y, channel)` at each pixel centre, rounded.
template <typename Value>
torch::Tensor draw_demo_pixels(int64_t resolution, const Value& value) {
  auto image = torch::empty({resolution, resolution, 3}, torch::kUInt8);
  uint8_t* pixels = image.data_ptr<uint8_t>();
  for (int64_t y = 0; y < resolution; ++y) {
    for (int64_t x = 0; x < resolution; ++x) {
      const auto rgb = value(x + 0.5, y + 0.5);
      for (size_t ch = 0; ch < 3; ++ch) {
        pixels[(y * resolution + x) * 3 + static_cast<int64_t>(ch)] =
            static_cast<uint8_t>(std::clamp(std::lround(rgb[ch]), 0L, 255L));
      }
    }
  }
  return image;
}

/// The style demo's picture of `s`: the flat fill, a thick dark outline and a hard drop shadow
/// on the flat background, each with a one-pixel antialiased edge; uint8 [R, R, 3].
inline torch::Tensor draw_demo_shape(const DemoShape& s, int64_t resolution) {
  const double size = static_cast<double>(resolution);
  const double outline = std::max(2.0, 0.035 * size);  // outline width, pixels
  const double shadow = std::max(2.0, 0.045 * size);   // drop shadow offset, pixels
  const std::array<double, 3> ink{28, 28, 36};         // outline colour
  const auto& fill = demo_palette()[s.fill].rgb;
  const auto& back = demo_palette()[s.back].rgb;
  const DemoShapeDistance distance(s);
  return draw_demo_pixels(resolution, [&](double px, double py) {
    const double d = distance(px, py);
    const double d_shadow = distance(px - shadow, py - shadow) - outline / 2;
    const double shadow_cover = std::clamp(0.5 - d_shadow, 0.0, 1.0);
    const double fill_cover = std::clamp(0.5 - d, 0.0, 1.0);
    const double ink_cover = std::clamp(outline / 2 + 0.5 - std::abs(d), 0.0, 1.0);
    std::array<double, 3> rgb{};
    for (size_t ch = 0; ch < 3; ++ch) {
      double v = back[ch];
      v += shadow_cover * (0.62 * back[ch] - v);
      v += fill_cover * (fill[ch] - v);
      v += ink_cover * (ink[ch] - v);
      rgb[ch] = v;
    }
    return rgb;
  });
}

/// The layout of `s`, as a segmentation map shows it: the shape's region in its fill colour on
/// its background colour, from its exact contour (antialiased), without outline or shadow;
/// uint8 [R, R, 3]. Where the shape is, how big, and its colours: all but the drawing's details.
inline torch::Tensor draw_demo_layout(const DemoShape& s, int64_t resolution) {
  const auto& fill = demo_palette()[s.fill].rgb;
  const auto& back = demo_palette()[s.back].rgb;
  const DemoShapeDistance distance(s);
  return draw_demo_pixels(resolution, [&](double px, double py) {
    const double cover = std::clamp(0.5 - distance(px, py), 0.0, 1.0);
    std::array<double, 3> rgb{};
    for (size_t ch = 0; ch < 3; ++ch) rgb[ch] = back[ch] + cover * (fill[ch] - back[ch]);
    return rgb;
  });
}

/// The caption of `s`, e.g. "a red circle on an orange background".
inline std::string demo_caption(const DemoShape& s) {
  auto article = [](const char* word) {
    return std::string(std::strchr("aeiou", word[0]) != nullptr ? "an " : "a ") + word;
  };
  return article(demo_palette()[s.fill].name) + " " + demo_shapes()[s.shape] + " on " +
         article(demo_palette()[s.back].name) + " background";
}

/// "images/demo_0007.png" and the like: the name of picture `k` in folder `folder`.
inline std::string demo_file(const char* folder, int64_t k) {
  char file[48];
  std::snprintf(file, sizeof(file), "%s/demo_%04lld.png", folder, static_cast<long long>(k));
  return file;
}

}  // namespace detail

/// Generates a small synthetic style dataset in the metadata.jsonl layout: `n` square PNGs of
/// side `resolution` under `folder/images/`, each one flat-coloured shape (circle, square,
/// triangle, diamond, hexagon, star) with a thick dark outline and a hard drop shadow on a flat
/// background — a consistent "flat style" — captioned like "a red circle on an orange
/// background, flat style". The same seed gives the same files. Returns `folder`.
inline std::filesystem::path make_demo_dataset(const std::filesystem::path& folder, int64_t n,
                                               int64_t resolution, uint64_t seed) {
  TORCH_CHECK(n > 0, "make_demo_dataset: n must be positive, got ", n);
  TORCH_CHECK(resolution >= 16, "make_demo_dataset: resolution must be >= 16, got ", resolution);
  std::filesystem::create_directories(folder / "images");
  detail::SplitMix64 rng{seed};
  std::string metadata;
  for (int64_t k = 0; k < n; ++k) {
    const auto shape = detail::random_demo_shape(rng, static_cast<double>(resolution),
                                                 {0.38, 0.62}, {0.20, 0.30});
    const std::string caption = detail::demo_caption(shape) + ", flat style";
    const std::string file = detail::demo_file("images", k);
    write_png((folder / file).string(), detail::draw_demo_shape(shape, resolution),
              {{"caption", caption}});
    metadata += nlohmann::json{{"file_name", file}, {"text", caption}}.dump() + "\n";
  }
  write_file_atomic(folder / "metadata.jsonl", metadata);
  return folder;
}

/// Generates a small synthetic dataset for controllable generation in diffusers' ControlNet
/// layout: `n` pictures of side `resolution` under `folder/images/` as the style demo draws them,
/// but with the shape anywhere in the middle 40% of each axis and of any size from 20% to 35% of
/// the side; under `folder/conditions/` each picture's layout (`draw_demo_layout`: the regions in
/// their colours, as a segmentation map); and `metadata.jsonl` with `file_name`,
/// `conditioning_image` and `text`. The caption ("a red circle on an orange background") names
/// shape and colours but not where the shape is or how big: only the condition says that. The
/// same seed gives the same files. Returns `folder`.
inline std::filesystem::path make_demo_control_dataset(const std::filesystem::path& folder,
                                                       int64_t n, int64_t resolution,
                                                       uint64_t seed) {
  TORCH_CHECK(n > 0, "make_demo_control_dataset: n must be positive, got ", n);
  TORCH_CHECK(resolution >= 16, "make_demo_control_dataset: resolution must be >= 16, got ",
              resolution);
  std::filesystem::create_directories(folder / "images");
  std::filesystem::create_directories(folder / "conditions");
  detail::SplitMix64 rng{seed};
  std::string metadata;
  for (int64_t k = 0; k < n; ++k) {
    const auto shape = detail::random_demo_shape(rng, static_cast<double>(resolution),
                                                 {0.30, 0.70}, {0.20, 0.35});
    const std::string caption = detail::demo_caption(shape);
    const std::string file = detail::demo_file("images", k);
    const std::string condition = detail::demo_file("conditions", k);
    write_png((folder / file).string(), detail::draw_demo_shape(shape, resolution),
              {{"caption", caption}});
    write_png((folder / condition).string(), detail::draw_demo_layout(shape, resolution));
    metadata += nlohmann::json{{"file_name", file}, {"conditioning_image", condition},
                               {"text", caption}}.dump() + "\n";
  }
  write_file_atomic(folder / "metadata.jsonl", metadata);
  return folder;
}

}  // namespace common
