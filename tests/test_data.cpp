// Tests of the examples' shared data code: image I/O (common/image.hpp), the captioned image
// dataset and the demo dataset (common/dataset.hpp), the loss plot and CSV (common/plot.hpp).

#include <common/dataset.hpp>
#include <common/image.hpp>
#include <common/plot.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

// ---- independent helpers (no code under test) ------------------------------------------------

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void spit(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

uint32_t be32(const std::string& s, size_t at) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data()) + at;
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
}

/// Bitwise CRC-32 (PNG), written independently of common::crc32's table.
uint32_t bitwise_crc32(const std::string& s) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char ch : s) {
    crc ^= ch;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

struct Header {
  int64_t width = 0, height = 0;
  bool grey = false;
};

/// Width, height and greyness from a PNG's IHDR or a JPEG's SOF marker.
Header image_header(const fs::path& path) {
  const std::string s = slurp(path);
  Header h;
  if (s.size() > 26 && s.compare(1, 3, "PNG") == 0) {
    h.width = be32(s, 16);
    h.height = be32(s, 20);
    const int colour_type = static_cast<unsigned char>(s[25]);
    h.grey = colour_type == 0 || colour_type == 4;
    return h;
  }
  size_t i = 2;  // after SOI
  while (i + 9 < s.size()) {
    if (static_cast<unsigned char>(s[i]) != 0xFF) {
      ++i;
      continue;
    }
    const int marker = static_cast<unsigned char>(s[i + 1]);
    const size_t length = (static_cast<unsigned char>(s[i + 2]) << 8) |
                          static_cast<unsigned char>(s[i + 3]);
    if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      h.height = (static_cast<unsigned char>(s[i + 5]) << 8) | static_cast<unsigned char>(s[i + 6]);
      h.width = (static_cast<unsigned char>(s[i + 7]) << 8) | static_cast<unsigned char>(s[i + 8]);
      h.grey = static_cast<unsigned char>(s[i + 9]) == 1;
      return h;
    }
    i += 2 + length;
  }
  return h;
}

/// The message of what `f` throws ("" when it does not throw).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_ERROR_MENTIONS(statement, text)                                         \
  do {                                                                                 \
    const std::string message_ = error_of([&] { (void)(statement); });                         \
    EXPECT_FALSE(message_.empty()) << #statement " did not throw";                     \
    EXPECT_NE(message_.find(text), std::string::npos) << "message: " << message_;      \
  } while (0)

