#pragma once
/// @file
/// A captioned image folder for the training programs, and a generated demo style dataset.
///
/// Three layouts are recognised (checked in this order):
/// 1. `metadata.jsonl` — one JSON object per line with `file_name` and `text` (the diffusers /
///    Hugging Face ImageFolder layout); also `image`/`file` and `caption`/`prompt`.
/// 2. a CSV file (`metadata.csv`, `train.csv`, or the folder's only `*.csv`) whose header names
///    an image column (`Image:FILE`, `file_name`, `image`, `file`) and a text column (`Text`,
///    `text`, `caption`, `prompt`; case-insensitive, a `:TYPE` suffix is ignored) — the Style
///    Transfer Dataset's `Image:FILE,Text`. Fields follow RFC 4180 (quoted fields may hold commas,
///    doubled quotes and line breaks).
/// 3. image files (`.png`, `.jpg`, `.jpeg`) each with a same-named `.txt` caption beside it
///    (the folder itself, not its subfolders).
///
/// The path may also name the `.jsonl` / `.csv` file itself. Image paths in a CSV / JSONL are
/// relative to the folder that holds it.

#include <common/image.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace common {

// ---- CSV -------------------------------------------------------------------------------------

/// One record of a CSV file: its fields and the line on which it starts (1-based).
struct CsvRow {
  std::vector<std::string> fields;  ///< the unquoted field values
  int64_t line = 0;                 ///< line of the file where the record starts
};

/// Parses CSV text per RFC 4180: comma-separated fields, `"quoted"` fields that may contain
/// commas, line breaks and doubled quotes (`""` -> `"`), LF or CRLF record ends. A leading UTF-8
/// byte-order mark and blank lines are skipped. Lenient like Python's csv module: a quote inside
/// an unquoted field is kept literally. Throws naming `name` and the line of an unterminated
/// quoted field.
inline std::vector<CsvRow> parse_csv(const std::string& text, const std::string& name = "CSV") {
  std::vector<CsvRow> rows;
  CsvRow row;
  std::string field;
  bool quoted = false, in_quotes = false;
  int64_t line = 1, quote_line = 1;
  row.line = 1;
  size_t i = text.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;
  auto end_field = [&] {
    row.fields.push_back(field);
    field.clear();
    quoted = false;
  };
  auto end_row = [&] {
    end_field();
    const bool blank = row.fields.size() == 1 && row.fields[0].empty();
    if (!blank) rows.push_back(row);
    row = CsvRow{};
    row.line = line;
  };
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (in_quotes) {
      if (c == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') {
          field.push_back('"');
          ++i;
        } else {
          in_quotes = false;
        }
      } else {
        if (c == '\n') ++line;
        field.push_back(c);
      }
    } else if (c == '"' && field.empty() && !quoted) {
      in_quotes = quoted = true;
      quote_line = line;
    } else if (c == ',') {
      end_field();
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      ++line;
      end_row();
    } else {
      field.push_back(c);
    }
  }
  TORCH_CHECK(!in_quotes, name, ": unterminated quoted field starting on line ", quote_line);
  if (!field.empty() || quoted || !row.fields.empty()) end_row();
  return rows;
}

// ---- options and samples ---------------------------------------------------------------------

/// What `CaptionedImageDataset` does with a bad item (missing or undecodable image, empty
/// caption, image smaller than the resolution, malformed record).
enum class BadDataPolicy {
  skip,  ///< leave the item out; `skipped()` counts it and `problems()` says why
  fatal  ///< throw at construction on the first bad item, naming its file
};

/// The layout a dataset folder was recognised as.
enum class DatasetLayout {
  jsonl,  ///< metadata.jsonl (file_name, text)
  csv,    ///< a CSV with an image column and a text column
  txt     ///< image files with same-named .txt captions
};

/// The name of a layout: "metadata.jsonl", "csv" or "txt captions".
inline std::string to_string(DatasetLayout layout) {
  switch (layout) {
    case DatasetLayout::jsonl: return "metadata.jsonl";
    case DatasetLayout::csv: return "csv";
    case DatasetLayout::txt: return "txt captions";
  }
  return "?";
}

