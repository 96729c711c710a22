#pragma once
/// @file weights_fixtures.hpp
/// @brief What the weight-loading tests share (test_weights.cpp: SD 1.5 and the key tables;
/// test_weights_xl.cpp: SD 2.1 and SDXL): writing JSON files, casting tensor maps, and the
/// `Weights` fixture with its scratch folder.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>

#include "test_util.hpp"

#include <filesystem>
#include <fstream>

namespace scedit_test::weights {

/// Writes `value` to `path`, making its folder.
inline void write_json(const std::filesystem::path& path, const nlohmann::json& value) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path) << value.dump(2);
}

/// `tensors` with every floating-point tensor in `dtype`.
inline scedit::TensorMap cast(const scedit::TensorMap& tensors, torch::Dtype dtype) {
  scedit::TensorMap out;
  for (const auto& [key, t] : tensors) out.emplace(key, t.is_floating_point() ? t.to(dtype) : t);
  return out;
}

/// A seeded test with a scratch folder for the model folders and files it writes.
class Weights : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }

  TempDir scratch_{"weights"};  ///< where a test writes its model folders and files
};

}  // namespace scedit_test::weights
