#pragma once
/// @file demo_data.hpp
/// @brief The generated demo style dataset of the embedded default: flat-coloured shapes with a
/// thick outline and a hard shadow, captioned, in the metadata.jsonl layout that
/// `CaptionedImageDataset` reads. The same seed gives the same files on every machine.

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
  constexpr double pi = 3.14159265358979323846;
  static const std::array<const char*, 6> shapes{"circle", "square",  "triangle",
                                                 "diamond", "hexagon", "star"};
  const auto& palette = detail::demo_palette();
  detail::SplitMix64 rng{seed};
  const double size = static_cast<double>(resolution);
  const double outline = std::max(2.0, 0.035 * size);  // outline width, pixels
  const double shadow = std::max(2.0, 0.045 * size);   // drop shadow offset, pixels
  const std::array<double, 3> ink{28, 28, 36};         // outline colour
  std::string metadata;
  for (int64_t k = 0; k < n; ++k) {
    const size_t shape = rng.index(shapes.size());
    const size_t fg = rng.index(palette.size());
    size_t bg = rng.index(palette.size() - 1);
    if (bg >= fg) ++bg;  // never the shape's colour
    const double cx = size * rng.uniform(0.38, 0.62), cy = size * rng.uniform(0.38, 0.62);
    const double radius = size * rng.uniform(0.20, 0.30);
    const double tilt = rng.uniform(-0.2, 0.2);  // radians
    // The polygon (all shapes but the circle), counter-clockwise, pointing up.
    std::vector<std::array<double, 2>> poly;
    auto regular = [&](int sides, double phase, double r_outer, double r_inner) {
      const int count = r_inner > 0 ? 2 * sides : sides;
      for (int i = 0; i < count; ++i) {
        const double r = (r_inner > 0 && i % 2 == 1) ? r_inner : r_outer;
        const double a = phase + tilt - pi / 2 + 2 * pi * i / count;
        poly.push_back({cx + r * std::cos(a), cy + r * std::sin(a)});
      }
    };
    const std::string shape_name = shapes[shape];
    if (shape_name == "square") regular(4, pi / 4, radius * 1.1, 0);
    if (shape_name == "triangle") regular(3, 0, radius * 1.2, 0);
    if (shape_name == "diamond") regular(4, 0, radius * 1.2, 0);
    if (shape_name == "hexagon") regular(6, pi / 6, radius, 0);
    if (shape_name == "star") regular(5, 0, radius * 1.2, radius * 0.5);
    auto distance = [&](double x, double y) {
      if (poly.empty()) return std::hypot(x - cx, y - cy) - radius;
      return detail::polygon_distance(poly, x, y);
    };
    const auto& fill = palette[fg].rgb;
    const auto& back = palette[bg].rgb;
    std::vector<uint8_t> pixels(static_cast<size_t>(resolution * resolution * 3));
    for (int64_t y = 0; y < resolution; ++y) {
      for (int64_t x = 0; x < resolution; ++x) {
        const double px = x + 0.5, py = y + 0.5;
        const double d = distance(px, py);
        const double d_shadow = distance(px - shadow, py - shadow) - outline / 2;
        // coverage with a one-pixel antialiased edge
        const double shadow_cover = std::clamp(0.5 - d_shadow, 0.0, 1.0);
        const double fill_cover = std::clamp(0.5 - d, 0.0, 1.0);
        const double ink_cover = std::clamp(outline / 2 + 0.5 - std::abs(d), 0.0, 1.0);
        for (int ch = 0; ch < 3; ++ch) {
          double v = back[static_cast<size_t>(ch)];
          v += shadow_cover * (0.62 * back[static_cast<size_t>(ch)] - v);
          v += fill_cover * (fill[static_cast<size_t>(ch)] - v);
          v += ink_cover * (ink[static_cast<size_t>(ch)] - v);
          pixels[static_cast<size_t>((y * resolution + x) * 3 + ch)] =
              static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L));
        }
      }
    }
    auto article = [](const char* word) {
      return std::string(std::strchr("aeiou", word[0]) != nullptr ? "an " : "a ") + word;
    };
    const std::string caption = article(palette[fg].name) + " " + shape_name + " on " +
                                article(palette[bg].name) + " background, flat style";
    char file[48];
    std::snprintf(file, sizeof(file), "images/demo_%04lld.png", static_cast<long long>(k));
    auto image = torch::from_blob(pixels.data(), {resolution, resolution, 3}, torch::kUInt8);
    write_png((folder / file).string(), image, {{"caption", caption}});
    metadata += nlohmann::json{{"file_name", file}, {"text", caption}}.dump() + "\n";
  }
  write_file_atomic(folder / "metadata.jsonl", metadata);
  return folder;
}

}  // namespace common
