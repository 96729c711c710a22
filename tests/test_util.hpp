#pragma once
/// @file test_util.hpp
/// @brief What every test file shares: where the reference data is and its manifest and tensors,
/// the message of an error, a scratch folder, and how tensors are compared.

#include <scedit/safetensors.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace scedit_test {

// ---- reference data ----------------------------------------------------------------------------

/// `$variable` when set (relative paths are taken from the repository root), else `fallback`
/// under the repository root.
inline std::filesystem::path env_or(const char* variable, const char* fallback) {
  if (const char* value = std::getenv(variable); value != nullptr && *value != '\0') {
    std::filesystem::path path(value);
    return path.is_absolute() ? path : std::filesystem::path(SCEDIT_SOURCE_DIR) / path;
  }
  return std::filesystem::path(SCEDIT_SOURCE_DIR) / fallback;
}

/// Folder of the reference fixtures (manifest.json, *.safetensors, controlnet/, odd_size/):
/// `$SCEDIT_FIXTURES`, else the repository's copy in tests/data/fixtures.
inline std::filesystem::path fixtures_dir() { return env_or("SCEDIT_FIXTURES", "tests/data/fixtures"); }

/// Folder of the other test data (clip/, images/): `$SCEDIT_DATA`, else tests/data.
inline std::filesystem::path data_dir() { return env_or("SCEDIT_DATA", "tests/data"); }

/// The fixtures' manifest.json: model configurations, key lists, parameter counts, case shapes.
inline const nlohmann::json& manifest() {
  static const nlohmann::json m = [] {
    std::ifstream in(fixtures_dir() / "manifest.json");
    EXPECT_TRUE(in.good()) << "cannot open manifest.json in " << fixtures_dir();
    return nlohmann::json::parse(in);
  }();
  return m;
}

/// The manifest's configuration `name` ("unet_tiny", "vae_sd15", "clip_text_tiny", ...).
inline const nlohmann::json& config_json(const std::string& name) { return manifest().at("configs").at(name); }

/// The path of the fixture file `file` ("adapters_tiny.safetensors", "controlnet/...", ...).
inline std::string fixture_path(const std::string& file) { return (fixtures_dir() / file).string(); }

/// The tensors of the fixture file `file` ("unet_tiny.safetensors", ...), read once per process.
inline const scedit::TensorMap& fixture(const std::string& file) {
  static std::map<std::string, scedit::TensorMap> cache;
  auto it = cache.find(file);
  if (it == cache.end()) it = cache.emplace(file, scedit::safetensors::load(fixture_path(file))).first;
  return it->second;
}

/// The tensor `key` of the fixture file `file` (an empty tensor, and a failure, where it lacks it).
inline torch::Tensor fixture_tensor(const std::string& file, const std::string& key) {
  const auto& tensors = fixture(file);
  const auto it = tensors.find(key);
  EXPECT_NE(it, tensors.end()) << key << " not in " << file;
  return it == tensors.end() ? torch::Tensor() : it->second;
}

// ---- errors ------------------------------------------------------------------------------------

/// The message of what `f` throws (a `c10::Error` without its backtrace, or any
/// `std::exception`), or "" when it throws nothing.
template <typename F>
std::string error_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

/// Expects `statement` to throw an error whose message contains `text`.
#define EXPECT_ERROR_MENTIONS(statement, text)                                             \
  do {                                                                                     \
    const std::string message_ = scedit_test::error_of([&] { (void)(statement); });        \
    EXPECT_FALSE(message_.empty()) << #statement " did not throw";                         \
    EXPECT_NE(message_.find(text), std::string::npos) << "message: " << message_;          \
  } while (0)

// ---- files -------------------------------------------------------------------------------------