/// An image whose pixel (y, x) is (y, x, 7): each position is recognisable (H, W <= 256).
torch::Tensor coordinate_image(int64_t h, int64_t w) {
  auto ys = torch::arange(h).view({h, 1}).expand({h, w});
  auto xs = torch::arange(w).view({1, w}).expand({h, w});
  return torch::stack({ys, xs, torch::full({h, w}, 7, torch::kLong)}, 2).to(torch::kUInt8);
}

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    std::random_device device;
    dir_ = fs::temp_directory_path() /
           ("scedit_test_data_" + std::to_string(device()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  /// A seeded random uint8 image [h, w, 3].
  torch::Tensor random_image(int64_t h, int64_t w, uint64_t seed = 1) {
    auto generator = common::make_cpu_generator(seed);
    return torch::randint(0, 256, {h, w, 3}, generator, torch::kLong).to(torch::kUInt8);
  }
  fs::path dir_;
};

std::vector<std::string> captions_of(const common::CaptionedImageDataset& data) {
  std::vector<std::string> out;
  for (const auto& item : data.items()) out.push_back(item.caption);
  return out;
}

// ---- image I/O -------------------------------------------------------------------------------

TEST_F(DataTest, ReadImageGivesEachSamplePhotographItsHeaderSizeAsRgb) {
  int png_rgb = 0, png_grey = 0, jpeg = 0;
  for (const auto& entry : fs::directory_iterator(scedit_test::data_dir() / "images")) {
    const auto ext = entry.path().extension().string();
    if (ext != ".png" && ext != ".jpg" && ext != ".jpeg") continue;
    const Header header = image_header(entry.path());
    ASSERT_GT(header.width, 0) << entry.path();
    const auto image = common::read_image(entry.path().string());
    EXPECT_EQ(image.scalar_type(), torch::kUInt8);
    EXPECT_EQ(image.sizes(), (std::vector<int64_t>{header.height, header.width, 3}))
        << entry.path();
    if (header.grey) {  // grey is replicated into the three channels
      EXPECT_TRUE(image.select(2, 0).equal(image.select(2, 1))) << entry.path();
      EXPECT_TRUE(image.select(2, 0).equal(image.select(2, 2))) << entry.path();
    } else {
      EXPECT_FALSE(image.select(2, 0).equal(image.select(2, 1))) << entry.path();
    }
    (ext == ".png" ? (header.grey ? png_grey : png_rgb) : jpeg) += 1;
  }
  EXPECT_GE(png_rgb, 1);
  EXPECT_GE(png_grey, 1);
  EXPECT_GE(jpeg, 1);
}

TEST_F(DataTest, ReadImageDecodesAHandBuiltRgbaPngAndDropsAlpha) {
  // A 3x2 RGBA PNG built here byte by byte: zlib stream of one stored deflate block.
  const int w = 3, h = 2;
  std::string raw;
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);  // filter: none
    for (int x = 0; x < w; ++x) {
      for (int v : {10 + 40 * x, 20 + 90 * y, 200 - 30 * x - 50 * y, 60 * x + 10}) {
        raw.push_back(static_cast<char>(v));
      }
    }
  }
  uint32_t a = 1, b = 0;  // Adler-32
  for (unsigned char ch : raw) {
    a = (a + ch) % 65521;
    b = (b + a) % 65521;
  }
  std::string zlib("\x78\x01\x01", 3);
  const uint16_t len = static_cast<uint16_t>(raw.size());
  for (uint16_t v : {len, static_cast<uint16_t>(~len)}) {
    zlib.push_back(static_cast<char>(v & 0xFF));
    zlib.push_back(static_cast<char>(v >> 8));
  }
  zlib += raw;
  auto put32 = [](std::string& s, uint32_t v) {
    for (int shift : {24, 16, 8, 0}) s.push_back(static_cast<char>((v >> shift) & 0xFF));
  };
  put32(zlib, (b << 16) | a);
  auto chunk = [&](const std::string& type, const std::string& data) {
    std::string c;
    put32(c, static_cast<uint32_t>(data.size()));
    c += type + data;
    put32(c, bitwise_crc32(type + data));
    return c;
  };
  std::string ihdr;
  put32(ihdr, w);
  put32(ihdr, h);
  ihdr += std::string("\x08\x06\x00\x00\x00", 5);  // 8 bits, RGBA
  const std::string png = std::string("\x89PNG\r\n\x1a\n", 8) + chunk("IHDR", ihdr) +
                          chunk("IDAT", zlib) + chunk("IEND", "");
  spit(dir_ / "rgba.png", png);

  const auto image = common::read_image((dir_ / "rgba.png").string());
  ASSERT_EQ(image.sizes(), (std::vector<int64_t>{h, w, 3}));
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      EXPECT_EQ(image[y][x][0].item<int>(), 10 + 40 * x);
      EXPECT_EQ(image[y][x][1].item<int>(), 20 + 90 * y);
      EXPECT_EQ(image[y][x][2].item<int>(), 200 - 30 * x - 50 * y);
    }
  }
}

TEST_F(DataTest, ReadImageErrorsNameTheFile) {
  const auto missing = (dir_ / "no_such_picture.png").string();
  EXPECT_ERROR_MENTIONS(common::read_image(missing), "no_such_picture.png");
  spit(dir_ / "garbage.png", "this is not an image at all");
  EXPECT_ERROR_MENTIONS(common::read_image((dir_ / "garbage.png").string()), "garbage.png");
  spit(dir_ / "empty.jpg", "");
  EXPECT_ERROR_MENTIONS(common::read_image((dir_ / "empty.jpg").string()), "empty.jpg");
}

