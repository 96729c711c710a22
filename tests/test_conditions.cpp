// Condition images for controllable generation (examples/common/conditions.hpp), the datasets of
// (image, condition, caption) (conditioned_dataset.hpp) and the demo control data
// (demo_data.hpp): the builders on inputs whose answer is known without the code under test,
// image and condition cut alike, each layout read, bad conditions refused naming the file.

#include <common/conditioned_dataset.hpp>
#include <common/conditions.hpp>
#include <common/dataset.hpp>
#include <common/demo_data.hpp>
#include <common/image.hpp>
#include <common/png.hpp>
#include <sd/stable_diffusion.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

using scedit_test::random_image;
using scedit_test::read_file;
using scedit_test::write_file;

class ConditionsTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  scedit_test::TempDir scratch_{"conditions"};
  const fs::path& dir_ = scratch_.path();
};

constexpr int64_t R = 24;  // dataset resolution in these tests

/// uint8 [h, w, 3] of one colour.
torch::Tensor flat(int64_t h, int64_t w, std::vector<int64_t> rgb) {
  return torch::tensor(rgb, torch::kLong).to(torch::kUInt8).view({1, 1, 3}).expand({h, w, 3}).contiguous();
}

/// A `background` image with the rectangle rows [top, bottom) x columns [left, right) in `fill`.
torch::Tensor rectangle(int64_t h, int64_t w, int64_t top, int64_t bottom, int64_t left, int64_t right,
                        std::vector<int64_t> background, std::vector<int64_t> fill) {
  auto image = flat(h, w, std::move(background));
  image.slice(0, top, bottom).slice(1, left, right).copy_(flat(bottom - top, right - left, std::move(fill)));
  return image;
}

/// A coordinate-coded image [h, w, 3]: red grows with the column, green with the row, so that
/// every window, mirrored or not, is told apart.
torch::Tensor coordinates(int64_t h, int64_t w) {
  auto x = torch::arange(w, torch::kLong).mul(2).view({1, w}).expand({h, w});
  auto y = torch::arange(h, torch::kLong).mul(5).view({h, 1}).expand({h, w});
  return torch::stack({x, y, torch::full({h, w}, 50, torch::kLong)}, 2).to(torch::kUInt8).contiguous();
}

/// float [3, R, R] in [0, 1] or [-1, 1] -> uint8 [R, R, 3].
torch::Tensor pixels_of_condition(const torch::Tensor& c) { return sd::condition_to_uint8(c); }
torch::Tensor pixels_of_image(const torch::Tensor& i) { return sd::to_uint8(i); }

void write_jsonl(const fs::path& file, const std::vector<std::string>& records) {
  std::string text;
  for (const auto& r : records) text += r + "\n";
  write_file(file, text);
}

std::string record(const std::string& image, const std::string& condition, const std::string& text) {
  nlohmann::json j{{"file_name", image}, {"text", text}};
  if (!condition.empty()) j["conditioning_image"] = condition;
  return j.dump();
}

}  // namespace

// ---- kinds -----------------------------------------------------------------------------------

TEST(ConditionKind, ParsesTheComputedKindsAndRefusesOthersNamingTheChoices) {
  EXPECT_EQ(common::parse_condition_kind("canny"), common::ConditionKind::canny);
  EXPECT_EQ(common::parse_condition_kind("colour"), common::ConditionKind::colour);
  EXPECT_EQ(common::parse_condition_kind("inpaint"), common::ConditionKind::inpaint);
  for (auto kind : {common::ConditionKind::canny, common::ConditionKind::colour, common::ConditionKind::inpaint}) {
    EXPECT_EQ(common::parse_condition_kind(common::to_string(kind)), kind);
  }
  EXPECT_ERROR_MENTIONS(common::parse_condition_kind("depth"), "'depth' is not canny, colour or inpaint");
  EXPECT_ERROR_MENTIONS(common::parse_condition_kind("file"), "canny, colour or inpaint");
  EXPECT_ERROR_MENTIONS(common::make_condition(common::ConditionKind::file, random_image(8, 8), common::make_cpu_generator(0)),
                        "read_condition");
}

// ---- Canny -----------------------------------------------------------------------------------

#if defined(SCEDIT_WITH_OPENCV) && SCEDIT_WITH_OPENCV

