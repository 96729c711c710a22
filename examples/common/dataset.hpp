#pragma once
/// @file
/// A captioned image folder for the training programs (the generated demo data: demo_data.hpp),
/// and the interface through which the training run reads any dataset (`ImageSource`).
///
/// Three layouts are recognised (checked in this order):
/// 1. `metadata.jsonl` — one JSON object per line with `file_name` and `text` (the diffusers /
///    Hugging Face ImageFolder layout); also `image`/`file` and `caption`/`prompt`. A
///    `conditioning_image` (diffusers' ControlNet layout) is kept in the item, not read here
///    (conditioned_dataset.hpp reads it).
/// 2. a CSV file (`metadata.csv`, `train.csv`, or the folder's only `*.csv`) whose header names
///    an image column (`Image:FILE`, `file_name`, `image`, `file`) and a text column (`Text`,
///    `text`, `caption`, `prompt`; case-insensitive, a `:TYPE` suffix is ignored) — the Style
///    Transfer Dataset's `Image:FILE,Text`. Fields follow RFC 4180 (quoted fields may hold commas,
///    doubled quotes and line breaks).
/// 3. image files (`.png`, `.jpg`, `.jpeg`) each with a same-named `.txt` caption beside it
///    (the folder itself, not its subfolders).
///
/// The path may also name the `.jsonl` / `.csv` file itself. Image paths in a CSV / JSONL are
/// relative to the folder that holds it. Captions are UTF-8 text; one that is not (or, in a
/// JSONL, a caption that is no JSON string) makes its item bad data, named by file and line.

#include <common/csv.hpp>
#include <common/files.hpp>
#include <common/image.hpp>
#include <sd/stable_diffusion.hpp>

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
#include <functional>
#include <string>
#include <vector>

namespace common {

// ---- options and samples ---------------------------------------------------------------------

/// What `CaptionedImageDataset` does with a bad item (missing or undecodable image, empty
/// caption or one that is not valid UTF-8, image smaller than the resolution, malformed record).
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
/// common::CaptionedImageDataset data("my_style/", common::DatasetOptions(512).random_flip(true));
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
  /// Skip bad items (counting them) or throw on the first.
  TORCH_ARG(BadDataPolicy, bad_data) = BadDataPolicy::skip;
  /// Enlarge images whose short side is below `resolution` instead of treating them as bad data.
  /// Off by default: an upscaled image trains the model on blur.
  TORCH_ARG(bool, upscale_small) = false;
  /// Keep every image in memory, already resized to the resolution on its short side (decoded
  /// once at construction), instead of reading and resizing it on each `get`.
  TORCH_ARG(bool, cache_images) = false;
};

/// One training sample, before the frozen encoders.
struct CaptionedImage {
  torch::Tensor image;  ///< float [3, R, R] in [-1, 1]
  std::string caption;  ///< the caption
  std::string file;     ///< the image file it came from
  /// The condition images that go with it (controllable generation), each float [3, R, R] in
  /// [0, 1] and cropped and flipped as the image; none for a plain captioned dataset.
  std::vector<torch::Tensor> conditions;
  /// What SDXL's size conditioning says of it (diffusers' train_text_to_image_sdxl.py): the
  /// image's size as read, before the resize; the top left of the window in the resized image
  /// (in the mirrored image when it was mirrored); the target R x R.
  sd::SizeConditioning size;
};

/// What the training run reads samples from: `size()` samples, sample `i` with all its randomness
/// (crop, flip, ...) drawn from the caller's CPU generator, so that a sample is a pure function of
/// its index and the generator's seed.
class ImageSource {
 public:
  virtual ~ImageSource() = default;
  /// Number of samples.
  virtual int64_t size() const = 0;
  /// Sample `index` (0 <= index < size()); random choices from `generator` (a CPU generator).
  virtual CaptionedImage get(int64_t index, torch::Generator& generator) const = 0;
  /// What sample `index` is, the same wherever the data lies (paths relative to the data's
  /// folder, its caption): the processes of a run, and a run and its resume, compare these to
  /// know that they train on the same samples in the same order.
  virtual std::string sample_key(int64_t index) const = 0;
};

