// Tests of scedit/safetensors.hpp: round trips, the validated memory-mapped reader, the reference
// fixtures and malformed files. Atomic saving and state dicts are in test_state_dict.cpp.

#include <scedit/safetensors.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace {

namespace fs = std::filesystem;
namespace st = scedit::safetensors;
using scedit_test::error_of;
using scedit_test::TempDir;
using scedit_test::expect_identical;
using scedit_test::random_tensor;
using scedit_test::tensor_bytes;

// ---- helpers -----------------------------------------------------------------------------------

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string le64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

/// A safetensors file written by hand: length, header (padded with spaces to 8 bytes), data.
std::string st_bytes(std::string header, const std::string& data) {
  header.append((8 - header.size() % 8) % 8, ' ');
  return le64(header.size()) + header + data;
}

bool points_into(const torch::Tensor& tensor, const st::File& file) {
  const auto* begin = static_cast<const uint8_t*>(file.data());
  const auto* pointer = static_cast<const uint8_t*>(tensor.data_ptr());
  return pointer >= begin && pointer < begin + file.data_size();
}

const std::vector<torch::ScalarType> kAllDtypes = {
    torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kInt64,
    torch::kInt32,   torch::kInt16,   torch::kInt8,    torch::kUInt8,    torch::kBool};

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  TempDir dir_{"safetensors"};
};

// ---- round trips ---------------------------------------------------------------------------------

TEST_F(Safetensors, RoundTripsEveryDtypeWithMetadata) {
  scedit::TensorMap tensors;
  for (const auto dtype : kAllDtypes) {
    const std::string name = st::dtype_name(dtype);
    tensors["matrix." + name] = random_tensor(dtype, {3, 5});
    tensors["scalar." + name] = random_tensor(dtype, {});               // 0-dim
    tensors["empty." + name] = random_tensor(dtype, {0, 4});            // no elements
    tensors["transposed." + name] = random_tensor(dtype, {4, 6}).t();   // non-contiguous
    tensors["strided." + name] = random_tensor(dtype, {20}).slice(0, 1, 20, 3);
  }
  ASSERT_FALSE(tensors["transposed.F32"].is_contiguous());
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "round trip"}};
  const std::string path = dir_.file("all.safetensors");
  st::save(path, tensors, metadata);

  const scedit::TensorMap loaded = st::load(path);
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [name, original] : tensors) {
    ASSERT_EQ(loaded.count(name), 1u) << name;
    expect_identical(loaded.at(name), original, name);
    EXPECT_EQ(loaded.at(name).dim(), original.dim()) << name;
    EXPECT_TRUE(loaded.at(name).device().is_cpu()) << name;
  }
  EXPECT_EQ(st::load_metadata(path), metadata);
}