TEST(Canny, EdgesOfAFilledRectangleLieOnItsBorderAndNowhereElse) {
  constexpr int64_t top = 16, bottom = 48, left = 20, right = 44;
  const auto image = rectangle(64, 64, top, bottom, left, right, {40, 60, 80}, {220, 200, 30});
  const auto edges = common::canny(image);
  ASSERT_EQ(edges.sizes(), (std::vector<int64_t>{64, 64, 3}));
  ASSERT_EQ(edges.scalar_type(), torch::kUInt8);
  EXPECT_TRUE(edges.select(2, 0).equal(edges.select(2, 1)) && edges.select(2, 0).equal(edges.select(2, 2)));
  const auto e = edges.select(2, 0).contiguous();
  EXPECT_TRUE(((e == 0) | (e == 255)).all().item<bool>());
  auto inside = [&](int64_t y, int64_t x) { return y >= top && y < bottom && x >= left && x < right; };
  // Every edge pixel touches the border: inside and outside pixels both in its 3 x 3 neighbourhood.
  auto a = e.accessor<uint8_t, 2>();
  for (int64_t y = 0; y < 64; ++y) {
    for (int64_t x = 0; x < 64; ++x) {
      if (a[y][x] == 0) continue;
      bool in = false, out = false;
      for (int64_t dy = -1; dy <= 1; ++dy) {
        for (int64_t dx = -1; dx <= 1; ++dx) (inside(y + dy, x + dx) ? in : out) = true;
      }
      EXPECT_TRUE(in && out) << "edge at row " << y << ", column " << x << " is off the border";
    }
  }
  // ... and the border is traced along its whole length: one edge pixel per row or column, at
  // least, on each side (between the rows or columns either side of it).
  for (int64_t x = left; x < right; ++x) {
    EXPECT_GT(a[top - 1][x] + a[top][x], 0) << "top side, column " << x;
    EXPECT_GT(a[bottom - 1][x] + a[bottom][x], 0) << "bottom side, column " << x;
  }
  for (int64_t y = top; y < bottom; ++y) {
    EXPECT_GT(a[y][left - 1] + a[y][left], 0) << "left side, row " << y;
    EXPECT_GT(a[y][right - 1] + a[y][right], 0) << "right side, row " << y;
  }
  EXPECT_EQ(common::canny(flat(32, 40, {90, 90, 90})).sum().item<int64_t>(), 0);  // nothing to find
}

TEST(Canny, ThresholdsAre100And200OnTheL1SobelGradientOfTheStrongestChannel) {
  // A step of c in one channel: the 3 x 3 Sobel's |dx| + |dy| is 4c along a side and 6c at a
  // corner. c = 20: 80, below 100: no edge. c = 30: 120 along the sides, 180 at the corners,
  // weak everywhere and strong nowhere: no edge. c = 45: 180 along the sides (weak) and 270 at
  // the corners (strong): hysteresis carries the corners along the whole border.
  auto count = [](int64_t c) {
    const auto image = rectangle(48, 48, 12, 36, 12, 36, {100, 100, 100}, {100, 100 + c, 100});
    return (common::canny(image).select(2, 0) > 0).sum().item<int64_t>();
  };
  EXPECT_EQ(count(20), 0);
  EXPECT_EQ(count(30), 0);
  EXPECT_GE(count(45), 4 * 24 - 4);
  EXPECT_GE(count(60), 4 * 24 - 4);
}

#else  // no OpenCV in this build

TEST(Canny, RefusesWithoutOpenCVNamingThePackage) {
  EXPECT_FALSE(common::canny_available());
  EXPECT_ERROR_MENTIONS(common::canny(random_image(16, 16)), "libopencv-imgproc-dev");
  EXPECT_ERROR_MENTIONS(common::require_canny(), "needs OpenCV");
  scedit_test::TempDir scratch("canny");
  common::write_png(scratch.file("a.png"), random_image(R, R));
  write_file(scratch.path() / "a.txt", "a caption");
  EXPECT_ERROR_MENTIONS(common::ConditionedImageDataset(scratch.path(),
                            common::ConditionSource::computed(common::ConditionKind::canny), R),
                        "libopencv-imgproc-dev");
}

#endif

// ---- colour map ------------------------------------------------------------------------------

