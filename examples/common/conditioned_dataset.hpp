#pragma once
/// @file conditioned_dataset.hpp
/// @brief Datasets of (image, condition, caption) for controllable generation: a
/// `CaptionedImageDataset` (its layouts, validation, bad-data policy, crops and flips) whose
/// samples also carry one condition image, cut with the same window and mirror as the image.
///
/// The condition comes from one of three places (`ConditionSource`):
/// - **listed**: diffusers' ControlNet layout, `metadata.jsonl` with `file_name`,
///   `conditioning_image` and `text` (paths relative to the jsonl's folder);
/// - **a parallel folder**: any layout `CaptionedImageDataset` reads, and a folder holding a
///   condition image of the same name for each image — the path the listing gives, relative to
///   its folder (`images/a.png` -> `<folder>/images/a.png`; in the txt layout the file name);
/// - **computed** from the sample's image by a `ConditionKind` (canny, colour, inpaint), after
///   its crop and flip, as it would be from a picture of that size when generating.
///
/// A condition file is resized as its image is (short side to the resolution) and must then have
/// the image's size; a missing, undecodable or transparent one, one of another size, or one
/// smaller than the resolution (unless `upscale_small`) makes its item bad data, reported with
/// the condition's file name and skipped or fatal as `DatasetOptions::bad_data` says.

#include <common/conditions.hpp>
#include <common/dataset.hpp>
#include <common/image.hpp>

#include <sd/stable_diffusion.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace common {

/// Where each sample's condition image comes from (see the file comment).
struct ConditionSource {
  /// `file`: read from a condition image file; otherwise computed from the image by this kind.
  ConditionKind kind = ConditionKind::file;
  /// For `file`: the parallel folder of condition images; empty: the listing's
  /// `conditioning_image`.
  std::filesystem::path folder;

  /// The listing's `conditioning_image` (diffusers' ControlNet metadata.jsonl).
  static ConditionSource listed() { return {}; }
  /// The same-named files of a parallel folder.
  static ConditionSource parallel_folder(std::filesystem::path folder) {
    TORCH_CHECK(!folder.empty(), "ConditionSource::parallel_folder: no folder given");
    return {ConditionKind::file, std::move(folder)};
  }
  /// Computed from each sample's image (`make_condition`): canny, colour or inpaint.
  static ConditionSource computed(ConditionKind kind) {
    TORCH_CHECK(kind != ConditionKind::file, "ConditionSource::computed: a file condition is "
                "read (listed or parallel_folder), not computed");
    return {kind, {}};
  }
};

/// A captioned image dataset whose samples carry one condition image (see the file comment):
/// `get` returns the image float [3, R, R] in [-1, 1] and `conditions` = {float [3, R, R] in
/// [0, 1]}, both cut by one `SampleView`. Draws from the caller's generator, in order: the
/// window and mirror (as `CaptionedImageDataset::get`), then, for inpaint, the mask.
///
/// Example:
/// ```
/// common::ConditionedImageDataset data("fill50k/", common::ConditionSource::listed(),
///                                      common::DatasetOptions(512).center_crop(true));
/// ```
class ConditionedImageDataset : public ImageSource {
 public:
  /// Scans `root` as `CaptionedImageDataset` does and checks each item's condition file.
  /// Throws where that does, when a computed kind cannot run here (canny without OpenCV), when a
  /// parallel folder does not exist, or (fatal policy) on the first bad condition.
  ConditionedImageDataset(const std::filesystem::path& root, ConditionSource source,
                          DatasetOptions options = {})
      : source_(checked(std::move(source))),
        data_(root, std::move(options),
              [this](CaptionedItem& item, const torch::Tensor& image,
                     const CaptionedImageDataset& scanning) {
                return check_condition(item, image, scanning);
              }) {}

  /// Number of usable items.
  int64_t size() const override { return data_.size(); }
  /// Number of bad items left out (bad images and bad conditions).
  int64_t skipped() const { return data_.skipped(); }
  /// One message per bad item, naming the file at fault.
  const std::vector<std::string>& problems() const { return data_.problems(); }
  /// The usable items: image, caption, and (file conditions) the condition's path.
  const std::vector<CaptionedItem>& items() const { return data_.items(); }
  /// The captioned images underneath (layout, options; `TrainingRun::describe` prints them).
  const CaptionedImageDataset& images() const { return data_; }
  /// Where the conditions come from.
  const ConditionSource& source() const { return source_; }