/// Options of `CaptionedImageDataset`.
///
/// Example:
/// ```
/// common::CaptionedImageDataset data("my_style/",
///     common::DatasetOptions(512).random_flip(true).caption_dropout(0.1));
/// ```
struct DatasetOptions {
  /// `resolution`: side of the square training images.
  /* implicit */ DatasetOptions(int64_t resolution = 512) : resolution_(resolution) {}
  /// Side R of the square images `get` returns: the short side is resized to R, then an R x R
  /// crop is taken.
  TORCH_ARG(int64_t, resolution);
  /// Take the centred crop (true) or a uniformly random one (false, diffusers' default).
  TORCH_ARG(bool, center_crop) = false;
  /// Mirror left-right with probability 1/2.
  TORCH_ARG(bool, random_flip) = false;
  /// Probability of replacing the caption by "" (for classifier-free guidance training).
  TORCH_ARG(double, caption_dropout) = 0.0;
  /// Skip bad items (counting them) or throw on the first.
  TORCH_ARG(BadDataPolicy, bad_data) = BadDataPolicy::skip;
  /// Enlarge images whose short side is below `resolution` instead of treating them as bad data.
  /// Off by default: an upscaled image trains the model on blur.
  TORCH_ARG(bool, upscale_small) = false;
  /// Keep every image in memory, already resized to the resolution on its short side (decoded
  /// once at construction), instead of reading and resizing it on each `get`.
  TORCH_ARG(bool, cache_images) = false;
};

/// One training sample.
struct CaptionedImage {
  torch::Tensor image;  ///< float [3, R, R] in [-1, 1]
  std::string caption;  ///< the caption, "" when dropped
  std::string file;     ///< the image file it came from
};

/// A batch of training samples.
struct CaptionedBatch {
  torch::Tensor images;               ///< float [B, 3, R, R] in [-1, 1]
  std::vector<std::string> captions;  ///< B captions ("" where dropped)
  std::vector<std::string> files;     ///< B image files
};

/// One usable item of a dataset: an image file and its caption.
struct CaptionedItem {
  std::string file;     ///< path of the image file
  std::string caption;  ///< its caption (whitespace trimmed, never empty)
};

namespace detail {

inline std::string trim(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n\f\v");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t\r\n\f\v") - first + 1);
}

inline std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