TEST(ColourMap, TwoColourImageGivesExactBlocks) {
  // 64-aligned blocks of two colours come back as they are.
  const std::vector<int64_t> a{200, 30, 60}, b{10, 120, 250};
  auto blocks = flat(128, 192, a);
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      if ((i + j) % 2 == 1) blocks.slice(0, 64 * i, 64 * i + 64).slice(1, 64 * j, 64 * j + 64).copy_(flat(64, 64, b));
    }
  }
  const auto map = common::colour_map(blocks);
  ASSERT_EQ(map.sizes(), blocks.sizes());
  EXPECT_TRUE(map.equal(blocks));
  // A boundary off the grid (column 40): each 64 x 64 block takes the colour around its centre,
  // exactly, whatever else it holds.
  const auto split = rectangle(64, 128, 0, 64, 0, 40, b, a);
  EXPECT_TRUE(common::colour_map(split).equal(rectangle(64, 128, 0, 64, 0, 64, b, a)));
  // Bicubic (a = -0.75, half-pixel centres): block 0 samples columns 30 to 33 around 31.5; with
  // the boundary at 33 the tap at distance 1.5 (weight -0.09375) overshoots away from b.
  const auto overshoot = common::colour_map(rectangle(64, 128, 0, 64, 0, 33, b, a));
  EXPECT_TRUE(overshoot.equal(rectangle(64, 128, 0, 64, 0, 64, b, {218, 22, 42}))) << overshoot[0][0];
  // Smaller than a block: one flat colour.
  const auto small = common::colour_map(random_image(40, 50, 3));
  EXPECT_TRUE(small.equal(small[0][0].view({1, 1, 3}).expand({40, 50, 3})));
}

// ---- inpainting ------------------------------------------------------------------------------

TEST(Inpaint, SetsExactlyTheMaskedPixelsToMidGrey) {
  const auto image = random_image(32, 40, 4);
  const auto masked = torch::rand({32, 40}) < 0.3;  // bool [H, W]
  const auto mask = masked.to(torch::kUInt8).mul(255);
  for (const auto& form : {mask, mask.unsqueeze(2), mask.unsqueeze(2).expand({32, 40, 3}).contiguous()}) {
    const auto result = common::inpaint_condition(image, form);
    EXPECT_TRUE(result.mask.equal(mask));
    const auto where = masked.unsqueeze(2).expand({32, 40, 3});
    EXPECT_TRUE((result.image.masked_select(where) == common::kInpaintFill).all().item<bool>());
    EXPECT_TRUE(result.image.masked_select(~where).equal(image.masked_select(~where)));
  }
  EXPECT_EQ(common::kInpaintFill, 127);
  // 128 and above is masked: an antialiased edge reads as drawn.
  const auto soft = torch::tensor({0, 127, 128, 255}, torch::kLong).to(torch::kUInt8).view({1, 4});
  EXPECT_TRUE(common::binary_mask(soft).equal(torch::tensor({0, 0, 255, 255}, torch::kLong).to(torch::kUInt8).view({1, 4})));
  EXPECT_ERROR_MENTIONS(common::inpaint_condition(image, mask.slice(0, 0, 31)), "they must line up");
  EXPECT_ERROR_MENTIONS(common::inpaint_condition(image, masked), "uint8");
}

TEST_F(ConditionsTest, MaskFilesAreReadAtTheImagesSizeOnly) {
  const auto mask = rectangle(16, 24, 4, 12, 5, 20, {0, 0, 0}, {255, 255, 255}).select(2, 0).contiguous();
  common::write_png((dir_ / "mask.png").string(), mask.unsqueeze(2));  // grey PNG
  EXPECT_TRUE(common::read_mask(dir_ / "mask.png", 16, 24).equal(mask));
  EXPECT_ERROR_MENTIONS(common::read_mask(dir_ / "mask.png", 16, 32), "mask.png");
  EXPECT_ERROR_MENTIONS(common::read_mask(dir_ / "mask.png", 16, 32), "is 24x16, its image 32x16");
  EXPECT_ERROR_MENTIONS(common::read_mask(dir_ / "none.png", 16, 24), "none.png");
}

TEST(Inpaint, RandomMasksAreAPureFunctionOfTheSeedAndCoverASensibleFraction) {
  double total = 0;
  std::set<std::string> distinct;
  constexpr int seeds = 32;
  for (int seed = 0; seed < seeds; ++seed) {
    const auto a = common::random_inpaint_mask(64, 80, common::make_cpu_generator(seed));
    const auto b = common::random_inpaint_mask(64, 80, common::make_cpu_generator(seed));
    ASSERT_EQ(a.sizes(), (std::vector<int64_t>{64, 80}));
    ASSERT_EQ(a.scalar_type(), torch::kUInt8);
    EXPECT_TRUE(a.equal(b)) << "seed " << seed;
    EXPECT_TRUE(((a == 0) | (a == 255)).all().item<bool>());
    const double fraction = (a > 0).to(torch::kFloat64).mean().item<double>();
    EXPECT_GT(fraction, 0.02) << "seed " << seed;
    EXPECT_LT(fraction, 0.8) << "seed " << seed;
    total += fraction;
    distinct.insert(scedit_test::tensor_bytes(a));
  }
  EXPECT_EQ(distinct.size(), static_cast<size_t>(seeds));
  EXPECT_GT(total / seeds, 0.1);
  EXPECT_LT(total / seeds, 0.45);
  // The generator advances: two masks in a row differ.
  auto generator = common::make_cpu_generator(7);
  const auto first = common::random_inpaint_mask(32, 32, generator);
  EXPECT_FALSE(first.equal(common::random_inpaint_mask(32, 32, generator)));
  EXPECT_EQ(common::random_inpaint_mask(1, 1, common::make_cpu_generator(0)).item<int>(), 255);
}