TEST_F(Safetensors, DefaultMetadataIsFormatPt) {
  const std::string path = dir_.file("default.safetensors");
  st::save(path, {{"w", torch::ones({2})}});
  EXPECT_EQ(st::File(path).metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
}

TEST_F(Safetensors, SavedTensorsAreAlignedAndLoadAsViewsIntoTheMapping) {
  scedit::TensorMap tensors = {{"a.i8", random_tensor(torch::kInt8, {3})},
                               {"b.f64", random_tensor(torch::kFloat64, {5})},
                               {"c.f16", random_tensor(torch::kFloat16, {3})},
                               {"d.bool", random_tensor(torch::kBool, {1})},
                               {"e.f32", random_tensor(torch::kFloat32, {7})},
                               {"f.i16", random_tensor(torch::kInt16, {1})}};
  const std::string path = dir_.file("aligned.safetensors");
  st::save(path, tensors);
  const st::File file(path);
  ASSERT_EQ(file.tensors().size(), tensors.size());
  uint64_t previous_end = 0;
  for (const auto& info : file.tensors()) {
    EXPECT_EQ(info.begin, previous_end) << "tensors() is in offset order: " << info.name;
    previous_end = info.end;
    EXPECT_EQ(info.begin % c10::elementSize(info.dtype), 0u) << info.name;
    const torch::Tensor view = file.get(info.name);
    EXPECT_TRUE(points_into(view, file)) << info.name << " should be a view, not a copy";
    EXPECT_EQ(static_cast<const uint8_t*>(view.data_ptr()),
              static_cast<const uint8_t*>(file.data()) + info.begin)
        << info.name;
    expect_identical(view, tensors.at(info.name), info.name);
  }
}

TEST_F(Safetensors, ViewOutlivesTheFileAndWritesNeverReachTheDisk) {
  const torch::Tensor original = random_tensor(torch::kFloat32, {4, 4});
  const std::string path = dir_.file("view.safetensors");
  st::save(path, {{"w", original}});
  const std::string bytes_before = scedit_test::read_file(path);
  torch::Tensor view;
  {
    const st::File file(path);
    view = file.get("w");
    ASSERT_TRUE(points_into(view, file));
  }  // the File is gone; the view keeps the mapping alive
  expect_identical(view, original, "w");
  view.fill_(7.0f);
  EXPECT_TRUE(torch::equal(view, torch::full({4, 4}, 7.0f)));
  EXPECT_EQ(scedit_test::read_file(path), bytes_before);
  expect_identical(st::load(path).at("w"), original, "w");
}

TEST_F(Safetensors, UnalignedTensorIsCopiedCorrectly) {
  // Hand-made layout: 3 bytes of I8 put the F32 tensor at data offset 3 (unaligned).
  const float floats[2] = {1.5f, -2.25f};
  std::string data = "\x01\x02\x03";
  data.append(reinterpret_cast<const char*>(floats), sizeof(floats));
  data.push_back('\x09');
  const std::string path = dir_.file("unaligned.safetensors");
  write_bytes(path, st_bytes(R"({"a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
                                 "c": {"dtype": "U8", "shape": [], "data_offsets": [11, 12]}})",
                             data));
  const st::File file(path);
  ASSERT_EQ(reinterpret_cast<uintptr_t>(static_cast<const uint8_t*>(file.data()) + 3) % 4, 3u);
  const torch::Tensor b = file.get("b");
  EXPECT_FALSE(points_into(b, file)) << "an unaligned tensor must be copied";
  EXPECT_EQ(b.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(b, torch::tensor({1.5f, -2.25f})));
  const torch::Tensor a = file.get("a");
  EXPECT_TRUE(points_into(a, file));
  EXPECT_TRUE(torch::equal(a, torch::tensor({1, 2, 3}, torch::kInt8)));
  const torch::Tensor c = file.get("c");
  EXPECT_EQ(c.dim(), 0);
  EXPECT_EQ(c.item<uint8_t>(), 9);
}

TEST_F(Safetensors, ReadsTheFilesMetadata) {
  const std::string path = dir_.file("meta.safetensors");
  write_bytes(path, st_bytes(R"({"__metadata__": {"format": "pt", "author": "test"},
                                 "x": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})",
                             std::string(4, '\0')));
  const std::map<std::string, std::string> expected = {{"format", "pt"}, {"author", "test"}};
  EXPECT_EQ(st::load_metadata(path), expected);
  const st::File file(path);
  EXPECT_EQ(file.metadata(), expected);
  EXPECT_FALSE(file.contains("__metadata__"));
  EXPECT_TRUE(file.contains("x"));
  EXPECT_EQ(file.info("x").shape, std::vector<int64_t>{1});
}

TEST_F(Safetensors, EmptyFileAndZeroSizeTensorsWork) {
  const std::string empty = dir_.file("empty.safetensors");
  st::save(empty, {}, {});
  EXPECT_TRUE(st::load(empty).empty());
  EXPECT_TRUE(st::load_metadata(empty).empty());
  EXPECT_EQ(st::File(empty).data_size(), 0u);

  const std::string zero = dir_.file("zero.safetensors");  // no data section at all
  write_bytes(zero, st_bytes(R"({"e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
                                 "f": {"dtype": "I64", "shape": [3, 0], "data_offsets": [0, 0]}})",
                             ""));
  const scedit::TensorMap loaded = st::load(zero);
  ASSERT_EQ(loaded.size(), 2u);
  EXPECT_EQ(loaded.at("e").sizes(), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(loaded.at("f").scalar_type(), torch::kInt64);
  EXPECT_EQ(loaded.at("f").sizes(), (std::vector<int64_t>{3, 0}));
}