inline bool is_image_file(const std::filesystem::path& path) {
  const auto ext = lower(path.extension().string());
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

/// Column names accepted for the image file and the caption, in order of preference.
inline const std::vector<std::string>& image_column_names() {
  static const std::vector<std::string> names{"image:file", "file_name", "image", "file"};
  return names;
}
inline const std::vector<std::string>& text_column_names() {
  static const std::vector<std::string> names{"text", "caption", "prompt"};
  return names;
}

/// Index of the first header cell matching one of `names` (case-insensitive, exactly or by the
/// part before a ':' type suffix), or -1.
inline int64_t find_column(const std::vector<std::string>& header,
                           const std::vector<std::string>& names) {
  for (const auto& name : names) {
    for (size_t j = 0; j < header.size(); ++j) {
      const auto cell = lower(trim(header[j]));
      if (cell == name || cell.substr(0, cell.find(':')) == name) return static_cast<int64_t>(j);
    }
  }
  return -1;
}

/// A record before validation: the image, the caption, where it was listed, and any problem
/// already known from the listing itself.
struct Candidate {
  std::filesystem::path image;
  std::string caption;
  std::string origin;   // e.g. "train.csv line 4", for messages
  std::string problem;  // non-empty: bad before looking at the image
};

inline std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace detail

// ---- the dataset -----------------------------------------------------------------------------

/// A folder of captioned images (see the file comment for the layouts), scanned and validated at
/// construction: each image is decoded once and its size checked. A bad item is reported with its
/// file name and then skipped or fatal, per `DatasetOptions::bad_data`.
///
/// `get` applies: resize the short side to R (antialiased) -> R x R crop (centred or random) ->
/// random horizontal flip -> [-1, 1] float -> caption dropout. Random draws come from the
/// caller's CPU generator, in that order (crop top, crop left, flip, dropout), each only when the
/// option is on.
class CaptionedImageDataset {
 public:
  /// Scans `root` (a folder, or a .csv / .jsonl file). Throws when it does not exist, has no
  /// recognised layout, has no usable item, or (fatal policy) holds a bad item.
  explicit CaptionedImageDataset(const std::filesystem::path& root, DatasetOptions options = {})
      : root_(root), options_(std::move(options)) {
    TORCH_CHECK(options_.resolution() > 0, "DatasetOptions::resolution must be positive, got ",
                options_.resolution());
    TORCH_CHECK(options_.caption_dropout() >= 0.0 && options_.caption_dropout() <= 1.0,
                "DatasetOptions::caption_dropout must be in [0, 1], got ",
                options_.caption_dropout());
    validate(list_candidates());
    TORCH_CHECK(!items_.empty(), "dataset '", root_.string(), "' (", to_string(layout_),
                "): no usable images", problems_.empty() ? "" : "; first problem: ",
                problems_.empty() ? "" : problems_.front());
  }

  /// Number of usable items.
  int64_t size() const { return static_cast<int64_t>(items_.size()); }
  /// Number of bad items left out.
  int64_t skipped() const { return static_cast<int64_t>(problems_.size()); }
  /// One message per bad item, each naming its file and what is wrong.
  const std::vector<std::string>& problems() const { return problems_; }
  /// The usable items (file, caption), in listing order.
  const std::vector<CaptionedItem>& items() const { return items_; }
  /// The layout the folder was recognised as.
  DatasetLayout layout() const { return layout_; }
  /// The options it was built with.
  const DatasetOptions& options() const { return options_; }

  /// Sample `index` (0 <= index < size()): image float [3, R, R] in [-1, 1], caption (or "" when
  /// dropped), file. Random choices come from `generator` (a CPU generator).
  CaptionedImage get(int64_t index, torch::Generator& generator) const {
    TORCH_CHECK(index >= 0 && index < size(), "CaptionedImageDataset::get: index ", index,
                " out of range for ", size(), " items");
    const auto& item = items_[static_cast<size_t>(index)];
    const int64_t r = options_.resolution();
    auto image = options_.cache_images() ? cache_[static_cast<size_t>(index)]
                                         : resize_short_side(read_image(item.file), r);
    // [h, w, 3] (short side R) -> [R, R, 3]
    image = options_.center_crop()
                ? crop(image, center_crop_box(image.size(0), image.size(1), r, r))
                : crop(image, random_crop_box(image.size(0), image.size(1), r, r, generator));
    if (options_.random_flip() && torch::rand({1}, generator).item<double>() < 0.5) {
      image = hflip(image);
    }
    std::string caption = item.caption;
    if (options_.caption_dropout() > 0.0 &&
        torch::rand({1}, generator).item<double>() < options_.caption_dropout()) {
      caption.clear();
    }
    return CaptionedImage{to_float(image), std::move(caption), item.file};  // [3, R, R]
  }

  /// The samples at `indices`, stacked: images [B, 3, R, R].
  CaptionedBatch get_batch(const std::vector<int64_t>& indices,
                           torch::Generator& generator) const {
    TORCH_CHECK(!indices.empty(), "CaptionedImageDataset::get_batch: no indices");
    CaptionedBatch batch;
    std::vector<torch::Tensor> images;
    for (int64_t index : indices) {
      auto sample = get(index, generator);
      images.push_back(sample.image);
      batch.captions.push_back(std::move(sample.caption));
      batch.files.push_back(std::move(sample.file));
    }
    batch.images = torch::stack(images);  // B x [3, R, R] -> [B, 3, R, R]
    return batch;
  }

 private:
  /// Finds the layout and lists the records, without opening the images.
  std::vector<detail::Candidate> list_candidates() {
    namespace fs = std::filesystem;
    std::error_code error;
    TORCH_CHECK(fs::exists(root_, error), "dataset folder '", root_.string(),
                "' does not exist");
    if (fs::is_regular_file(root_, error)) {
      const auto ext = detail::lower(root_.extension().string());
      if (ext == ".jsonl") return list_jsonl(root_);
      if (ext == ".csv") return list_csv(root_);
      TORCH_CHECK(false, "dataset '", root_.string(),
                  "': expected a folder, a .csv or a .jsonl file");
    }
    TORCH_CHECK(fs::is_directory(root_, error), "dataset '", root_.string(),
                "' is neither a folder nor a file");
    std::vector<fs::path> csvs, images;
    for (const auto& entry : fs::directory_iterator(root_)) {
      if (!entry.is_regular_file()) continue;
      if (detail::lower(entry.path().extension().string()) == ".csv") csvs.push_back(entry.path());
      if (detail::is_image_file(entry.path())) images.push_back(entry.path());
    }
    std::sort(csvs.begin(), csvs.end());
    std::sort(images.begin(), images.end());
    if (fs::is_regular_file(root_ / "metadata.jsonl", error)) {
      return list_jsonl(root_ / "metadata.jsonl");
    }
    for (const char* preferred : {"metadata.csv", "train.csv"}) {
      if (fs::is_regular_file(root_ / preferred, error)) return list_csv(root_ / preferred);
    }
    if (csvs.size() == 1) return list_csv(csvs.front());
    if (csvs.size() > 1) {
      std::vector<std::string> names;
      for (const auto& c : csvs) names.push_back(c.filename().string());
      TORCH_CHECK(false, "dataset folder '", root_.string(), "' holds several CSV files (",
                  detail::join_names(names), "): pass the one to use");
    }
    const bool any_caption = std::any_of(images.begin(), images.end(), [](const fs::path& p) {
      return fs::is_regular_file(fs::path(p).replace_extension(".txt"));
    });
    TORCH_CHECK(any_caption, "dataset folder '", root_.string(),
                "' has no recognised layout: expected metadata.jsonl (file_name, text), a CSV "
                "with an image column and a text column (e.g. header Image:FILE,Text), or "
                "images with same-named .txt captions (found ",
                images.size(), " image files and no captions)");
    layout_ = DatasetLayout::txt;
    std::vector<detail::Candidate> candidates;
    for (const auto& image : images) {
      detail::Candidate c;
      c.image = image;
      const auto caption_file = fs::path(image).replace_extension(".txt");
      c.origin = caption_file.filename().string();
      if (!fs::is_regular_file(caption_file, error)) {
        c.problem = "no caption file '" + caption_file.string() + "'";
      } else {
        c.caption = detail::trim(read_file_bytes(caption_file));
        if (c.caption.empty()) c.problem = "empty caption file '" + caption_file.string() + "'";
      }
      candidates.push_back(std::move(c));
    }
    return candidates;
  }

  std::vector<detail::Candidate> list_csv(const std::filesystem::path& csv_path) {
    layout_ = DatasetLayout::csv;
    const auto name = csv_path.filename().string();
    const auto rows = parse_csv(read_file_bytes(csv_path), csv_path.string());
    TORCH_CHECK(!rows.empty(), "CSV '", csv_path.string(), "' is empty (expected a header)");
    const auto& header = rows.front().fields;
    const int64_t image_col = detail::find_column(header, detail::image_column_names());
    const int64_t text_col = detail::find_column(header, detail::text_column_names());
    TORCH_CHECK(image_col >= 0, "CSV '", csv_path.string(), "': no image column in header [",
                detail::join_names(header), "] (expected one of Image:FILE, file_name, image, "
                "file)");
    TORCH_CHECK(text_col >= 0, "CSV '", csv_path.string(), "': no text column in header [",
                detail::join_names(header), "] (expected one of Text, text, caption, prompt)");
    const auto folder = csv_path.parent_path();
    std::vector<detail::Candidate> candidates;
    for (size_t i = 1; i < rows.size(); ++i) {
      const auto& row = rows[i];
      detail::Candidate c;
      c.origin = name + " line " + std::to_string(row.line);
      const size_t needed = static_cast<size_t>(std::max(image_col, text_col)) + 1;
      if (row.fields.size() < needed) {
        c.image = row.fields.empty() ? std::filesystem::path() : folder / row.fields.front();
        c.problem = "expected " + std::to_string(header.size()) + " fields, got " +
                    std::to_string(row.fields.size());
      } else {
        c.image = folder / detail::trim(row.fields[static_cast<size_t>(image_col)]);
        c.caption = detail::trim(row.fields[static_cast<size_t>(text_col)]);
      }
      candidates.push_back(std::move(c));
    }
    return candidates;
  }

  std::vector<detail::Candidate> list_jsonl(const std::filesystem::path& jsonl_path) {
    layout_ = DatasetLayout::jsonl;
    const auto name = jsonl_path.filename().string();
    const auto text = read_file_bytes(jsonl_path);
    const auto folder = jsonl_path.parent_path();
    std::vector<detail::Candidate> candidates;
    size_t start = 0;
    for (int64_t line = 1; start < text.size(); ++line) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      const auto content = detail::trim(text.substr(start, end - start));
      start = end + 1;
      if (content.empty()) continue;
      detail::Candidate c;
      c.origin = name + " line " + std::to_string(line);
      const auto record = nlohmann::json::parse(content, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded() || !record.is_object()) {
        c.problem = "not a JSON object";
        candidates.push_back(std::move(c));
        continue;
      }
      auto string_field = [&](const std::vector<std::string>& keys, std::string& out) {
        for (const auto& key : keys) {
          for (auto it = record.begin(); it != record.end(); ++it) {
            if (detail::lower(it.key()) == key && it.value().is_string()) {
              out = it.value().get<std::string>();
              return true;
            }
          }
        }
        return false;
      };
      std::string file;
      if (!string_field({"file_name", "image", "file"}, file)) {
        c.problem = "no file_name";
      } else {
        c.image = folder / detail::trim(file);
        string_field(detail::text_column_names(), c.caption);
        c.caption = detail::trim(c.caption);
      }
      candidates.push_back(std::move(c));
    }
    return candidates;
  }

  /// Opens every listed image; keeps the good items and reports the bad ones.
  void validate(const std::vector<detail::Candidate>& candidates) {
    const int64_t r = options_.resolution();
    for (const auto& c : candidates) {
      const std::string where = "'" + c.image.string() + "' (" + c.origin + ")";
      if (!c.problem.empty()) {
        report(where + ": " + c.problem);
        continue;
      }
      std::error_code error;
      if (!std::filesystem::is_regular_file(c.image, error)) {
        report(where + ": missing image file");
        continue;
      }
      if (c.caption.empty()) {
        report(where + ": empty caption");
        continue;
      }
      torch::Tensor image;
      try {
        image = read_image(c.image.string());
      } catch (const c10::Error& e) {
        report(where + ": undecodable image (" + e.what_without_backtrace() + ")");
        continue;
      }
      const int64_t short_side = std::min(image.size(0), image.size(1));
      if (short_side < r && !options_.upscale_small()) {
        report(where + ": image is " + std::to_string(image.size(1)) + "x" +
               std::to_string(image.size(0)) + ", smaller than the resolution " +
               std::to_string(r) + " on its short side");
        continue;
      }
      items_.push_back(CaptionedItem{c.image.string(), c.caption});
      if (options_.cache_images()) cache_.push_back(resize_short_side(image, r));
    }
  }

  void report(const std::string& message) {
    TORCH_CHECK(options_.bad_data() != BadDataPolicy::fatal, "dataset '", root_.string(),
                "': ", message, " (bad data is fatal: DatasetOptions::bad_data)");
    problems_.push_back(message);
  }

  std::filesystem::path root_;
  DatasetOptions options_;
  DatasetLayout layout_ = DatasetLayout::txt;
  std::vector<CaptionedItem> items_;
  std::vector<torch::Tensor> cache_;  // [h, w, 3] uint8, short side R, when cache_images
  std::vector<std::string> problems_;
};

// ---- the demo style dataset ------------------------------------------------------------------

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