/// The bytes of a file ("" when it cannot be read).
inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// Writes `bytes` to a file, replacing it.
inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// A fresh, empty folder under the system's temporary folder, removed with its contents when the
/// object goes away. Unique per process and object, so tests can run in parallel.
class TempDir {
 public:
  /// `name` appears in the folder's name, to tell the folders of different tests apart.
  explicit TempDir(const std::string& name = "test") {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("scedit_" + name + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }

  /// The folder.
  const std::filesystem::path& path() const { return path_; }
  /// The path of `name` inside the folder, as a string.
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  /// The names of the folder's entries, sorted.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  std::filesystem::path path_;
};

// ---- numerics ----------------------------------------------------------------------------------

/// ||out - ref|| / ||ref||, in float64.
inline double rel_err(const torch::Tensor& out, const torch::Tensor& ref) {
  const auto o = out.to(torch::kFloat64), r = ref.to(torch::kFloat64);
  return (o - r).norm().item<double>() / r.norm().item<double>();
}

/// Tolerance of a fused kernel's result in `dtype` against float64 on the same rounded inputs:
/// float32 arithmetic, one rounding to the element type.
inline double fused_tolerance(torch::Dtype dtype) {
  return dtype == torch::kFloat32 ? 1e-5 : dtype == torch::kFloat16 ? 3e-3 : 2e-2;
}

/// `t` in float64, detached, as a leaf that records its gradient: the reference side of a
/// comparison (undefined stays undefined).
inline torch::Tensor float64_leaf(const torch::Tensor& t) {
  return t.defined() ? t.detach().to(torch::kFloat64).requires_grad_(true) : t;
}

/// The raw bytes of a tensor, in row-major order.
inline std::string tensor_bytes(const torch::Tensor& tensor) {
  const torch::Tensor dense = tensor.contiguous();
  const auto* data = static_cast<const char*>(dense.data_ptr());
  return dense.numel() == 0 ? std::string() : std::string(data, data + dense.nbytes());
}

/// Expects bit-exact equality: same dtype, same shape, same bytes (`key` names the tensor).
inline void expect_identical(const torch::Tensor& actual, const torch::Tensor& expected,
                             const std::string& key) {
  EXPECT_EQ(actual.scalar_type(), expected.scalar_type()) << key;
  EXPECT_EQ(actual.sizes(), expected.sizes()) << key;
  EXPECT_EQ(tensor_bytes(actual), tensor_bytes(expected)) << key;
}

/// A random tensor of the given dtype and shape (from the global generator).
inline torch::Tensor random_tensor(torch::ScalarType dtype, torch::IntArrayRef shape) {
  if (dtype == torch::kBool) return torch::randint(0, 2, shape).to(torch::kBool);
  if (dtype == torch::kUInt8) return torch::randint(0, 256, shape).to(dtype);
  if (torch::isIntegralType(dtype, /*includeBool=*/false)) {
    return torch::randint(-100, 100, shape).to(dtype);
  }
  return torch::randn(shape, torch::kFloat64).to(dtype);
}

/// Sets the default dtype for a scope (restored on exit): to build a full-size model in bf16,
/// where only its keys, shapes and counts are checked.
struct DefaultDtypeGuard {
  /// Makes `dtype` the default until the guard goes away.
  explicit DefaultDtypeGuard(caffe2::TypeMeta dtype) : previous(torch::get_default_dtype()) {
    torch::set_default_dtype(dtype);
  }
  ~DefaultDtypeGuard() { torch::set_default_dtype(previous); }
  DefaultDtypeGuard(const DefaultDtypeGuard&) = delete;
  DefaultDtypeGuard& operator=(const DefaultDtypeGuard&) = delete;
  caffe2::TypeMeta previous;  ///< restored on exit
};

/// A seeded random uint8 image [h, w, 3].
inline torch::Tensor random_image(int64_t h, int64_t w, uint64_t seed = 1) {
  auto generator = at::detail::createCPUGenerator(seed);
  return torch::randint(0, 256, {h, w, 3}, generator, torch::kLong).to(torch::kUInt8);
}

/// Draws a norm's affine parameters around weight 1 and bias 0, so that both matter in a test.
template <typename NormImpl>
void randomize_affine(NormImpl& norm) {
  torch::NoGradGuard no_grad;
  norm.weight.normal_(1.0, 0.5);
  norm.bias.normal_(0.0, 0.5);
}

}  // namespace scedit_test
