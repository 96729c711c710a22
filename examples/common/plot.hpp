#pragma once
/// @file
/// What a training run writes for a person to look at: a loss plot (PNG) and a loss table (CSV).
///
/// The plot is rasterised here (no plotting library): axes with "nice" ticks labelled with
/// stb_easy_font's bitmap digits, the raw loss as a faint line and a smoothed loss on top.

#include <common/csv.hpp>
#include <common/files.hpp>
#include <common/png.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include <stb/stb_easy_font.h>  // static functions: safe in several translation units
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace common {

// ---- the loss table ------------------------------------------------------------------------

/// One line of a training log.
struct LossRecord {
  int64_t step = 0;      ///< optimizer step
  double loss = 0.0;     ///< training loss at that step
  double lr = 0.0;       ///< learning rate at that step
  double seconds = 0.0;  ///< wall time since the start of training
};

/// Writes a training log as `loss.csv`-style CSV with columns step, loss, lr, time (atomic).
inline void write_loss_csv(const std::string& path, const std::vector<LossRecord>& records) {
  std::vector<std::vector<double>> rows;
  rows.reserve(records.size());
  for (const auto& r : records) {
    rows.push_back({static_cast<double>(r.step), r.loss, r.lr, r.seconds});
  }
  write_csv(path, {"step", "loss", "lr", "time"}, rows);
}

/// Reads a log that `write_loss_csv` wrote; throws naming the file and the line of a record that
/// is not four numbers.
inline std::vector<LossRecord> read_loss_csv(const std::string& path) {
  const auto rows = parse_csv(read_file_bytes(path), path);
  std::vector<LossRecord> records;
  for (size_t i = 1; i < rows.size(); ++i) {  // after the header
    const auto& f = rows[i].fields;
    bool parsed = f.size() == 4;
    LossRecord r;
    try {
      if (parsed) r = {std::stoll(f[0]), std::stod(f[1]), std::stod(f[2]), std::stod(f[3])};
    } catch (const std::exception&) {
      parsed = false;
    }
    TORCH_CHECK(parsed, "'", path, "' line ", rows[i].line, ": expected step,loss,lr,time");
    records.push_back(r);
  }
  return records;
}

// ---- the loss plot ---------------------------------------------------------------------------

/// Options of `write_loss_plot`.
struct PlotOptions {
  /// Image width in pixels.
  TORCH_ARG(int64_t, width) = 800;
  /// Image height in pixels.
  TORCH_ARG(int64_t, height) = 480;
  /// Weight of the exponential moving average drawn as the smoothed line, in [0, 1); negative
  /// picks one from the number of points (an average over about 1/25 of the run).
  TORCH_ARG(double, smoothing) = -1.0;
};

namespace detail {

/// A float RGB canvas in [0, 1] with the few drawing operations a line chart needs.
struct Canvas {
  int64_t width, height;
  std::vector<float> rgb;
  Canvas(int64_t w, int64_t h) : width(w), height(h), rgb(static_cast<size_t>(w * h * 3), 1.f) {}

  void blend(int64_t x, int64_t y, const std::array<float, 3>& colour, float alpha) {
    if (x < 0 || y < 0 || x >= width || y >= height || alpha <= 0.f) return;
    float* p = &rgb[static_cast<size_t>((y * width + x) * 3)];
    for (int c = 0; c < 3; ++c) p[c] += alpha * (colour[static_cast<size_t>(c)] - p[c]);
  }
  void fill_rect(int64_t x0, int64_t y0, int64_t x1, int64_t y1,
                 const std::array<float, 3>& colour) {  // [x0, x1) x [y0, y1)
    for (int64_t y = std::max<int64_t>(y0, 0); y < std::min(y1, height); ++y)
      for (int64_t x = std::max<int64_t>(x0, 0); x < std::min(x1, width); ++x)
        blend(x, y, colour, 1.f);
  }
  /// Text with its top-left corner at (x, y), pixels scaled by `scale`.
  void text(int64_t x, int64_t y, const std::string& s, int64_t scale,
            const std::array<float, 3>& colour) {
    std::vector<char> chars;
    for (char c : s) chars.push_back(c >= 32 && c <= 126 ? c : '?');  // stb_easy_font: ASCII
    chars.push_back('\0');
    std::vector<char> quads(chars.size() * 300 + 64);
    const int count = stb_easy_font_print(0.f, 0.f, chars.data(), nullptr, quads.data(),
                                          static_cast<int>(quads.size()));
    for (int q = 0; q < count; ++q) {  // each quad: 4 vertices of {x, y, z float; rgba}
      const auto* v0 = reinterpret_cast<const float*>(quads.data() + q * 64);
      const auto* v2 = reinterpret_cast<const float*>(quads.data() + q * 64 + 32);
      fill_rect(x + std::lround(v0[0] * scale), y + std::lround(v0[1] * scale),
                x + std::lround(v2[0] * scale), y + std::lround(v2[1] * scale), colour);
    }
  }
  static int64_t text_width(const std::string& s, int64_t scale) {
    std::vector<char> chars;
    for (char c : s) chars.push_back(c >= 32 && c <= 126 ? c : '?');
    chars.push_back('\0');
    return stb_easy_font_width(chars.data()) * scale;
  }
};

/// Max-accumulated coverage of an antialiased polyline of half-width `radius`, clipped to a
/// rectangle; blending it once afterwards keeps overlapping segments from darkening.
inline void polyline_coverage(std::vector<float>& cover, int64_t width,
                              const std::vector<std::array<double, 2>>& points, double radius,
                              int64_t x0, int64_t y0, int64_t x1, int64_t y1) {
  auto segment = [&](const std::array<double, 2>& a, const std::array<double, 2>& b) {
    const double ex = b[0] - a[0], ey = b[1] - a[1], len2 = ex * ex + ey * ey;
    const int64_t lx = std::max<int64_t>(x0, std::floor(std::min(a[0], b[0]) - radius - 1));
    const int64_t hx = std::min<int64_t>(x1, std::ceil(std::max(a[0], b[0]) + radius + 1));
    const int64_t ly = std::max<int64_t>(y0, std::floor(std::min(a[1], b[1]) - radius - 1));
    const int64_t hy = std::min<int64_t>(y1, std::ceil(std::max(a[1], b[1]) + radius + 1));
    for (int64_t y = ly; y < hy; ++y) {
      for (int64_t x = lx; x < hx; ++x) {
        const double px = x + 0.5 - a[0], py = y + 0.5 - a[1];
        const double t = len2 > 0 ? std::clamp((px * ex + py * ey) / len2, 0.0, 1.0) : 0.0;
        const double d = std::hypot(px - t * ex, py - t * ey);
        auto& c = cover[static_cast<size_t>(y * width + x)];
        c = std::max(c, static_cast<float>(std::clamp(radius + 0.5 - d, 0.0, 1.0)));
      }
    }
  };
  if (points.size() == 1) segment(points[0], points[0]);
  for (size_t i = 1; i < points.size(); ++i) segment(points[i - 1], points[i]);
}

/// About `target` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi].
inline std::vector<double> nice_ticks(double lo, double hi, int target, double* step_out) {
  const double raw = (hi - lo) / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / magnitude;
  const double step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * magnitude;
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  }
  *step_out = step;
  return ticks;
}

inline std::string tick_label(double value, double step) {
  const int decimals = std::max(0, static_cast<int>(-std::floor(std::log10(step) + 1e-9)));
  char text[64];
  std::snprintf(text, sizeof(text), "%.*f", std::min(decimals, 10), value);
  return text;
}

}  // namespace detail