TEST_F(DataTest, ToFloatAndToUint8RoundTripEveryValue) {
  auto image = torch::arange(256, torch::kLong).to(torch::kUInt8).view({16, 16, 1}).repeat({1, 1, 3});
  const auto chw = common::to_float(image);
  EXPECT_EQ(chw.sizes(), (std::vector<int64_t>{3, 16, 16}));
  EXPECT_EQ(chw.scalar_type(), torch::kFloat32);
  EXPECT_FLOAT_EQ(chw.min().item<float>(), -1.0f);
  EXPECT_FLOAT_EQ(chw.max().item<float>(), 1.0f);
  EXPECT_NEAR(chw[0][0][1].item<float>(), 1.0 / 127.5 - 1.0, 1e-7);  // value 1
  EXPECT_TRUE(common::to_uint8(chw).equal(image));
  // batches, other dtypes, and clamping of out-of-range values
  const auto batch = torch::stack({image, common::hflip(image)});
  EXPECT_TRUE(common::to_uint8(common::to_float(batch).to(torch::kFloat64)).equal(batch));
  const auto wild = torch::tensor({-3.0, 5.0, 0.0}).view({3, 1, 1});
  const auto clamped = common::to_uint8(wild).flatten();
  EXPECT_EQ(clamped[0].item<int>(), 0);
  EXPECT_EQ(clamped[1].item<int>(), 255);
  EXPECT_EQ(clamped[2].item<int>(), 128);  // round(127.5)
  EXPECT_ERROR_MENTIONS(common::to_float(chw), "uint8");
}

TEST_F(DataTest, ResizeShortSideKeepsTheAspectRatioAndAntialiases) {
  for (auto [h, w] : std::vector<std::pair<int64_t, int64_t>>{{300, 451}, {451, 300}, {64, 64}}) {
    const auto out = common::resize_short_side(random_image(h, w), 128);
    const int64_t expected_h = h <= w ? 128 : 128 * h / w;
    const int64_t expected_w = h <= w ? 128 * w / h : 128;
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{expected_h, expected_w, 3})) << h << "x" << w;
  }
  // A constant image stays constant, up or down.
  const auto flat = torch::full({40, 60, 3}, 77, torch::kUInt8);
  EXPECT_TRUE(common::resize_short_side(flat, 20).eq(77).all().item<bool>());
  EXPECT_TRUE(common::resize_short_side(flat, 90).eq(77).all().item<bool>());
  // A one-pixel checkerboard shrunk 8x averages to grey (point sampling would keep 0 / 255).
  auto checker = (torch::arange(128).view({128, 1}) + torch::arange(128).view({1, 128}))
                     .remainder(2)
                     .mul(255)
                     .to(torch::kUInt8)
                     .unsqueeze(2)
                     .repeat({1, 1, 3});
  const auto small = common::resize_short_side(checker, 16).to(torch::kFloat32);
  EXPECT_EQ(small.sizes(), (std::vector<int64_t>{16, 16, 3}));
  EXPECT_NEAR(small.mean().item<float>(), 127.5, 4.0);
  EXPECT_LT(small.std().item<float>(), 12.0);
}

TEST_F(DataTest, CenterCropTakesTheMiddleWindow) {
  const auto image = coordinate_image(50, 71);
  const auto out = common::center_crop(image, 20, 30);
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{20, 30, 3}));
  EXPECT_TRUE(out.equal(image.slice(0, 15, 35).slice(1, 20, 50)));
  EXPECT_ERROR_MENTIONS(common::center_crop(image, 51, 10), "51");
}

TEST_F(DataTest, RandomCropIsAWindowOfTheImageAndFollowsTheGenerator) {
  const auto image = coordinate_image(40, 60);
  std::set<std::pair<int64_t, int64_t>> corners;
  auto g1 = common::make_cpu_generator(5), g2 = common::make_cpu_generator(5);
  for (int i = 0; i < 20; ++i) {
    const auto out = common::random_crop(image, 16, 24, g1);
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{16, 24, 3}));
    const int64_t top = out[0][0][0].item<int64_t>(), left = out[0][0][1].item<int64_t>();
    EXPECT_LE(top + 16, 40);
    EXPECT_LE(left + 24, 60);
    EXPECT_TRUE(out.equal(image.slice(0, top, top + 16).slice(1, left, left + 24)));
    EXPECT_TRUE(common::random_crop(image, 16, 24, g2).equal(out));  // same seed, same crops
    corners.insert({top, left});
  }
  EXPECT_GT(corners.size(), 5u);
}

TEST_F(DataTest, HFlipMirrorsAndTwiceIsTheIdentity) {
  const auto image = coordinate_image(5, 9);
  const auto flipped = common::hflip(image);
  for (int64_t x = 0; x < 9; ++x) EXPECT_TRUE(flipped.select(1, x).equal(image.select(1, 8 - x)));
  EXPECT_TRUE(common::hflip(flipped).equal(image));
}