// ---- maps from files and the CSC-Tuner's range -----------------------------------------------

TEST_F(ConditionsTest, ReadConditionTakesAnyImageAsGivenAndRefusesBadOnesNamingTheFile) {
  const auto rgb = random_image(16, 24, 5);
  common::write_png((dir_ / "map.png").string(), rgb);
  EXPECT_TRUE(common::read_condition(dir_ / "map.png", 16, 24).equal(rgb));
  const auto grey = random_image(16, 24, 6).select(2, 0).contiguous();
  common::write_png((dir_ / "grey.png").string(), grey.unsqueeze(2));
  EXPECT_TRUE(common::read_condition(dir_ / "grey.png", 16, 24).equal(grey.unsqueeze(2).expand({16, 24, 3})));
  auto rgba = torch::cat({rgb, torch::full({16, 24, 1}, 255, torch::kUInt8)}, 2);
  common::write_png((dir_ / "opaque.png").string(), rgba);
  EXPECT_TRUE(common::read_condition(dir_ / "opaque.png", 16, 24).equal(rgb));

  rgba[3][4][3] = 0;
  common::write_png((dir_ / "transparent.png").string(), rgba);
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "transparent.png", 16, 24), "transparent.png");
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "transparent.png", 16, 24), "1 transparent pixels");
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "map.png", 16, 32), "map.png");
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "map.png", 16, 32), "is 24x16, the image it conditions 32x16");
  common::write_png((dir_ / "odd.png").string(), random_image(16, 20));
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "odd.png", 16, 20), "odd.png");
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "odd.png", 16, 20), "multiples of 8");
  write_file(dir_ / "garbage.png", "not an image at all");
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "garbage.png", 16, 24), "garbage.png");
  EXPECT_ERROR_MENTIONS(common::read_condition(dir_ / "missing.png", 16, 24), "missing.png");
}

TEST(ConditionRange, ConditionToFloatIsCHWInZeroToOneAndInverts) {
  const auto image = random_image(8, 16, 9);
  const auto f = sd::condition_to_float(image);
  ASSERT_EQ(f.sizes(), (std::vector<int64_t>{3, 8, 16}));
  EXPECT_EQ(f.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::allclose(f[1][2][3], image[2][3][1].to(torch::kFloat32) / 255.0));
  EXPECT_GE(f.min().item<float>(), 0.0f);
  EXPECT_LE(f.max().item<float>(), 1.0f);
  EXPECT_TRUE(sd::condition_to_uint8(f).equal(image));
  const auto batch = sd::condition_to_float(torch::stack({image, image}));
  EXPECT_EQ(batch.sizes(), (std::vector<int64_t>{2, 3, 8, 16}));
  EXPECT_TRUE(sd::condition_to_uint8(batch)[1].equal(image));
  EXPECT_ERROR_MENTIONS(sd::condition_to_float(image.to(torch::kFloat32)), "uint8");
}

// ---- datasets --------------------------------------------------------------------------------