  /// Sample `index` (0 <= index < size()) with its condition; random choices from `generator`
  /// (a CPU generator).
  CaptionedImage get(int64_t index, torch::Generator& generator) const override {
    const auto image = data_.resized(index);  // [h, w, 3], short side R
    const auto view = data_.draw_view(image.size(0), image.size(1), generator);
    const auto pixels = apply_view(image, view);  // [R, R, 3]
    const auto& item = data_.items()[static_cast<size_t>(index)];
    const auto condition = source_.kind == ConditionKind::file
                               ? apply_view(resized_condition(index), view)
                               : make_condition(source_.kind, pixels, generator);
    return CaptionedImage{sd::to_float(pixels), item.caption, item.file,
                          {sd::condition_to_float(condition)},  // [3, R, R] each
                          data_.size_conditioning(index, image, view)};
  }

  /// The image's key (`CaptionedImageDataset::sample_key`), then its condition's file relative
  /// to the data folder, or the kind that computes it.
  std::string sample_key(int64_t index) const override {
    const auto& item = data_.items().at(static_cast<size_t>(index));
    const auto condition = source_.kind == ConditionKind::file ? data_.relative_name(item.condition)
                                                               : to_string(source_.kind);
    return data_.sample_key(index) + "\t" + condition;
  }

 private:
  static ConditionSource checked(ConditionSource source) {
    if (source.kind == ConditionKind::canny) require_canny();
    std::error_code error;
    TORCH_CHECK(source.folder.empty() || std::filesystem::is_directory(source.folder, error),
                "condition folder '", source.folder.string(), "' does not exist");
    return source;
  }

  // The ItemCheck: finds the item's condition file, decodes it, checks its size against the
  // image's; caches it resized when the images are cached. `scanning` is data_ under
  // construction, reached through the reference its constructor passes.
  std::string check_condition(CaptionedItem& item, const torch::Tensor& image,
                              const CaptionedImageDataset& scanning) {
    if (source_.kind != ConditionKind::file) return "";
    const auto& options = scanning.options();
    if (!source_.folder.empty()) {
      const auto relative =
          std::filesystem::path(item.file).lexically_relative(scanning.base_folder());
      item.condition = (source_.folder / relative).string();
    }
    if (item.condition.empty()) {
      return "no conditioning_image in its record (the ControlNet layout: metadata.jsonl with "
             "file_name, conditioning_image and text)";
    }
    const std::string name = "condition image '" + item.condition + "'";
    std::error_code error;
    if (!std::filesystem::is_regular_file(item.condition, error)) return name + ": missing file";
    torch::Tensor condition;
    try {
      condition = decode_condition(read_file_bytes(item.condition), item.condition);
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();  // names the file
    }
    const int64_t r = options.resolution();
    const int64_t h = condition.size(0), w = condition.size(1);
    const auto size = [](int64_t height, int64_t width) {
      return std::to_string(width) + "x" + std::to_string(height);
    };
    if (std::min(h, w) < r && !options.upscale_small()) {
      return name + " is " + size(h, w) + ", smaller than the resolution " + std::to_string(r) +
             " on its short side";
    }
    const auto wanted = short_side_size(image.size(0), image.size(1), r);
    const auto got = short_side_size(h, w, r);
    if (got != wanted) {
      return name + " is " + size(h, w) + " (" + size(got.first, got.second) +
             " at the resolution), its image " + size(image.size(0), image.size(1)) + " (" +
             size(wanted.first, wanted.second) + "): they must line up";
    }
    if (options.cache_images()) cache_.push_back(resize_short_side(condition, r));
    return "";
  }

  torch::Tensor resized_condition(int64_t index) const {
    if (data_.options().cache_images()) return cache_[static_cast<size_t>(index)];
    const auto& file = data_.items()[static_cast<size_t>(index)].condition;
    return resize_short_side(decode_condition(read_file_bytes(file), file),
                             data_.options().resolution());
  }

  ConditionSource source_;
  std::vector<torch::Tensor> cache_;  // uint8 [h, w, 3], short side R, when cache_images
  CaptionedImageDataset data_;  // last: its scan calls check_condition, which uses the above
                                // (the check is not kept: copies and moves are safe)
};

}  // namespace common