TEST_F(DataTest, MakeGridTilesRowByRow) {
  std::vector<torch::Tensor> images;
  for (int i = 0; i < 5; ++i) images.push_back(torch::full({4, 6, 3}, 10 * (i + 1), torch::kUInt8));
  const auto grid = common::make_grid(images, 3, 1);
  ASSERT_EQ(grid.sizes(), (std::vector<int64_t>{2 * 5 + 1, 3 * 7 + 1, 3}));
  EXPECT_TRUE(grid.slice(0, 1, 5).slice(1, 8, 14).eq(20).all().item<bool>());   // image 1
  EXPECT_TRUE(grid.slice(0, 6, 10).slice(1, 8, 14).eq(50).all().item<bool>());  // image 4
  EXPECT_TRUE(grid.slice(0, 6, 10).slice(1, 15, 21).eq(0).all().item<bool>());  // empty cell
  images.push_back(torch::zeros({5, 6, 3}, torch::kUInt8));
  EXPECT_ERROR_MENTIONS(common::make_grid(images, 3), "image 5");
}

// ---- PNG with text ---------------------------------------------------------------------------

TEST_F(DataTest, Crc32MatchesTheStandardCheckValue) {
  EXPECT_EQ(common::crc32("123456789", 9), 0xCBF43926u);  // the published CRC-32 check value
  const std::string text = "IEND and some more bytes";
  EXPECT_EQ(common::crc32(text.data(), text.size()), bitwise_crc32(text));
}

TEST_F(DataTest, WritePngReadsBackPixelsAndTextChunks) {
  const auto image = random_image(37, 53, 3);
  const std::vector<std::pair<std::string, std::string>> texts{
      {"prompt", "a red circle, flat style"},
      {"seed", "42"},
      {"note", "na\xC3\xAFve \xE2\x80\x94 UTF-8"}};
  const auto path = (dir_ / "out.png").string();
  spit(path, "an older file to be replaced");
  common::write_png(path, image, texts);
  EXPECT_TRUE(common::read_image(path).equal(image));  // decodes with stb, lossless
  EXPECT_EQ(common::read_png_text(path), texts);

  // Structure, checked independently: IHDR first, text chunks before IEND, IEND last, CRCs right.
  const std::string png = slurp(path);
  std::vector<std::string> types;
  for (size_t at = 8; at + 12 <= png.size();) {
    const uint32_t length = be32(png, at);
    types.push_back(png.substr(at + 4, 4));
    EXPECT_EQ(be32(png, at + 8 + length), bitwise_crc32(png.substr(at + 4, 4 + length)))
        << types.back();
    at += 12 + length;
  }
  ASSERT_GE(types.size(), 5u);
  EXPECT_EQ(types.front(), "IHDR");
  EXPECT_EQ(types.back(), "IEND");
  EXPECT_EQ(std::count(types.begin(), types.end(), "tEXt"), 2);
  EXPECT_EQ(std::count(types.begin(), types.end(), "iTXt"), 1);
  // Atomic write: nothing but the PNG is left in the folder.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);

  common::write_png(path, common::hflip(image));  // overwrite, no text
  EXPECT_TRUE(common::read_image(path).equal(common::hflip(image)));
  EXPECT_TRUE(common::read_png_text(path).empty());
  EXPECT_ERROR_MENTIONS(common::write_png(path, image, {{"", "x"}}), "keyword");
  EXPECT_ERROR_MENTIONS(common::read_png_text((dir_ / "nothing.png").string()), "nothing.png");
}

// ---- CSV -------------------------------------------------------------------------------------