TEST_F(ConditionsTest, ControlNetLayoutIsReadWithItsConditions) {
  fs::create_directories(dir_ / "images");
  fs::create_directories(dir_ / "conditioning");
  std::vector<torch::Tensor> conditions;
  std::vector<std::string> records;
  for (int i = 0; i < 3; ++i) {
    const auto name = std::to_string(i) + ".png";
    common::write_png((dir_ / "images" / name).string(), random_image(R + 8, R + 16, 20 + i));
    conditions.push_back(random_image(R + 8, R + 16, 30 + i));
    common::write_png((dir_ / "conditioning" / name).string(), conditions.back());
    records.push_back(record("images/" + name, "conditioning/" + name, "caption " + std::to_string(i)));
  }
  write_jsonl(dir_ / "metadata.jsonl", records);
  const auto options = common::DatasetOptions(R).center_crop(true);
  common::ConditionedImageDataset data(dir_, common::ConditionSource::listed(), options);
  EXPECT_EQ(data.images().layout(), common::DatasetLayout::jsonl);
  ASSERT_EQ(data.size(), 3);
  EXPECT_EQ(data.skipped(), 0);
  common::CaptionedImageDataset plain(dir_, options);  // the same folder, conditions ignored
  auto generator = common::make_cpu_generator(0);
  for (int64_t i = 0; i < 3; ++i) {
    const auto sample = data.get(i, generator);
    EXPECT_EQ(sample.caption, "caption " + std::to_string(i));
    ASSERT_EQ(sample.conditions.size(), 1u);
    EXPECT_EQ(sample.conditions[0].sizes(), (std::vector<int64_t>{3, R, R}));
    const auto expected = common::center_crop(common::resize_short_side(conditions[static_cast<size_t>(i)], R), R, R);
    EXPECT_TRUE(sample.conditions[0].equal(sd::condition_to_float(expected)));
    EXPECT_TRUE(sample.image.equal(plain.get(i, generator).image));
    EXPECT_TRUE(plain.get(i, generator).conditions.empty());
    EXPECT_NE(plain.items()[static_cast<size_t>(i)].condition.find("conditioning"), std::string::npos);
  }
  // Cached, the same samples.
  common::ConditionedImageDataset cached(dir_, common::ConditionSource::listed(), common::DatasetOptions(options).cache_images(true));
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(cached.get(i, generator).conditions[0].equal(data.get(i, generator).conditions[0]));
  }
}

TEST_F(ConditionsTest, ParallelFolderIsReadWithTxtCaptionsAndWithACsv) {
  // txt layout: the condition of a.png is conditions/a.png.
  const fs::path images = dir_ / "photos", maps = dir_ / "depth";
  fs::create_directories(images);
  fs::create_directories(maps);
  for (const std::string name : {"a", "b"}) {
    common::write_png((images / (name + ".png")).string(), random_image(R, R + 8));
    write_file(images / (name + ".txt"), "photo " + name);
    common::write_png((maps / (name + ".png")).string(), flat(R, R + 8, {name == "a" ? 10 : 20, 0, 0}));
  }
  auto options = common::DatasetOptions(R).center_crop(true);
  common::ConditionedImageDataset txt(images, common::ConditionSource::parallel_folder(maps), options);
  ASSERT_EQ(txt.size(), 2);
  auto generator = common::make_cpu_generator(0);
  EXPECT_EQ(txt.get(1, generator).caption, "photo b");
  EXPECT_EQ(pixels_of_condition(txt.get(1, generator).conditions[0])[5][5][0].item<int>(), 20);
  EXPECT_EQ(txt.items()[0].condition, (maps / "a.png").string());

  // A CSV listing images/x.png: its condition is <folder>/images/x.png.
  const fs::path root = dir_ / "csv", csv_maps = dir_ / "csv_maps";
  fs::create_directories(root / "images");
  fs::create_directories(csv_maps / "images");
  common::write_png((root / "images" / "x.png").string(), random_image(R, R));
  common::write_png((csv_maps / "images" / "x.png").string(), flat(R, R, {0, 77, 0}));
  write_file(root / "train.csv", "Image:FILE,Text\nimages/x.png,\"an x, alone\"\n");
  common::ConditionedImageDataset csv(root, common::ConditionSource::parallel_folder(csv_maps), options);
  ASSERT_EQ(csv.size(), 1);
  const auto sample = csv.get(0, generator);
  EXPECT_EQ(sample.caption, "an x, alone");
  EXPECT_TRUE(pixels_of_condition(sample.conditions[0]).equal(flat(R, R, {0, 77, 0})));

  EXPECT_ERROR_MENTIONS(common::ConditionedImageDataset(images, common::ConditionSource::parallel_folder(dir_ / "nowhere"), options),
                        "nowhere");
}

