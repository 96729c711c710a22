// The captioned image dataset (examples/common/dataset.hpp): its three layouts, bad data skipped
// or fatal with the file named, random crops and flips drawn from the caller's generator, and the
// generated demo data (demo_data.hpp).

#include <common/batches.hpp>
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

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  scedit_test::TempDir scratch_{"data"};
  const fs::path& dir_ = scratch_.path();
};

std::vector<std::string> captions_of(const common::CaptionedImageDataset& data) {
  std::vector<std::string> out;
  for (const auto& item : data.items()) out.push_back(item.caption);
  return out;
}

}  // namespace

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
  write_file(dir_ / "train.csv",
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
    EXPECT_TRUE(sample.image.equal(sd::to_float(images[static_cast<size_t>(i)])));
    EXPECT_NE(sample.file.find("img" + std::to_string(i) + ".png"), std::string::npos);
  }
  // The CSV may also be named directly, with other accepted column names.
  write_file(dir_ / "other.csv", "caption,file_name\nfrom the other file,images/img1.png\n");
  common::CaptionedImageDataset other(dir_ / "other.csv", common::DatasetOptions(R));
  ASSERT_EQ(other.size(), 1);
  EXPECT_EQ(other.items()[0].caption, "from the other file");
}

TEST_F(DataTest, DatasetReadsTheMetadataJsonlLayout) {
  fs::create_directories(dir_ / "train");
  const auto image = random_image(R + 8, R + 20, 4);
  common::write_png((dir_ / "train" / "0001.png").string(), image);
  common::write_png((dir_ / "train" / "0002.jpg.png").string(), random_image(R, R, 5));
  write_file(dir_ / "metadata.jsonl",  // with the byte-order mark some editors write first
       "\xEF\xBB\xBF{\"file_name\": \"train/0001.png\", \"text\": \"a \\\"quoted\\\" word\"}\n"
       "\n"
       "{\"file_name\": \"train/0002.jpg.png\", \"text\": \"second\", \"extra\": 3}\n");
  common::CaptionedImageDataset data(
      dir_, common::DatasetOptions(R).center_crop(true).cache_images(true));
  EXPECT_EQ(data.layout(), common::DatasetLayout::jsonl);
  ASSERT_EQ(data.size(), 2);
  EXPECT_EQ(captions_of(data), (std::vector<std::string>{"a \"quoted\" word", "second"}));
  auto generator = common::make_cpu_generator(0);
  const auto expected =
      sd::to_float(common::center_crop(common::resize_short_side(image, R), R, R));
  EXPECT_TRUE(data.get(0, generator).image.equal(expected));  // from the cache
  common::CaptionedImageDataset uncached(dir_, common::DatasetOptions(R).center_crop(true));
  EXPECT_TRUE(uncached.get(0, generator).image.equal(expected));
}

// What identifies a sample is where it lies in its data folder, not where the folder is; an image
// listed twice is left out of training when one of its entries is held out.
TEST_F(DataTest, SampleKeysAreRelativeAndHeldOutImagesNeverTrain) {
  fs::create_directories(dir_ / "one" / "img");
  for (const char* name : {"a", "b", "c"}) common::write_png((dir_ / "one" / "img" / (std::string(name) + ".png")).string(), random_image(R, R));
  write_file(dir_ / "one" / "metadata.jsonl",
             "{\"file_name\": \"img/a.png\", \"text\": \"first\"}\n{\"file_name\": \"img/b.png\", \"text\": \"second\"}\n"
             "{\"file_name\": \"img/./a.png\", \"text\": \"again\"}\n{\"file_name\": \"img/c.png\", \"text\": \"third\"}\n");
  fs::create_directories(dir_ / "elsewhere");
  fs::copy(dir_ / "one", dir_ / "elsewhere" / "two", fs::copy_options::recursive);
  const common::CaptionedImageDataset one(dir_ / "one", common::DatasetOptions(R));
  const common::CaptionedImageDataset two(dir_ / "elsewhere" / "two", common::DatasetOptions(R));
  ASSERT_EQ(one.size(), 4);
  EXPECT_EQ(one.sample_key(1), "img/b.png\tsecond");
  for (int64_t i = 0; i < one.size(); ++i) EXPECT_EQ(one.sample_key(i), two.sample_key(i)) << i;

  auto keys_of = [](const common::SubsetSource& subset) {
    std::vector<std::string> keys;
    for (int64_t i = 0; i < subset.size(); ++i) keys.push_back(subset.sample_key(i));
    return keys;
  };
  const auto last = common::split_held_out(one, one.items(), 1);  // c: no other entry of it
  EXPECT_EQ(last.left_out, 0);
  EXPECT_EQ(keys_of(last.training), (std::vector<std::string>{"img/a.png\tfirst", "img/b.png\tsecond", "img/a.png\tagain"}));
  EXPECT_EQ(keys_of(last.held_out), (std::vector<std::string>{"img/c.png\tthird"}));
  const auto two_held = common::split_held_out(one, one.items(), 2);  // a (again) and c: a's first entry leaves
  EXPECT_EQ(two_held.left_out, 1);
  EXPECT_EQ(keys_of(two_held.training), (std::vector<std::string>{"img/b.png\tsecond"}));
  EXPECT_ERROR_MENTIONS(common::split_held_out(one, one.items(), 3), "nothing is left to train on");
}