/// One usable item of a dataset: an image file and its caption.
struct CaptionedItem {
  std::string file;     ///< path of the image file
  std::string caption;  ///< its caption (whitespace trimmed, never empty)
  /// Path of its condition image, where the listing names one (`conditioning_image`) or an
  /// `ItemCheck` set it; else empty.
  std::string condition;
  /// Where it is listed, for messages: "train.csv line 4", "metadata.jsonl line 2", "a.txt".
  std::string origin;
  int64_t height = 0;  ///< its image's height as read (before any resize)
  int64_t width = 0;   ///< its image's width as read
};

class CaptionedImageDataset;

/// A last check of an item that passed all others, given its decoded image (uint8 [H, W, 3], as
/// read) and the dataset being scanned (its options, `base_folder`): returns "" to keep the item,
/// or what is wrong (naming the file at fault) to make it a bad item under the dataset's policy.
/// It may fill in the item (its `condition`); an item it keeps is kept. Conditioned datasets
/// check their condition images this way.
using ItemCheck = std::function<std::string(CaptionedItem& item, const torch::Tensor& image,
                                            const CaptionedImageDataset& dataset)>;

/// Where a sample's window lies in its resized image, and whether it is mirrored: the random
/// draws of one sample, so that its image and its condition images are cut alike.
struct SampleView {
  CropBox box;        ///< the R x R window
  bool flip = false;  ///< mirrored left to right after the crop
};

/// Cuts `view` out of an image [H, W, C] (any dtype; sized as the view was drawn for): the crop,
/// then the mirror. -> [R, R, C]
inline torch::Tensor apply_view(const torch::Tensor& image, const SampleView& view) {
  auto window = crop(image, view.box);
  return view.flip ? hflip(window) : window;
}

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
  std::filesystem::path condition;  // the listing's conditioning_image, if any
  std::string origin;   // e.g. "train.csv line 4", for messages
  std::string problem;  // non-empty: bad before looking at the image
};

/// How a message names an item: "'images/a.png' (train.csv line 4)", or only where it is listed
/// when the listing names no image.
inline std::string item_name(const std::string& image, const std::string& origin) {
  return image.empty() ? origin : "'" + image + "' (" + origin + ")";
}

/// "a number", "an array", "null": what a JSON value is, for a message.
inline std::string json_kind(const nlohmann::json& value) {
  if (value.is_null()) return "null";
  const std::string name = value.type_name();
  return (value.is_array() || value.is_object() ? "an " : "a ") + name;
}

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
/// random horizontal flip -> [-1, 1] float. Random draws come from the caller's CPU generator, in
/// that order (crop top, crop left, flip), each only when the option is on.
class CaptionedImageDataset : public ImageSource {
 public:
  /// Scans `root` (a folder, or a .csv / .jsonl file). Throws when it does not exist, has no
  /// recognised layout, has no usable item, or (fatal policy) holds a bad item. `check`, when
  /// given, is the last check of each item (see `ItemCheck`); it is not kept.
  explicit CaptionedImageDataset(const std::filesystem::path& root, DatasetOptions options = {},
                                 const ItemCheck& check = {})
      : root_(root), options_(std::move(options)) {
    TORCH_CHECK(options_.resolution() > 0, "DatasetOptions::resolution must be positive, got ",
                options_.resolution());
    validate(list_candidates(), check);
    TORCH_CHECK(!items_.empty(), "dataset '", root_.string(), "' (", to_string(layout_),
                "): no usable images", problems_.empty() ? "" : "; first problem: ",
                problems_.empty() ? "" : problems_.front());
  }

  /// Number of usable items.
  int64_t size() const override { return static_cast<int64_t>(items_.size()); }
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
  /// The folder the listing's paths are relative to (the .csv's / .jsonl's, or the images').
  const std::filesystem::path& base_folder() const { return base_folder_; }

  /// Sample `index` (0 <= index < size()): image float [3, R, R] in [-1, 1], caption, file.
  /// Random choices come from `generator` (a CPU generator).
  CaptionedImage get(int64_t index, torch::Generator& generator) const override {
    const auto image = resized(index);  // [h, w, 3], short side R
    const auto view = draw_view(image.size(0), image.size(1), generator);
    const auto& item = items_[static_cast<size_t>(index)];
    return CaptionedImage{sd::to_float(apply_view(image, view)), item.caption, item.file, {},
                          size_conditioning(index, image, view)};
  }

  /// Item `index`'s file relative to `base_folder` and its caption, tab-separated.
  std::string sample_key(int64_t index) const override {
    const auto& item = items_.at(static_cast<size_t>(index));
    return relative_name(item.file) + "\t" + item.caption;
  }