TEST_F(ConditionsTest, ComputedConditionsComeFromTheSamplesOwnPixels) {
  for (int i = 0; i < 2; ++i) {
    common::write_png((dir_ / (std::to_string(i) + ".png")).string(), rectangle(R + 8, R, 6, 20, 5, 18, {30, 30, 30}, {240, 200, 10}));
    write_file(dir_ / (std::to_string(i) + ".txt"), "a box");
  }
  const auto options = common::DatasetOptions(R).center_crop(true);
  auto kinds = std::vector<common::ConditionKind>{common::ConditionKind::colour, common::ConditionKind::inpaint};
  if (common::canny_available()) kinds.push_back(common::ConditionKind::canny);
  for (auto kind : kinds) {
    common::ConditionedImageDataset data(dir_, common::ConditionSource::computed(kind), options);
    ASSERT_EQ(data.size(), 2);
    auto g1 = common::make_cpu_generator(5), g2 = common::make_cpu_generator(5);
    const auto sample = data.get(1, g1);
    const auto pixels = pixels_of_image(sample.image);
    ASSERT_EQ(sample.conditions.size(), 1u);
    // Centre crop, no flip: the only draws are the mask's.
    const auto expected = common::make_condition(kind, pixels, g2);
    EXPECT_TRUE(pixels_of_condition(sample.conditions[0]).equal(expected)) << common::to_string(kind);
  }
  // The inpainting mask differs from draw to draw, and covers something.
  common::ConditionedImageDataset inpaint(dir_, common::ConditionSource::computed(common::ConditionKind::inpaint), options);
  auto generator = common::make_cpu_generator(1);
  const auto a = pixels_of_condition(inpaint.get(0, generator).conditions[0]);
  const auto b = pixels_of_condition(inpaint.get(0, generator).conditions[0]);
  EXPECT_FALSE(a.equal(b));
  EXPECT_GT((a == common::kInpaintFill).sum().item<int64_t>(), 0);
}

TEST_F(ConditionsTest, ConditionIsCutWithTheImagesCropAndFlip) {
  // Image and condition files hold the same coordinate-coded pixels: whatever window and mirror a
  // sample draws, its condition's pixels are its image's.
  const auto coded = coordinates(40, 90);
  common::write_png((dir_ / "img.png").string(), coded);
  common::write_png((dir_ / "map.png").string(), coded);
  common::write_png((dir_ / "big.png").string(), common::resize(coded, 80, 180));  // 2x: resized alike
  write_jsonl(dir_ / "metadata.jsonl", {record("img.png", "map.png", "same"), record("img.png", "big.png", "twice the size")});
  const auto resized = common::resize_short_side(coded, R);
  for (bool cache : {false, true}) {
    common::ConditionedImageDataset data(dir_, common::ConditionSource::listed(),
                                         common::DatasetOptions(R).random_flip(true).cache_images(cache));
    ASSERT_EQ(data.size(), 2);
    auto generator = common::make_cpu_generator(3);
    std::set<std::pair<int64_t, bool>> views;
    for (int draw = 0; draw < 24; ++draw) {
      const auto sample = data.get(draw % 2, generator);
      const auto image = pixels_of_image(sample.image);
      const auto condition = pixels_of_condition(sample.conditions[0]);
      if (draw % 2 == 0) {
        EXPECT_TRUE(condition.equal(image)) << "draw " << draw;
      } else {  // resized from another size: the same window, up to the filter's rounding
        EXPECT_LT((condition.to(torch::kInt) - image.to(torch::kInt)).abs().max().item<int>(), 6) << "draw " << draw;
      }
      for (int64_t left = 0; left + R <= resized.size(1); ++left) {
        const auto window = resized.slice(1, left, left + R);
        if (window.equal(image)) views.insert({left, false});
        if (common::hflip(window).equal(image)) views.insert({left, true});
      }
    }
    std::set<bool> flips;
    for (const auto& v : views) flips.insert(v.second);
    EXPECT_GT(views.size(), 5u);
    EXPECT_EQ(flips.size(), 2u);
  }
}

// SDXL's size conditioning of each sample says what was done to it, as diffusers'
// train_text_to_image_sdxl.py records it: the image's size before the resize, the target R x R,
// and the window's top left in the resized image (in the mirrored image when mirrored: diffusers
// mirrors, then crops). Checked against the coordinate-coded pixels each sample shows.
TEST_F(ConditionsTest, EachSampleRecordsItsOriginalSizeAndItsCrop) {
  const auto coded = coordinates(40, 90);
  common::write_png((dir_ / "img.png").string(), coded);
  common::write_png((dir_ / "map.png").string(), coded);
  write_jsonl(dir_ / "metadata.jsonl", {record("img.png", "map.png", "same")});
  const auto resized = common::resize_short_side(coded, R);
  for (bool cache : {false, true}) {
    common::ConditionedImageDataset data(dir_, common::ConditionSource::listed(),
                                         common::DatasetOptions(R).random_flip(true).cache_images(cache));
    auto generator = common::make_cpu_generator(5);
    std::set<std::pair<int64_t, bool>> views;
    for (int draw = 0; draw < 16; ++draw) {
      const auto sample = data.get(0, generator);
      const auto& size = sample.size;
      EXPECT_EQ(std::vector<int64_t>({size.original_height, size.original_width, size.target_height, size.target_width}),
                std::vector<int64_t>({40, 90, R, R}));
      EXPECT_EQ(size.crop_top, 0);  // the short side is the height: no room to move
      ASSERT_GE(size.crop_left, 0);
      ASSERT_LE(size.crop_left + R, resized.size(1));
      const auto image = pixels_of_image(sample.image);
      const bool plain = resized.slice(1, size.crop_left, size.crop_left + R).equal(image);
      const bool mirrored = common::hflip(resized).slice(1, size.crop_left, size.crop_left + R).equal(image);
      EXPECT_TRUE(plain || mirrored) << "draw " << draw << ": crop_left " << size.crop_left;
      views.insert({size.crop_left, mirrored});
    }
    EXPECT_GT(views.size(), 3u);
  }
}

