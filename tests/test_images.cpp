// Image files and their transforms (examples/common: image.hpp, png.hpp, csv.hpp, plot.hpp, and
// sd::to_float / to_uint8): decoding the sample photographs, PNG with text chunks, crops, flips,
// grids, CSV, the loss table and plot. Checked against independent helpers, never against the
// code under test.

#include <common/csv.hpp>
#include <common/image.hpp>
#include <common/plot.hpp>
#include <common/png.hpp>
#include <sd/stable_diffusion.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

using scedit_test::random_image;
using scedit_test::read_file;
using scedit_test::write_file;

// ---- independent helpers (no code under test) ------------------------------------------------

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
  const std::string s = read_file(path);
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

/// An image whose pixel (y, x) is (y, x, 7): each position is recognisable (H, W <= 256).
torch::Tensor coordinate_image(int64_t h, int64_t w) {
  auto ys = torch::arange(h).view({h, 1}).expand({h, w});
  auto xs = torch::arange(w).view({1, w}).expand({h, w});
  return torch::stack({ys, xs, torch::full({h, w}, 7, torch::kLong)}, 2).to(torch::kUInt8);
}

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  scedit_test::TempDir scratch_{"data"};
  const fs::path& dir_ = scratch_.path();
};

}  // namespace

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
  write_file(dir_ / "rgba.png", png);

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
  write_file(dir_ / "garbage.png", "this is not an image at all");
  EXPECT_ERROR_MENTIONS(common::read_image((dir_ / "garbage.png").string()), "garbage.png");
  write_file(dir_ / "empty.jpg", "");
  EXPECT_ERROR_MENTIONS(common::read_image((dir_ / "empty.jpg").string()), "empty.jpg");
}

TEST_F(DataTest, ToFloatAndToUint8RoundTripEveryValue) {
  auto image = torch::arange(256, torch::kLong).to(torch::kUInt8).view({16, 16, 1}).repeat({1, 1, 3});
  const auto chw = sd::to_float(image);
  EXPECT_EQ(chw.sizes(), (std::vector<int64_t>{3, 16, 16}));
  EXPECT_EQ(chw.scalar_type(), torch::kFloat32);
  EXPECT_FLOAT_EQ(chw.min().item<float>(), -1.0f);
  EXPECT_FLOAT_EQ(chw.max().item<float>(), 1.0f);
  EXPECT_NEAR(chw[0][0][1].item<float>(), 1.0 / 127.5 - 1.0, 1e-7);  // value 1
  EXPECT_TRUE(sd::to_uint8(chw).equal(image));
  // batches, other dtypes, and clamping of out-of-range values
  const auto batch = torch::stack({image, common::hflip(image)});
  EXPECT_TRUE(sd::to_uint8(sd::to_float(batch).to(torch::kFloat64)).equal(batch));
  const auto wild = torch::tensor({-3.0, 5.0, 0.0}).view({3, 1, 1});
  const auto clamped = sd::to_uint8(wild).flatten();
  EXPECT_EQ(clamped[0].item<int>(), 0);
  EXPECT_EQ(clamped[1].item<int>(), 255);
  EXPECT_EQ(clamped[2].item<int>(), 128);  // round(127.5)
  EXPECT_ERROR_MENTIONS(sd::to_float(chw), "uint8");
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
  write_file(path, "an older file to be replaced");
  common::write_png(path, image, texts);
  EXPECT_TRUE(common::read_image(path).equal(image));  // decodes with stb, lossless
  EXPECT_EQ(common::read_png_text(path), texts);

  // Structure, checked independently: IHDR first, text chunks before IEND, IEND last, CRCs right.
  const std::string png = read_file(path);
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

// stb_image ignores PNG CRCs; the decode checks them, so a damaged file is not used as an image.
TEST_F(DataTest, ReadImageRefusesAPngWhoseChunkCrcIsWrong) {
  const auto image = random_image(19, 23, 4);
  const auto good = (dir_ / "good.png").string();
  common::write_png(good, image, {{"prompt", "a red circle"}});
  const std::string png = read_file(good);
  // Offsets of each chunk by type, found independently of the code under test.
  std::vector<std::pair<std::string, size_t>> chunks;
  for (size_t at = 8; at + 12 <= png.size(); at += 12 + be32(png, at)) chunks.emplace_back(png.substr(at + 4, 4), at);
  int damaged_files = 0;
  for (const auto& [type, at] : chunks) {
    if (type != "IDAT" && type != "tEXt") continue;
    ++damaged_files;
    // IDAT: the stored CRC is off, the pixels intact (stb alone decodes it). tEXt: a byte of its
    // text changed, which stb never reads.
    std::string damaged = png;
    const size_t byte = type == "IDAT" ? at + 8 + be32(png, at) : at + 8 + be32(png, at) - 1;
    damaged[byte] = static_cast<char>(damaged[byte] ^ 0x01);
    const auto path = (dir_ / ("damaged_" + type + ".png")).string();
    write_file(path, damaged);
    EXPECT_ERROR_MENTIONS(common::read_image(path), "damaged_" + type + ".png");
    EXPECT_ERROR_MENTIONS(common::read_image(path), "CRC mismatch in the " + type + " chunk at byte " + std::to_string(at));
  }
  EXPECT_GE(damaged_files, 2) << "the PNG has no IDAT or no tEXt chunk to damage";
  EXPECT_TRUE(common::read_image(good).equal(image));
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
  const auto rows = common::parse_csv(read_file(path));
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].fields, (std::vector<std::string>{"step", "loss", "lr", "time"}));
  EXPECT_EQ(rows[2].fields[0], "200");
  EXPECT_DOUBLE_EQ(std::stod(rows[2].fields[1]), 0.125);
  EXPECT_DOUBLE_EQ(std::stod(rows[2].fields[2]), 5e-5);
  EXPECT_DOUBLE_EQ(std::stod(rows[2].fields[3]), 12.75);
  EXPECT_EQ(common::csv_escape("a,\"b\""), "\"a,\"\"b\"\"\"");
  // read_loss_csv gives the records back (a resumed run continues them); a damaged line is named.
  const auto records = common::read_loss_csv(path);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].step, 200);
  EXPECT_DOUBLE_EQ(records[1].loss, 0.125);
  EXPECT_DOUBLE_EQ(records[1].seconds, 12.75);
  write_file(path, "step,loss,lr,time\n1,0.25,1e-4,0.5\n2,nan?,x\n");
  EXPECT_ERROR_MENTIONS(common::read_loss_csv(path), "line 3");
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