TEST_F(Safetensors, SavesCudaTensors_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Tensor cpu = torch::randn({4, 5});
  const std::string path = dir_.file("cuda.safetensors");
  st::save(path, {{"w", cpu.to(torch::kCUDA).t()}});
  expect_identical(st::load(path).at("w"), cpu.t(), "w");
}

// ---- the reference fixtures ----------------------------------------------------------------------

torch::ScalarType dtype_of_manifest(const std::string& name) {
  static const std::map<std::string, torch::ScalarType> table = {
      {"torch.float64", torch::kFloat64}, {"torch.float32", torch::kFloat32},
      {"torch.float16", torch::kFloat16}, {"torch.bfloat16", torch::kBFloat16},
      {"torch.int64", torch::kInt64},     {"torch.int32", torch::kInt32},
      {"torch.int16", torch::kInt16},     {"torch.int8", torch::kInt8},
      {"torch.uint8", torch::kUInt8},     {"torch.bool", torch::kBool}};
  const auto it = table.find(name);
  if (it == table.end()) throw std::runtime_error("manifest dtype not known to the test: " + name);
  return it->second;
}

TEST_F(Safetensors, ReadsEveryFixtureFileAsTheManifestDescribes) {
  const fs::path folder = scedit_test::fixtures_dir();
  std::ifstream manifest_file(folder / "manifest.json");
  ASSERT_TRUE(manifest_file.good()) << folder / "manifest.json";
  const nlohmann::json manifest = nlohmann::json::parse(manifest_file);

  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(folder)) {
    if (entry.path().extension() == ".safetensors") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  ASSERT_FALSE(files.empty()) << "no *.safetensors in " << folder;

  size_t listings_checked = 0;
  for (const auto& path : files) {
    SCOPED_TRACE(path.string());
    const st::File file(path.string());
    EXPECT_EQ(file.metadata().count("format"), 1u);

    // Every tensor's bytes, read independently with a stream, match what get() returns.
    std::ifstream raw(path, std::ios::binary);
    char length_bytes[8];
    raw.read(length_bytes, 8);
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | uint8_t(length_bytes[i]);
    scedit::TensorMap tensors;
    for (const auto& info : file.tensors()) {
      const torch::Tensor tensor = file.get(info.name);
      EXPECT_EQ(tensor.scalar_type(), info.dtype) << info.name;
      EXPECT_EQ(tensor.sizes(), torch::IntArrayRef(info.shape)) << info.name;
      std::string expected(info.end - info.begin, '\0');
      raw.seekg(static_cast<std::streamoff>(8 + header_size + info.begin));
      raw.read(expected.data(), static_cast<std::streamsize>(expected.size()));
      ASSERT_TRUE(raw.good()) << info.name;
      EXPECT_EQ(tensor_bytes(tensor), expected) << info.name;
      tensors.emplace(info.name, tensor);
    }

    // keys_<stem> lists shapes; cases_<prefix> (for <prefix>_cases) lists [shape, dtype].
    const std::string stem = path.stem().string();
    std::vector<std::string> listings = {"keys_" + stem};
    const std::string suffix = "_cases";
    if (stem.size() > suffix.size() && stem.compare(stem.size() - suffix.size(), suffix.size(),
                                                    suffix) == 0) {
      listings.push_back("cases_" + stem.substr(0, stem.size() - suffix.size()));
    }
    for (const auto& listing : listings) {
      if (!manifest.contains(listing)) continue;
      SCOPED_TRACE(listing);
      ++listings_checked;
      const auto& keys = manifest.at(listing);
      EXPECT_EQ(keys.size(), file.tensors().size());
      for (const auto& item : keys.items()) {
        ASSERT_TRUE(file.contains(item.key())) << item.key();
        const auto& info = file.info(item.key());
        const bool with_dtype = item.value().size() == 2 && item.value()[0].is_array();
        const auto shape = (with_dtype ? item.value()[0] : item.value()).get<std::vector<int64_t>>();
        EXPECT_EQ(info.shape, shape) << item.key();
        if (with_dtype) {
          EXPECT_EQ(info.dtype, dtype_of_manifest(item.value()[1].get<std::string>()))
              << item.key();
        }
      }
    }

    // What we read, we write back identically.
    const std::string copy = dir_.file(path.filename().string());
    st::save(copy, tensors, file.metadata());
    const scedit::TensorMap again = st::load(copy);
    ASSERT_EQ(again.size(), tensors.size());
    for (const auto& [name, tensor] : tensors) expect_identical(again.at(name), tensor, name);
  }
  EXPECT_GE(listings_checked, 1u) << "no fixture file has a keys_*/cases_* listing";
}