TEST_F(ConditionsTest, BadConditionsAreSkippedOrFatalNamingTheFile) {
  common::write_png((dir_ / "img.png").string(), random_image(R, R + 8));
  common::write_png((dir_ / "good.png").string(), random_image(R, R + 8));
  common::write_png((dir_ / "wrong_size.png").string(), random_image(R, R + 16));
  auto rgba = torch::cat({random_image(R, R + 8), torch::full({R, R + 8, 1}, 255, torch::kUInt8)}, 2);
  rgba.select(2, 3).slice(0, 0, 4).fill_(0);
  common::write_png((dir_ / "wrong_channels.png").string(), rgba);
  write_file(dir_ / "unreadable.png", "\x89PNG and then nothing");
  common::write_png((dir_ / "small.png").string(), random_image(R / 2, (R + 8) / 2));
  const std::vector<std::string> bad{"wrong_size.png", "wrong_channels.png", "unreadable.png", "missing.png", "small.png"};
  std::vector<std::string> records{record("img.png", "good.png", "good")};
  for (const auto& b : bad) records.push_back(record("img.png", b, "bad: " + b));
  records.push_back(record("img.png", "", "no condition"));
  write_jsonl(dir_ / "metadata.jsonl", records);

  common::ConditionedImageDataset data(dir_, common::ConditionSource::listed(), R);
  EXPECT_EQ(data.size(), 1);
  ASSERT_EQ(data.skipped(), static_cast<int64_t>(bad.size()) + 1);
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_NE(data.problems()[i].find(bad[i]), std::string::npos) << data.problems()[i];
    EXPECT_NE(data.problems()[i].find("metadata.jsonl line " + std::to_string(i + 2)), std::string::npos) << data.problems()[i];
  }
  EXPECT_NE(data.problems()[0].find("they must line up"), std::string::npos) << data.problems()[0];
  EXPECT_NE(data.problems()[1].find("transparent"), std::string::npos) << data.problems()[1];
  EXPECT_NE(data.problems()[4].find("smaller than the resolution"), std::string::npos) << data.problems()[4];
  EXPECT_NE(data.problems().back().find("no conditioning_image"), std::string::npos) << data.problems().back();

  const auto fatal = common::DatasetOptions(R).bad_data(common::BadDataPolicy::fatal);
  for (const auto& b : bad) {
    write_jsonl(dir_ / "metadata.jsonl", {record("img.png", "good.png", "good"), record("img.png", b, "bad")});
    EXPECT_ERROR_MENTIONS(common::ConditionedImageDataset(dir_, common::ConditionSource::listed(), fatal), b);
  }
  // Upscaling small images upscales small conditions too.
  write_jsonl(dir_ / "metadata.jsonl", {record("img.png", "small.png", "small")});
  EXPECT_EQ(common::ConditionedImageDataset(dir_, common::ConditionSource::listed(), common::DatasetOptions(R).upscale_small(true)).size(), 1);
  // A folder in another layout has no conditioning_image to read.
  fs::create_directories(dir_ / "txt");
  fs::copy_file(dir_ / "img.png", dir_ / "txt" / "img.png");
  write_file(dir_ / "txt" / "img.txt", "an image");
  EXPECT_ERROR_MENTIONS(common::ConditionedImageDataset(dir_ / "txt", common::ConditionSource::listed(), fatal),
                        "no conditioning_image");
}