TEST_F(DataTest, ParseCsvHandlesQuotingPerRfc4180) {
  const std::string text =
      "\xEF\xBB\xBFImage:FILE,Text\r\n"
      "a.png,plain caption\r\n"
      "\r\n"
      "\"b, c.png\",\"with, comma and \"\"quotes\"\"\"\n"
      "d.png,\"two\nlines\"\n"
      "e.png,\n"
      "f.png,last";
  const auto rows = common::parse_csv(text);
  ASSERT_EQ(rows.size(), 6u);
  EXPECT_EQ(rows[0].fields, (std::vector<std::string>{"Image:FILE", "Text"}));
  EXPECT_EQ(rows[1].fields, (std::vector<std::string>{"a.png", "plain caption"}));
  EXPECT_EQ(rows[2].fields, (std::vector<std::string>{"b, c.png", "with, comma and \"quotes\""}));
  EXPECT_EQ(rows[2].line, 4);
  EXPECT_EQ(rows[3].fields, (std::vector<std::string>{"d.png", "two\nlines"}));
  EXPECT_EQ(rows[4].fields, (std::vector<std::string>{"e.png", ""}));
  EXPECT_EQ(rows[4].line, 7);
  EXPECT_EQ(rows[5].fields, (std::vector<std::string>{"f.png", "last"}));
  EXPECT_ERROR_MENTIONS(common::parse_csv("a,b\n1,\"open\n2,3\n", "broken.csv"), "line 2");
}

TEST_F(DataTest, WriteLossCsvReadsBackThroughTheParser) {
  const auto path = (dir_ / "loss.csv").string();
  common::write_loss_csv(path, {{1, 0.25, 1e-4, 0.5}, {200, 0.125, 5e-5, 12.75}});
  const auto rows = common::parse_csv(slurp(path));
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].fields, (std::vector<std::string>{"step", "loss", "lr", "time"}));
  EXPECT_EQ(rows[2].fields[0], "200");
  EXPECT_DOUBLE_EQ(std::stod(rows[2].fields[1]), 0.125);
  EXPECT_DOUBLE_EQ(std::stod(rows[2].fields[2]), 5e-5);
  EXPECT_DOUBLE_EQ(std::stod(rows[2].fields[3]), 12.75);
  EXPECT_EQ(common::csv_escape("a,\"b\""), "\"a,\"\"b\"\"\"");
}

// ---- the dataset: layouts --------------------------------------------------------------------

constexpr int64_t R = 24;  // dataset resolution in these tests

TEST_F(DataTest, DatasetReadsTheCsvLayoutWithQuotedCaptions) {
  fs::create_directories(dir_ / "images");
  std::vector<torch::Tensor> images;
  for (int i = 0; i < 3; ++i) {
    images.push_back(random_image(R, R, 10 + i));
    common::write_png((dir_ / "images" / ("img" + std::to_string(i) + ".png")).string(),
                      images.back());
  }
  spit(dir_ / "train.csv",
       "Image:FILE,Text\n"
       "images/img0.png,\"a cat, sitting\"\n"
       "images/img1.png,\"the \"\"best\"\" dog\"\n"
       "images/img2.png,  plain  \n");
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R).center_crop(true));
  EXPECT_EQ(data.layout(), common::DatasetLayout::csv);
  ASSERT_EQ(data.size(), 3);
  EXPECT_EQ(data.skipped(), 0);
  EXPECT_EQ(captions_of(data),
            (std::vector<std::string>{"a cat, sitting", "the \"best\" dog", "plain"}));
  auto generator = common::make_cpu_generator(0);
  for (int64_t i = 0; i < 3; ++i) {
    const auto sample = data.get(i, generator);
    EXPECT_EQ(sample.image.sizes(), (std::vector<int64_t>{3, R, R}));
    // R x R images: no resize, the centre crop is the whole image.
    EXPECT_TRUE(sample.image.equal(common::to_float(images[static_cast<size_t>(i)])));
    EXPECT_NE(sample.file.find("img" + std::to_string(i) + ".png"), std::string::npos);
  }
  // The CSV may also be named directly, with other accepted column names.
  spit(dir_ / "other.csv", "caption,file_name\nfrom the other file,images/img1.png\n");
  common::CaptionedImageDataset other(dir_ / "other.csv", common::DatasetOptions(R));
  ASSERT_EQ(other.size(), 1);
  EXPECT_EQ(other.items()[0].caption, "from the other file");
}