TEST_F(DataTest, DatasetReadsImagesWithTxtCaptions) {
  common::write_png((dir_ / "b.png").string(), random_image(R, R, 6));
  write_file(dir_ / "b.txt", "  second caption\n");
  const auto jpeg = scedit_test::data_dir() / "images" / "rocket.jpg";
  fs::copy_file(jpeg, dir_ / "a.JPG");
  write_file(dir_ / "a.txt", "a rocket");
  write_file(dir_ / "notes.md", "not part of the dataset");
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
  write_file(dir / "broken.png", "\x89PNG but then nothing sensible");
  write_file(dir / "data.csv",
       "file,Text\n"
       "good1.png,first\n"
       "ghost.png,a missing file\n"
       "broken.png,an undecodable file\n"
       "tiny.png,too small\n"
       "good2.png,second\n");
}

// A CSV row with more fields than its header has an unquoted comma, which would cut its caption:
// skipped, saying so. A caption file's UTF-8 byte-order mark is no part of its caption.
TEST_F(DataTest, CsvRowsWithExtraFieldsAreSkippedAndCaptionFilesLoseTheirByteOrderMark) {
  const auto csv = dir_ / "csv", txt = dir_ / "txt";
  fs::create_directories(csv);
  fs::create_directories(txt);
  common::write_png((csv / "a.png").string(), random_image(R, R));
  write_file(csv / "train.csv", "file,text\na.png,a cat, flat style\na.png,\"a cat, flat style\"\n");
  common::CaptionedImageDataset quoted(csv, common::DatasetOptions(R));
  EXPECT_EQ(captions_of(quoted), std::vector<std::string>{"a cat, flat style"});
  ASSERT_EQ(quoted.problems().size(), 1u);
  EXPECT_NE(quoted.problems()[0].find("expected 2 fields, got 3 (quote a caption that holds a comma)"),
            std::string::npos) << quoted.problems()[0];

  for (const char* name : {"b", "c"}) common::write_png((txt / (std::string(name) + ".png")).string(), random_image(R, R));
  write_file(txt / "b.txt", "\xEF\xBB\xBF" "a dog");
  write_file(txt / "c.txt", "\xEF\xBB\xBF");
  common::CaptionedImageDataset captioned(txt, common::DatasetOptions(R));
  EXPECT_EQ(captions_of(captioned), std::vector<std::string>{"a dog"});
  ASSERT_EQ(captioned.problems().size(), 1u);
  EXPECT_NE(captioned.problems()[0].find("empty caption file"), std::string::npos) << captioned.problems()[0];
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
  write_file(txt / "fine.txt", "fine");
  common::write_png((txt / "blank.png").string(), random_image(R, R));
  write_file(txt / "blank.txt", " \n\t\n");
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
    write_file(dir / "data.csv", "file,Text\ngood1.png,first\n" + bad + ",the bad one\n");
    EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir, fatal), bad);
    EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir, fatal), "--bad-data fatal");
  }
  const fs::path txt = dir_ / "txt";
  fs::create_directories(txt);
  common::write_png((txt / "blank.png").string(), random_image(R, R));
  write_file(txt / "blank.txt", "");
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(txt, fatal), "blank.txt");
}