TEST_F(ConditionsTest, CaptionsOfTheControlNetLayoutAreCheckedAtTheScan) {
  common::write_png((dir_ / "img.png").string(), random_image(R, R));
  common::write_png((dir_ / "map.png").string(), random_image(R, R));
  const std::string not_utf8 = "\xff\xfe";  // bytes that never occur in UTF-8
  write_jsonl(dir_ / "metadata.jsonl",
              {record("img.png", "map.png", "good"),
               "{\"file_name\": \"img.png\", \"conditioning_image\": \"map.png\", \"text\": \"a " + not_utf8 + "\"}",
               "{\"file_name\": \"img.png\", \"conditioning_image\": 3, \"text\": \"a number for a map\"}"});
  common::ConditionedImageDataset data(dir_, common::ConditionSource::listed(), R);
  EXPECT_EQ(data.size(), 1);
  ASSERT_EQ(data.skipped(), 2);
  EXPECT_NE(data.problems()[0].find("metadata.jsonl line 2: the line is not valid UTF-8 at byte"), std::string::npos)
      << data.problems()[0];
  EXPECT_NE(data.problems()[1].find("metadata.jsonl line 3): conditioning_image is not a string (a number)"),
            std::string::npos) << data.problems()[1];
  const auto fatal = common::DatasetOptions(R).bad_data(common::BadDataPolicy::fatal);
  EXPECT_ERROR_MENTIONS(common::ConditionedImageDataset(dir_, common::ConditionSource::listed(), fatal),
                        "metadata.jsonl line 2");
}

// ---- the demo control dataset ----------------------------------------------------------------

TEST_F(ConditionsTest, DemoControlDatasetIsDeterministicAndReadable) {
  common::make_demo_control_dataset(dir_ / "a", 6, 48, 123);
  common::make_demo_control_dataset(dir_ / "b", 6, 48, 123);
  common::make_demo_control_dataset(dir_ / "c", 6, 48, 124);
  EXPECT_EQ(read_file(dir_ / "a" / "metadata.jsonl"), read_file(dir_ / "b" / "metadata.jsonl"));
  for (const auto& entry : fs::recursive_directory_iterator(dir_ / "a")) {
    if (!entry.is_regular_file()) continue;
    const auto other = dir_ / "b" / fs::relative(entry.path(), dir_ / "a");
    EXPECT_EQ(read_file(entry.path()), read_file(other)) << entry.path();
  }
  common::ConditionedImageDataset a(dir_ / "a", common::ConditionSource::listed(), common::DatasetOptions(48).center_crop(true));
  common::ConditionedImageDataset c(dir_ / "c", common::ConditionSource::listed(), common::DatasetOptions(48).center_crop(true));
  ASSERT_EQ(a.size(), 6);
  EXPECT_EQ(a.skipped(), 0);
  const std::regex caption("an? [a-z]+ [a-z]+ on an? [a-z]+ background");
  const std::regex position("left|right|top|bottom|centre|center|corner|small|large|big");
  auto generator = common::make_cpu_generator(0);
  bool any_difference = false;
  std::vector<double> centres;  // of the shapes' regions, along x
  for (int64_t i = 0; i < a.size(); ++i) {
    const auto sample = a.get(i, generator);
    EXPECT_TRUE(std::regex_match(sample.caption, caption)) << sample.caption;
    EXPECT_FALSE(std::regex_search(sample.caption, position)) << sample.caption;
    const auto image = pixels_of_image(sample.image).to(torch::kInt32);
    const auto layout = pixels_of_condition(sample.conditions[0]).to(torch::kInt32);
    // The layout: the background's colour (a corner: no shape reaches it) and the shape's region
    // in another colour, which the picture has there too (all but its outline and shadow).
    const auto background = layout[0][0];
    EXPECT_TRUE(image[0][0].equal(background)) << sample.file;
    const auto on = std::get<0>((layout - background).abs().max(2)) > 30;  // [48, 48]
    ASSERT_GT(on.sum().item<int64_t>(), 20) << sample.file;
    const auto same = std::get<0>((image - layout).abs().max(2)) <= 8;
    EXPECT_GT(same.masked_select(on).sum().item<int64_t>() * 2, on.sum().item<int64_t>()) << sample.file;
    const auto columns = torch::arange(48, torch::kLong).view({1, 48}).expand({48, 48});
    centres.push_back(columns.masked_select(on).to(torch::kFloat64).mean().item<double>());
    any_difference |= !sample.conditions[0].equal(c.get(i, generator).conditions[0]);
  }
  // The shapes are in different places.
  EXPECT_GT(*std::max_element(centres.begin(), centres.end()) - *std::min_element(centres.begin(), centres.end()), 4.0);
  EXPECT_TRUE(any_difference);    // another seed, other shapes
}