// ---- malformed files -----------------------------------------------------------------------------

/// One malformed file: its bytes, the substring its error must carry, and the key it names.
struct MalformedCase {
  std::string name;
  std::string bytes;
  std::string message;
  std::string key;      // "" when the problem is not one tensor's
  bool on_get = false;  // the header is valid; reading tensor `key` fails
};

void PrintTo(const MalformedCase& c, std::ostream* out) { *out << c.name; }

/// A file holding one tensor "w" whose header fields are given as JSON text.
std::string one_tensor(const std::string& dtype, const std::string& shape,
                       const std::string& offsets, const std::string& data) {
  return st_bytes(R"({"w": {"dtype": )" + dtype + R"(, "shape": )" + shape +
                      R"(, "data_offsets": )" + offsets + "}}",
                  data);
}

std::vector<MalformedCase> malformed_cases() {
  const std::string a = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const std::string z8(8, '\0'), z12(12, '\0'), z16(16, '\0');
  return {
      {"ShorterThanEightBytes", "\x01\x02\x03", "shorter than 8 bytes", ""},
      {"HeaderLengthOverTheLimit", le64(uint64_t{1} << 40) + "{}      ", "exceeds the limit", ""},
      {"HeaderLengthPastTheEndOfTheFile", le64(64) + "{}      ", "past the end of the file", ""},
      {"HeaderNotJson", st_bytes(R"({"a": {"dtype": )", ""), "not valid JSON", ""},
      {"HeaderNotAnObject", st_bytes("[1, 2]", ""), "header does not start with '{'", ""},
      {"EntryNotAnObject", st_bytes(R"({"w": 3})", ""), "header entry is not a JSON object", "w"},
      {"EntryLacksDtype", st_bytes(R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", z8),
       "lacks 'dtype'", "w"},
      {"EntryLacksShape", st_bytes(R"({"w": {"dtype": "F32", "data_offsets": [0, 8]}})", z8),
       "lacks 'shape'", "w"},
      {"EntryLacksDataOffsets", st_bytes(R"({"w": {"dtype": "F32", "shape": [2]}})", z8),
       "lacks 'data_offsets'", "w"},
      {"DtypeNotAString", one_tensor("4", "[2]", "[0, 8]", z8), "dtype is not a string", "w"},
      {"UnknownDtype", one_tensor(R"("F8_E4M3")", "[8]", "[0, 8]", z8),
       "unsupported dtype 'F8_E4M3'", "w"},
      {"ShapeNotAnArray", one_tensor(R"("F32")", "2", "[0, 8]", z8), "shape is not an array", "w"},
      {"NegativeShapeEntry", one_tensor(R"("F32")", "[2, -1]", "[0, 8]", z8),
       "shape[1] is negative", "w"},
      {"FractionalShapeEntry", one_tensor(R"("F32")", "[2.5]", "[0, 8]", z8),
       "shape[0] is not an integer", "w"},
      {"ShapeEntryTooLarge", one_tensor(R"("U8")", "[9223372036854775808]", "[0, 8]", z8),
       "shape[0] = 9223372036854775808 is too large", "w"},
      {"ByteSizeOverflows", one_tensor(R"("F32")", "[4611686018427387904, 4]", "[0, 8]", z8),
       "overflows 64 bits", "w"},
      {"DataOffsetsNotTwoIntegers", one_tensor(R"("F32")", "[2]", "[0, -8]", z8),
       "data_offsets must be two non-negative integers", "w"},
      {"DataOffsetsEndBeforeBegin", one_tensor(R"("F32")", "[0]", "[8, 4]", z8),
       "end 4 is before begin 8", "w"},
      {"ByteCountDisagreesWithShape", one_tensor(R"("F32")", "[2, 2]", "[0, 12]", z12),
       "hold 12 bytes but F32 [2, 2] needs 16", "w"},
      {"RangePastTheEndOfTheData", one_tensor(R"("F32")", "[4]", "[0, 16]", z8),
       "run past the end of the data section", "w"},
      {"OverlappingRanges",
       st_bytes(a + R"(, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", z12),
       "overlap tensor 'a'", "b"},
      {"HoleInTheData",
       st_bytes(a + R"(, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}})", z16),
       "hole in the data section", "b"},
      {"TrailingBytesInTheData", st_bytes(a + "}", z12), "4 trailing bytes", ""},
      {"MetadataNotAnObject", st_bytes(a + R"(, "__metadata__": 3})", z8),
       "__metadata__ is not a JSON object", ""},
      {"MetadataValueNotAString", st_bytes(a + R"(, "__metadata__": {"step": 1}})", z8),
       "__metadata__ value of 'step' is not a string", ""},
      {"DuplicateTensorName",
       st_bytes(a + R"(, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", z8),
       "duplicate tensor name 'a'", ""},
      {"DuplicateFieldInAnEntry",
       st_bytes(R"({"a": {"dtype": "F32", "dtype": "F64", "shape": [2], "data_offsets": [0, 8]}})",
                z8),
       "duplicate key 'dtype'", ""},
      {"BoolByteOtherThanZeroOrOne",
       st_bytes(R"({"flags": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}})",
                std::string("\x01\x02", 2)),
       "BOOL data holds a byte other than 0 or 1", "flags", /*on_get=*/true},
  };
}

class SafetensorsMalformed : public ::testing::TestWithParam<MalformedCase> {
 protected:
  TempDir dir_{"safetensors"};
};

TEST_P(SafetensorsMalformed, IsRefusedWithItsOwnMessage) {
  const MalformedCase& c = GetParam();
  const std::string path = dir_.file(c.name + ".safetensors");
  write_bytes(path, c.bytes);
  const std::string message = error_of([&] {
    const st::File file(path);
    if (c.on_get) file.get(c.key);
  });
  ASSERT_FALSE(message.empty()) << "the file was accepted";
  EXPECT_TRUE(contains(message, c.message)) << message;
  EXPECT_TRUE(contains(message, path)) << "the error names the file: " << message;
  if (!c.key.empty()) {
    EXPECT_TRUE(contains(message, "'" + c.key + "'")) << "the error names the key: " << message;
  }
  for (const auto& other : malformed_cases()) {  // each case has a message of its own
    if (other.name != c.name) {
      EXPECT_FALSE(contains(message, other.message)) << other.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Files, SafetensorsMalformed, ::testing::ValuesIn(malformed_cases()),
                         [](const ::testing::TestParamInfo<MalformedCase>& info) {
                           return info.param.name;
                         });

TEST_F(Safetensors, OpenErrorsNameThePath) {
  const std::string missing = dir_.file("missing.safetensors");
  const std::string message = error_of([&] { st::File file(missing); });
  EXPECT_TRUE(contains(message, "cannot open")) << message;
  EXPECT_TRUE(contains(message, missing)) << message;

  const std::string folder = dir_.path().string();
  EXPECT_TRUE(contains(error_of([&] { st::File file(folder); }), "not a regular file"));
}

// A file of another kind given where a safetensors file belongs (a JSON config, an image) is
// called what it is, not reported as a safetensors file with a nonsense header length.
TEST_F(Safetensors, OtherKindsOfFileAreNotSafetensorsFiles) {
  const std::vector<std::pair<std::string, std::string>> files = {
      {"config.json", R"({"kind": "sc_tuner", "options": [{"channels": 320}]})" "\n"},
      {"image.png", std::string("\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR", 16) + std::string(17, '\0')},
      {"notes.txt", "a few words of text, long enough for a header length\n"},
  };
  for (const auto& [name, bytes] : files) {
    const std::string path = dir_.file(name);
    write_bytes(path, bytes);
    const std::string message = error_of([&] { st::File file(path); });
    EXPECT_TRUE(contains(message, "'" + path + "' is not a safetensors file")) << message;
  }
}

TEST_F(Safetensors, AbsentKeyErrorNamesFileAndKey) {
  const std::string path = dir_.file("one.safetensors");
  st::save(path, {{"present", torch::zeros({1})}});
  const st::File file(path);
  const std::string message = error_of([&] { file.get("absent"); });
  EXPECT_TRUE(contains(message, "'absent'")) << message;
  EXPECT_TRUE(contains(message, path)) << message;
}

}  // namespace