TEST_F(DataTest, DatasetRejectsMissingAndUnrecognisedFolders) {
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_ / "not_here"), "not_here");
  write_file(dir_ / "README.md", "nothing to train on");
  common::write_png((dir_ / "uncaptioned.png").string(), random_image(R, R));
  const std::string message = scedit_test::error_of([&] { common::CaptionedImageDataset data(dir_); });
  EXPECT_NE(message.find("no recognised layout"), std::string::npos) << message;
  EXPECT_NE(message.find(dir_.string()), std::string::npos) << message;
  write_file(dir_ / "x.csv", "file,colour\nuncaptioned.png,red\n");
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_), "no text column");
  // Only bad items: no usable images.
  write_file(dir_ / "x.csv", "file,text\nghost.png,boo\n");
  EXPECT_ERROR_MENTIONS(common::CaptionedImageDataset(dir_), "ghost.png");
}

// ---- the dataset: captions ------------------------------------------------------------------

/// Bytes that are no UTF-8: 0xFF never occurs in UTF-8, 0xFE neither.
const std::string kNotUtf8 = "\xff\xfe";

/// One folder per layout, each with a good item and, second, an item whose caption holds
/// `kNotUtf8`; returns the folders and where each listing names the bad item.
std::vector<std::pair<fs::path, std::string>> write_not_utf8_folders(const fs::path& dir) {
  const fs::path jsonl = dir / "jsonl", csv = dir / "csv", txt = dir / "txt";
  for (const auto& folder : {jsonl, csv, txt}) {
    fs::create_directories(folder);
    common::write_png((folder / "good.png").string(), random_image(R, R));
    common::write_png((folder / "bad.png").string(), random_image(R, R));
  }
  write_file(jsonl / "metadata.jsonl", "{\"file_name\": \"good.png\", \"text\": \"fine\"}\n"
                                       "{\"file_name\": \"bad.png\", \"text\": \"a " + kNotUtf8 + "\"}\n");
  write_file(csv / "train.csv", "file,text\ngood.png,fine\nbad.png,a " + kNotUtf8 + "\n");
  write_file(txt / "good.txt", "fine");
  write_file(txt / "bad.txt", "a " + kNotUtf8);
  return {{jsonl, "metadata.jsonl line 2"}, {csv, "train.csv line 3"}, {txt, "bad.txt"}};
}

TEST_F(DataTest, CaptionsThatAreNotUtf8AreBadDataNamedByFileAndLine) {
  for (const auto& [folder, origin] : write_not_utf8_folders(dir_)) {
    common::CaptionedImageDataset skipping(folder, common::DatasetOptions(R));
    EXPECT_EQ(captions_of(skipping), std::vector<std::string>{"fine"}) << origin;
    ASSERT_EQ(skipping.skipped(), 1) << origin;
    const auto& problem = skipping.problems().front();
    EXPECT_NE(problem.find(origin), std::string::npos) << problem;
    EXPECT_NE(problem.find("not valid UTF-8 at byte"), std::string::npos) << problem;
    EXPECT_EQ(problem.find(kNotUtf8), std::string::npos) << "the message repeats the bad bytes";

    const auto fatal = common::DatasetOptions(R).bad_data(common::BadDataPolicy::fatal);
    const auto message = scedit_test::error_of([&] { common::CaptionedImageDataset data(folder, fatal); });
    EXPECT_NE(message.find(origin), std::string::npos) << message;
    EXPECT_NE(message.find("not valid UTF-8"), std::string::npos) << message;
  }
}

TEST_F(DataTest, CaptionThatIsNoJsonStringIsNamedForWhatItIs) {
  common::write_png((dir_ / "a.png").string(), random_image(R, R));
  write_file(dir_ / "metadata.jsonl", "{\"file_name\": \"a.png\", \"text\": \"fine\"}\n"
                                      "{\"file_name\": \"a.png\", \"text\": 5}\n"
                                      "{\"file_name\": \"a.png\", \"caption\": [\"two\", \"parts\"]}\n"
                                      "{\"file_name\": 7, \"text\": \"a number for a name\"}\n"
                                      "{\"file_name\": \"a.png\", \"text\": \"\"}\n");
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R));
  EXPECT_EQ(captions_of(data), std::vector<std::string>{"fine"});
  ASSERT_EQ(data.problems().size(), 4u);
  const std::vector<std::pair<std::string, std::string>> expected{
      {"metadata.jsonl line 2", "caption is not a string (a number)"},
      {"metadata.jsonl line 3", "caption is not a string (an array)"},
      {"metadata.jsonl line 4", "file_name is not a string (a number)"},
      {"metadata.jsonl line 5", "empty caption"}};  // a string, and empty: the one "empty"
  for (size_t i = 0; i < expected.size(); ++i) {
    const auto& problem = data.problems()[i];
    EXPECT_NE(problem.find(expected[i].first), std::string::npos) << problem;
    EXPECT_NE(problem.find(expected[i].second), std::string::npos) << problem;
  }
}