TEST_F(DataTest, DatasetReadsTheMetadataJsonlLayout) {
  fs::create_directories(dir_ / "train");
  const auto image = random_image(R + 8, R + 20, 4);
  common::write_png((dir_ / "train" / "0001.png").string(), image);
  common::write_png((dir_ / "train" / "0002.jpg.png").string(), random_image(R, R, 5));
  spit(dir_ / "metadata.jsonl",
       "{\"file_name\": \"train/0001.png\", \"text\": \"a \\\"quoted\\\" word\"}\n"
       "\n"
       "{\"file_name\": \"train/0002.jpg.png\", \"text\": \"second\", \"extra\": 3}\n");
  common::CaptionedImageDataset data(
      dir_, common::DatasetOptions(R).center_crop(true).cache_images(true));
  EXPECT_EQ(data.layout(), common::DatasetLayout::jsonl);
  ASSERT_EQ(data.size(), 2);
  EXPECT_EQ(captions_of(data), (std::vector<std::string>{"a \"quoted\" word", "second"}));
  auto generator = common::make_cpu_generator(0);
  const auto expected =
      common::to_float(common::center_crop(common::resize_short_side(image, R), R, R));
  EXPECT_TRUE(data.get(0, generator).image.equal(expected));  // from the cache
  common::CaptionedImageDataset uncached(dir_, common::DatasetOptions(R).center_crop(true));
  EXPECT_TRUE(uncached.get(0, generator).image.equal(expected));
}

TEST_F(DataTest, DatasetReadsImagesWithTxtCaptions) {
  common::write_png((dir_ / "b.png").string(), random_image(R, R, 6));
  spit(dir_ / "b.txt", "  second caption\n");
  const auto jpeg = scedit_test::data_dir() / "images" / "rocket.jpg";
  fs::copy_file(jpeg, dir_ / "a.JPG");
  spit(dir_ / "a.txt", "a rocket");
  spit(dir_ / "notes.md", "not part of the dataset");
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R));
  EXPECT_EQ(data.layout(), common::DatasetLayout::txt);
  ASSERT_EQ(data.size(), 2);
  EXPECT_EQ(captions_of(data), (std::vector<std::string>{"a rocket", "second caption"}));
  auto generator = common::make_cpu_generator(1);
  EXPECT_EQ(data.get(0, generator).image.sizes(), (std::vector<int64_t>{3, R, R}));
}

// ---- the dataset: bad data and errors --------------------------------------------------------

/// A CSV folder with two good rows and one row per kind of bad item.
void write_bad_csv_folder(const fs::path& dir, const std::function<torch::Tensor(int64_t, int64_t)>& img) {
  common::write_png((dir / "good1.png").string(), img(R, R));
  common::write_png((dir / "good2.png").string(), img(R + 5, R));
  common::write_png((dir / "tiny.png").string(), img(R - 1, R + 10));
  spit(dir / "broken.png", "\x89PNG but then nothing sensible");
  spit(dir / "data.csv",
       "file,Text\n"
       "good1.png,first\n"
       "ghost.png,a missing file\n"
       "broken.png,an undecodable file\n"
       "tiny.png,too small\n"
       "good2.png,second\n");
}

TEST_F(DataTest, DatasetSkipsBadItemsCountingThemByFileName) {
  write_bad_csv_folder(dir_, [&](int64_t h, int64_t w) { return random_image(h, w); });
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R));
  EXPECT_EQ(data.size(), 2);
  EXPECT_EQ(captions_of(data), (std::vector<std::string>{"first", "second"}));
  ASSERT_EQ(data.skipped(), 3);
  ASSERT_EQ(data.problems().size(), 3u);
  EXPECT_NE(data.problems()[0].find("ghost.png"), std::string::npos) << data.problems()[0];
  EXPECT_NE(data.problems()[1].find("broken.png"), std::string::npos) << data.problems()[1];
  EXPECT_NE(data.problems()[2].find("tiny.png"), std::string::npos) << data.problems()[2];
  // Upscaling keeps the small image instead.
  common::CaptionedImageDataset upscaled(dir_, common::DatasetOptions(R).upscale_small(true));
  EXPECT_EQ(upscaled.size(), 3);
  auto generator = common::make_cpu_generator(2);
  EXPECT_EQ(upscaled.get(1, generator).image.sizes(), (std::vector<int64_t>{3, R, R}));

  // An empty caption file in the txt layout.
  const fs::path txt = dir_ / "txt";
  fs::create_directories(txt);
  common::write_png((txt / "fine.png").string(), random_image(R, R));
  spit(txt / "fine.txt", "fine");
  common::write_png((txt / "blank.png").string(), random_image(R, R));
  spit(txt / "blank.txt", " \n\t\n");
  common::CaptionedImageDataset captions(txt, common::DatasetOptions(R));
  EXPECT_EQ(captions.size(), 1);
  ASSERT_EQ(captions.skipped(), 1);
  EXPECT_NE(captions.problems()[0].find("blank.txt"), std::string::npos);
}