  /// `file` relative to `base_folder` ('/'-separated): how the listing names it.
  std::string relative_name(const std::string& file) const {
    return std::filesystem::path(file).lexically_normal().lexically_relative(base_folder_.lexically_normal()).generic_string();
  }

  /// The size conditioning of item `index` cut by `view` from its resized image `resized`
  /// ([h, w, C]): its size as read, the window's top left (mirrored with the window: diffusers
  /// mirrors before it crops), the resolution as the target.
  sd::SizeConditioning size_conditioning(int64_t index, const torch::Tensor& resized,
                                         const SampleView& view) const {
    const auto& item = items_.at(static_cast<size_t>(index));
    const int64_t r = options_.resolution();
    const int64_t left = view.flip ? resized.size(1) - view.box.left - view.box.width : view.box.left;
    return {item.height, item.width, view.box.top, left, r, r};
  }

  /// The image of item `index` resized to the resolution on its short side: uint8 [h, w, 3].
  torch::Tensor resized(int64_t index) const {
    TORCH_CHECK(index >= 0 && index < size(), "CaptionedImageDataset: index ", index,
                " out of range for ", size(), " items");
    return options_.cache_images()
               ? cache_[static_cast<size_t>(index)]
               : resize_short_side(read_image(items_[static_cast<size_t>(index)].file),
                                   options_.resolution());
  }

  /// The window and mirror of one sample of a resized image of `height` x `width`: the centred
  /// or a random R x R crop (draws: top, left), then a flip with probability 1/2 (one draw),
  /// each drawn from `generator` only when its option is on.
  SampleView draw_view(int64_t height, int64_t width, torch::Generator& generator) const {
    const int64_t r = options_.resolution();
    SampleView view;
    view.box = options_.center_crop() ? center_crop_box(height, width, r, r)
                                      : random_crop_box(height, width, r, r, generator);
    view.flip = options_.random_flip() && torch::rand({1}, generator).item<double>() < 0.5;
    return view;
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
    base_folder_ = root_;
    std::vector<detail::Candidate> candidates;
    for (const auto& image : images) {
      detail::Candidate c;
      c.image = image;
      const auto caption_file = fs::path(image).replace_extension(".txt");
      c.origin = caption_file.filename().string();
      if (!fs::is_regular_file(caption_file, error)) {
        c.problem = "no caption file '" + caption_file.string() + "'";
      } else {
        auto text = read_file_bytes(caption_file);
        c.caption = detail::trim(text.erase(0, utf8_bom_size(text)));  // editors' byte-order mark
        if (c.caption.empty()) c.problem = "empty caption file '" + caption_file.string() + "'";
      }
      candidates.push_back(std::move(c));
    }
    return candidates;
  }

  std::vector<detail::Candidate> list_csv(const std::filesystem::path& csv_path) {
    layout_ = DatasetLayout::csv;
    base_folder_ = csv_path.parent_path();
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
      if (row.fields.size() < needed || row.fields.size() > header.size()) {
        // More fields than the header: an unquoted comma, most likely in the caption, which would
        // be cut there.
        c.image = row.fields.empty() ? std::filesystem::path() : folder / row.fields.front();
        c.problem = "expected " + std::to_string(header.size()) + " fields, got " +
                    std::to_string(row.fields.size()) +
                    (row.fields.size() > header.size() ? " (quote a caption that holds a comma)" : "");
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
    base_folder_ = jsonl_path.parent_path();
    const auto name = jsonl_path.filename().string();
    const auto text = read_file_bytes(jsonl_path);
    const auto folder = jsonl_path.parent_path();
    std::vector<detail::Candidate> candidates;
    size_t start = utf8_bom_size(text);
    for (int64_t line = 1; start < text.size(); ++line) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      const auto raw = text.substr(start, end - start);
      const auto content = detail::trim(raw);
      start = end + 1;
      if (content.empty()) continue;
      detail::Candidate c;
      c.origin = name + " line " + std::to_string(line);
      // Checked before parsing: the JSON parser would call invalid UTF-8 "not a JSON object".
      const auto invalid = sd::unicode::utf8_problem(raw);
      if (!invalid.empty()) {
        c.problem = "the line is not valid UTF-8 " + invalid;
        candidates.push_back(std::move(c));
        continue;
      }
      const auto record = nlohmann::json::parse(content, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded() || !record.is_object()) {
        c.problem = "not a JSON object";
        candidates.push_back(std::move(c));
        continue;
      }
      // The first of `keys` the record holds (case-insensitive), trimmed, into `out`; a value
      // there that is not a string is the record's problem, named as `what` (false).
      auto string_field = [&](const std::vector<std::string>& keys, const std::string& what,
                              std::string& out) {
        for (const auto& key : keys) {
          for (auto it = record.begin(); it != record.end(); ++it) {
            if (detail::lower(it.key()) != key) continue;
            if (!it.value().is_string()) {
              c.problem = what + " is not a string (" + detail::json_kind(it.value()) + ")";
              return false;
            }
            out = detail::trim(it.value().get<std::string>());
            return true;
          }
        }
        return true;
      };
      std::string file, condition;
      if (string_field({"file_name", "image", "file"}, "file_name", file) &&
          string_field(detail::text_column_names(), "caption", c.caption) &&
          string_field({"conditioning_image"}, "conditioning_image", condition)) {
        if (file.empty()) c.problem = "no file_name";
        if (!condition.empty()) c.condition = folder / condition;
      }
      if (!file.empty()) c.image = folder / file;
      candidates.push_back(std::move(c));
    }
    return candidates;
  }