TEST_F(DataTest, CutCaptionsAreCountedOnceNamingTheFirst) {
  const sd::CLIPTokenizer tokenizer((scedit_test::data_dir() / "clip").string());
  // Words of one token each: `n` of them take n + 2 ids with bos and eos.
  const auto words = [](int64_t n) {
    std::string text = "cat";
    for (int64_t i = 1; i < n; ++i) text += " cat";
    return text;
  };
  const int64_t fits = tokenizer.max_length() - 2;
  ASSERT_EQ(static_cast<int64_t>(tokenizer.encode(words(fits), false).size()), tokenizer.max_length());
  common::write_png((dir_ / "a.png").string(), random_image(R, R));
  write_file(dir_ / "train.csv", "file,text\n"
                                 "a.png,short\n"
                                 "a.png," + words(fits) + "\n"
                                 "a.png," + words(fits + 1) + "\n"
                                 "a.png,short again\n"
                                 "a.png," + words(3 * fits) + "\n");
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R));
  ASSERT_EQ(data.size(), 5);
  const auto cut = common::find_cut_captions(data.items(), tokenizer);
  EXPECT_EQ(cut.count, 2);
  EXPECT_NE(cut.first.find("train.csv line 4"), std::string::npos) << cut.first;

  ::testing::internal::CaptureStdout();
  common::report_cut_captions(data.items(), tokenizer);
  const auto line = ::testing::internal::GetCapturedStdout();
  EXPECT_EQ(std::count(line.begin(), line.end(), '\n'), 1) << line;
  EXPECT_NE(line.find("2 captions are longer than " + std::to_string(tokenizer.max_length()) + " tokens"),
            std::string::npos) << line;
  EXPECT_NE(line.find(cut.first), std::string::npos) << line;

  ::testing::internal::CaptureStdout();
  common::report_cut_captions({data.items().front()}, tokenizer);
  EXPECT_EQ(::testing::internal::GetCapturedStdout(), "");  // nothing cut, nothing said
}

// ---- the dataset: random transforms ----------------------------------------------------------

TEST_F(DataTest, RandomCropAndFlipFollowTheGenerator) {
  common::write_png((dir_ / "wide.png").string(), random_image(40, 90, 8));
  write_file(dir_ / "wide.txt", "wide");
  common::CaptionedImageDataset data(dir_, common::DatasetOptions(R).random_flip(true));
  auto g1 = common::make_cpu_generator(11), g2 = common::make_cpu_generator(11);
  std::set<std::string> distinct;
  const auto resized = common::resize_short_side(common::read_image((dir_ / "wide.png").string()), R);
  for (int i = 0; i < 12; ++i) {
    const auto a = data.get(0, g1), b = data.get(0, g2);
    ASSERT_EQ(a.image.sizes(), (std::vector<int64_t>{3, R, R}));
    EXPECT_TRUE(a.image.equal(b.image));
    // The sample is some window of the resized image, mirrored or not.
    const auto pixels = sd::to_uint8(a.image);
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
}

// ---- the demo dataset ------------------------------------------------------------------------

TEST_F(DataTest, DemoDatasetIsDeterministicAndReadable) {
  common::make_demo_dataset(dir_ / "a", 6, 48, 123);
  common::make_demo_dataset(dir_ / "b", 6, 48, 123);
  common::make_demo_dataset(dir_ / "c", 6, 48, 124);
  EXPECT_EQ(read_file(dir_ / "a" / "metadata.jsonl"), read_file(dir_ / "b" / "metadata.jsonl"));
  bool any_difference = read_file(dir_ / "a" / "metadata.jsonl") != read_file(dir_ / "c" / "metadata.jsonl");
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
    EXPECT_EQ(read_file(item.file), read_file(b_file)) << item.file;
    const auto image = a.get(i, generator).image;
    EXPECT_GT(image.std().item<float>(), 0.1) << "flat image " << item.file;  // a shape is drawn
    any_difference |= !image.equal(c.get(i, generator).image);
  }
  EXPECT_TRUE(any_difference);  // another seed, another dataset
}