TEST_F(DataTest, DatasetWithFatalPolicyThrowsNamingTheBadFile) {
  const auto fatal = common::DatasetOptions(R).bad_data(common::BadDataPolicy::fatal);
  for (const std::string bad : {"ghost.png", "broken.png", "tiny.png"}) {
    const fs::path dir = dir_ / bad;
    fs::create_directories(dir);
    write_bad_csv_folder(dir, [&](int64_t h, int64_t w) { return random_image(h, w); });
    // Keep only the header, one good row and the bad row.
    spit(dir / "data.csv", "file,Text\ngood1.png,first\n" + bad + ",the bad one\n");
    EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir, fatal), bad);
  }
  const fs::path txt = dir_ / "txt";
  fs::create_directories(txt);
  common::write_png((txt / "blank.png").string(), random_image(R, R));
  spit(txt / "blank.txt", "");
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(txt, fatal), "blank.txt");
}

TEST_F(DataTest, DatasetRejectsMissingAndUnrecognisedFolders) {
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_ / "not_here"), "not_here");
  spit(dir_ / "README.md", "nothing to train on");
  common::write_png((dir_ / "uncaptioned.png").string(), random_image(R, R));
  const std::string message = error_of([&] { common::CaptionedImageDataset data(dir_); });
  EXPECT_NE(message.find("no recognised layout"), std::string::npos) << message;
  EXPECT_NE(message.find(dir_.string()), std::string::npos) << message;
  spit(dir_ / "x.csv", "file,colour\nuncaptioned.png,red\n");
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_), "no text column");
  // Only bad items: no usable images.
  spit(dir_ / "x.csv", "file,text\nghost.png,boo\n");
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_), "ghost.png");
}

// ---- the dataset: random transforms ----------------------------------------------------------

TEST_F(DataTest, CaptionDropoutOfOneEmptiesEveryCaptionAndZeroNone) {
  common::make_demo_dataset(dir_, 3, 32, 7);
  auto generator = common::make_cpu_generator(3);
  common::CaptionedImageDataset always(dir_, common::DatasetOptions(R).caption_dropout(1.0));
  common::CaptionedImageDataset never(dir_, common::DatasetOptions(R).caption_dropout(0.0));
  for (int round = 0; round < 4; ++round) {
    for (int64_t i = 0; i < always.size(); ++i) {
      EXPECT_EQ(always.get(i, generator).caption, "");
      EXPECT_EQ(never.get(i, generator).caption, never.items()[static_cast<size_t>(i)].caption);
    }
  }
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_, common::DatasetOptions(R).caption_dropout(1.5)),
                        "caption_dropout");
}

TEST_F(DataTest, RandomCropAndFlipFollowTheGenerator) {
  common::write_png((dir_ / "wide.png").string(), random_image(40, 90, 8));
  spit(dir_ / "wide.txt", "wide");
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R).random_flip(true));
  auto g1 = common::make_cpu_generator(11), g2 = common::make_cpu_generator(11);
  std::set<std::string> distinct;
  const auto resized = common::resize_short_side(common::read_image((dir_ / "wide.png").string()), R);
  for (int i = 0; i < 12; ++i) {
    const auto a = data.get(0, g1), b = data.get(0, g2);
    ASSERT_EQ(a.image.sizes(), (std::vector<int64_t>{3, R, R}));
    EXPECT_TRUE(a.image.equal(b.image));
    // The sample is some window of the resized image, mirrored or not.
    const auto pixels = common::to_uint8(a.image);
    bool found = false;
    for (int64_t left = 0; left + R <= resized.size(1) && !found; ++left) {
      const auto window = resized.slice(1, left, left + R);
      found = window.equal(pixels) || common::hflip(window).equal(pixels);
    }
    EXPECT_TRUE(found);
    distinct.insert(std::to_string(pixels.sum().item<int64_t>()) + "/" +
                    std::to_string(pixels[0][0][0].item<int>()));
  }
  EXPECT_GT(distinct.size(), 3u);
  auto batch = data.get_batch({0, 0, 0}, g1);
  EXPECT_EQ(batch.images.sizes(), (std::vector<int64_t>{3, 3, R, R}));
  EXPECT_EQ(batch.captions, (std::vector<std::string>{"wide", "wide", "wide"}));
}