  /// Opens every listed image; keeps the good items and reports the bad ones.
  void validate(const std::vector<detail::Candidate>& candidates, const ItemCheck& check) {
    const int64_t r = options_.resolution();
    for (const auto& c : candidates) {
      const std::string where = detail::item_name(c.image.string(), c.origin);
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
      // The tokenizer would refuse it at the first batch that holds it, mid-run.
      const auto invalid = sd::unicode::utf8_problem(c.caption);
      if (!invalid.empty()) {
        report(where + ": caption is not valid UTF-8 " + invalid);
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
      CaptionedItem item{c.image.string(), c.caption, c.condition.string(), c.origin, image.size(0),
                         image.size(1)};
      if (check) {
        const auto problem = check(item, image, *this);
        if (!problem.empty()) {
          report(where + ": " + problem);
          continue;
        }
      }
      items_.push_back(std::move(item));
      if (options_.cache_images()) cache_.push_back(resize_short_side(image, r));
    }
  }

  void report(const std::string& message) {
    TORCH_CHECK(options_.bad_data() != BadDataPolicy::fatal, "dataset '", root_.string(),
                "': ", message, " (bad data is fatal here: --bad-data fatal)");
    problems_.push_back(message);
  }

  std::filesystem::path root_;
  DatasetOptions options_;
  DatasetLayout layout_ = DatasetLayout::txt;
  std::filesystem::path base_folder_;
  std::vector<CaptionedItem> items_;
  std::vector<torch::Tensor> cache_;  // [h, w, 3] uint8, short side R, when cache_images
  std::vector<std::string> problems_;
};

// ---- captions the text encoder cuts ----------------------------------------------------------

/// The captions of a dataset that are longer than the text encoder reads.
struct CutCaptions {
  int64_t count = 0;  ///< how many of them there are
  std::string first;  ///< the first, as messages name an item: "'a.png' (train.csv line 4)"
};

/// The captions of `items` that `tokenizer` cuts to its `max_length()` (`CLIPTokenizer::cuts`).
inline CutCaptions find_cut_captions(const std::vector<CaptionedItem>& items,
                                     const sd::CLIPTokenizer& tokenizer) {
  CutCaptions cut;
  for (const auto& item : items) {
    if (!tokenizer.cuts(item.caption)) continue;
    if (cut.count++ == 0) cut.first = detail::item_name(item.file, item.origin);
  }
  return cut;
}

/// Says once, before training, how many captions of `items` the text encoder sees only in part:
/// "data: 3 captions are longer than 77 tokens and are cut (first: 'a.png' (train.csv line 4))";
/// nothing when none is. Training on them is allowed (the reference trainers cut them too).
inline void report_cut_captions(const std::vector<CaptionedItem>& items,
                                const sd::CLIPTokenizer& tokenizer) {
  const auto cut = find_cut_captions(items, tokenizer);
  if (cut.count == 0) return;
  std::printf("data: %lld caption%s longer than %lld tokens and %s cut (first: %s)\n",
              static_cast<long long>(cut.count), cut.count == 1 ? " is" : "s are",
              static_cast<long long>(tokenizer.max_length()), cut.count == 1 ? "is" : "are",
              cut.first.c_str());
}

}  // namespace common