/// Draws the loss curve of a run to a PNG of `options.width()` x `options.height()` pixels: the
/// raw losses as a faint line, an exponential moving average (debiased, as TensorBoard's) as a
/// solid line, axes with numbered ticks and the title on top. Non-finite losses are left out.
/// Written atomically with `write_png`; throws naming the file on failure.
inline void write_loss_plot(const std::string& path, const std::vector<int64_t>& steps,
                            const std::vector<double>& losses, const std::string& title,
                            PlotOptions options = {}) {
  TORCH_CHECK(steps.size() == losses.size(), "write_loss_plot '", path, "': ", steps.size(),
              " steps but ", losses.size(), " losses");
  TORCH_CHECK(options.width() >= 120 && options.height() >= 80, "write_loss_plot '", path,
              "': the image must be at least 120x80, got ", options.width(), "x",
              options.height());
  TORCH_CHECK(options.smoothing() < 1.0, "write_loss_plot '", path,
              "': smoothing must be < 1, got ", options.smoothing());
  const int64_t W = options.width(), H = options.height();
  const std::array<float, 3> black{0.1f, 0.1f, 0.12f}, grid{0.9f, 0.9f, 0.92f},
      line{0.12f, 0.38f, 0.75f};
  const int64_t scale = std::max<int64_t>(1, std::min(W, H) / 240);  // font pixel size

  // The finite points and their smoothed values.
  std::vector<double> xs, ys;
  for (size_t i = 0; i < losses.size(); ++i) {
    if (std::isfinite(losses[i])) {
      xs.push_back(static_cast<double>(steps[i]));
      ys.push_back(losses[i]);
    }
  }
  const double weight =
      options.smoothing() >= 0
          ? options.smoothing()
          : 1.0 - 1.0 / std::max(1.0, static_cast<double>(ys.size()) / 25.0);
  std::vector<double> smooth(ys.size());
  double ema = 0.0, debias = 1.0;
  for (size_t i = 0; i < ys.size(); ++i) {
    ema = weight * ema + (1 - weight) * ys[i];
    debias *= weight;
    smooth[i] = ema / (1 - debias);
  }

  // Data ranges (padded; a degenerate range is widened).
  double x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;
  if (!xs.empty()) {
    x_lo = *std::min_element(xs.begin(), xs.end());
    x_hi = *std::max_element(xs.begin(), xs.end());
    y_lo = *std::min_element(ys.begin(), ys.end());
    y_hi = *std::max_element(ys.begin(), ys.end());
  }
  if (x_hi - x_lo < 1) x_hi = x_lo + 1;
  if (y_hi - y_lo <= 1e-12 * std::max(1.0, std::abs(y_hi))) {
    const double pad = std::max(1e-3, std::abs(y_hi) * 0.1);
    y_lo -= pad;
    y_hi += pad;
  }
  const double y_pad = 0.05 * (y_hi - y_lo);
  y_lo -= y_pad;
  y_hi += y_pad;
  double x_step = 1, y_step = 1;
  auto x_ticks = detail::nice_ticks(x_lo, x_hi, 6, &x_step);
  auto y_ticks = detail::nice_ticks(y_lo, y_hi, 5, &y_step);
  if (x_step < 1) x_ticks = detail::nice_ticks(x_lo, x_hi, static_cast<int>(x_hi - x_lo), &x_step);

  // Layout: the plot area leaves room for the labels.
  const int64_t glyph = 7 * scale, pad = 6 * scale;
  int64_t label_w = 0;
  for (double t : y_ticks) {
    label_w = std::max(label_w, detail::Canvas::text_width(detail::tick_label(t, y_step), scale));
  }
  const int64_t left = label_w + 2 * pad, right = W - 4 * pad;
  const int64_t top = glyph * 2 + 2 * pad, bottom = H - glyph - 3 * pad;
  TORCH_CHECK(right - left > 10 && bottom - top > 10, "write_loss_plot '", path,
              "': ", W, "x", H, " leaves no room for the plot");
  auto px = [&](double x) { return left + (x - x_lo) / (x_hi - x_lo) * (right - left); };
  auto py = [&](double y) { return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top); };

  detail::Canvas canvas(W, H);
  for (double t : y_ticks) {  // horizontal grid lines, y labels
    const int64_t y = std::lround(py(t));
    canvas.fill_rect(left, y, right, y + 1, grid);
    const auto label = detail::tick_label(t, y_step);
    canvas.text(left - pad - detail::Canvas::text_width(label, scale), y - glyph / 2, label,
                scale, black);
  }
  for (double t : x_ticks) {  // vertical grid lines, x labels
    const int64_t x = std::lround(px(t));
    canvas.fill_rect(x, top, x + 1, bottom, grid);
    canvas.fill_rect(x, bottom, x + 1, bottom + pad / 2 + 1, black);
    const auto label = detail::tick_label(t, x_step);
    canvas.text(x - detail::Canvas::text_width(label, scale) / 2, bottom + pad, label, scale,
                black);
  }
  canvas.fill_rect(left, top, left + 1, bottom + 1, black);      // y axis
  canvas.fill_rect(left, bottom, right + 1, bottom + 1, black);  // x axis
  canvas.text((W - detail::Canvas::text_width(title, 2 * scale)) / 2, pad, title, 2 * scale,
              black);

  // The curves: raw faint, smoothed solid, each blended once from its coverage.
  auto draw = [&](const std::vector<double>& values, double radius, float alpha) {
    std::vector<std::array<double, 2>> points;
    for (size_t i = 0; i < values.size(); ++i) points.push_back({px(xs[i]), py(values[i])});
    std::vector<float> cover(static_cast<size_t>(W * H), 0.f);
    detail::polyline_coverage(cover, W, points, radius, left + 1, top, right + 1, bottom);
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        canvas.blend(x, y, line, alpha * cover[static_cast<size_t>(y * W + x)]);
  };
  if (!ys.empty()) {
    draw(ys, 0.5 * scale, 0.3f);
    draw(smooth, 1.0 * scale, 1.0f);
  } else {
    canvas.text((left + right - detail::Canvas::text_width("no data", scale)) / 2,
                (top + bottom) / 2, "no data", scale, black);
  }

  auto pixels = torch::from_blob(canvas.rgb.data(), {H, W, 3}, torch::kFloat32)
                    .mul(255.0)
                    .round()
                    .clamp(0, 255)
                    .to(torch::kUInt8);
  write_png(path, pixels, {{"Title", title}, {"Software", "scedit"}});
}

}  // namespace common