// ---- the demo dataset ------------------------------------------------------------------------

TEST_F(DataTest, DemoDatasetIsDeterministicAndReadable) {
  common::make_demo_dataset(dir_ / "a", 6, 48, 123);
  common::make_demo_dataset(dir_ / "b", 6, 48, 123);
  common::make_demo_dataset(dir_ / "c", 6, 48, 124);
  EXPECT_EQ(slurp(dir_ / "a" / "metadata.jsonl"), slurp(dir_ / "b" / "metadata.jsonl"));
  bool any_difference = slurp(dir_ / "a" / "metadata.jsonl") != slurp(dir_ / "c" / "metadata.jsonl");
  common::CaptionedImageDataset a(dir_ / "a", common::DatasetOptions(48).center_crop(true));
  common::CaptionedImageDataset c(dir_ / "c", common::DatasetOptions(48).center_crop(true));
  ASSERT_EQ(a.size(), 6);
  EXPECT_EQ(a.skipped(), 0);
  EXPECT_EQ(a.layout(), common::DatasetLayout::jsonl);
  const std::regex pattern("an? [a-z]+ [a-z]+ on an? [a-z]+ background, flat style");
  auto generator = common::make_cpu_generator(0);
  for (int64_t i = 0; i < a.size(); ++i) {
    const auto& item = a.items()[static_cast<size_t>(i)];
    EXPECT_TRUE(std::regex_match(item.caption, pattern)) << item.caption;
    EXPECT_FALSE(std::regex_search(item.caption, std::regex("\\ba [aeiou]"))) << item.caption;
    const auto b_file = dir_ / "b" / fs::relative(item.file, dir_ / "a");
    EXPECT_EQ(slurp(item.file), slurp(b_file)) << item.file;
    const auto image = a.get(i, generator).image;
    EXPECT_GT(image.std().item<float>(), 0.1) << "flat image " << item.file;  // a shape is drawn
    any_difference |= !image.equal(c.get(i, generator).image);
  }
  EXPECT_TRUE(any_difference);  // another seed, another dataset
}

// ---- the loss plot ---------------------------------------------------------------------------

TEST_F(DataTest, LossPlotWritesADecodablePngOfTheRequestedSize) {
  std::vector<int64_t> steps;
  std::vector<double> losses;
  std::mt19937 rng(0);
  std::normal_distribution<double> noise(0.0, 0.02);
  for (int64_t s = 1; s <= 300; ++s) {
    steps.push_back(s);
    losses.push_back(0.1 + 0.3 * std::exp(-s / 60.0) + noise(rng));
  }
  losses[17] = std::nan("");
  const auto path = (dir_ / "loss.png").string();
  common::write_loss_plot(path, steps, losses, "loss: style run",
                          common::PlotOptions().width(640).height(360));
  const auto image = common::read_image(path);
  ASSERT_EQ(image.sizes(), (std::vector<int64_t>{360, 640, 3}));
  EXPECT_TRUE(image[0][0].eq(255).all().item<bool>());  // white margin
  const auto dark = image.to(torch::kInt32).sum(2).lt(150).sum().item<int64_t>();
  EXPECT_GT(dark, 640);  // axes, labels, title
  const auto blue = (image.select(2, 2).to(torch::kInt32) - image.select(2, 0).to(torch::kInt32))
                        .gt(60)
                        .sum()
                        .item<int64_t>();
  EXPECT_GT(blue, 300);  // the curves
  const auto texts = common::read_png_text(path);
  ASSERT_FALSE(texts.empty());
  EXPECT_EQ(texts[0], (std::pair<std::string, std::string>{"Title", "loss: style run"}));

  common::write_loss_plot(path, {}, {}, "empty");  // no data still gives a picture
  EXPECT_EQ(common::read_image(path).sizes(), (std::vector<int64_t>{480, 800, 3}));
  EXPECT_ERROR_MENTIONS(common::write_loss_plot(path, {1, 2}, {0.5}, "t"), "loss.png");
}

}  // namespace
