#pragma once
/// @file controlnet_fixtures.hpp
/// @brief What the ControlNet tests share: controlnet/'s manifest and cases, and the tiny
/// ControlNet with the fixture's weights. Every size comes from them.

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <sd/controlnet.hpp>

#include "test_util.hpp"

#include <fstream>
#include <string>

namespace scedit_test::controlnet {

/// controlnet/manifest.json.
inline const nlohmann::json& manifest() {
  static const nlohmann::json m = [] {
    std::ifstream in(scedit_test::fixtures_dir() / "controlnet" / "manifest.json");
    EXPECT_TRUE(in.good()) << "cannot open controlnet/manifest.json in " << scedit_test::fixtures_dir();
    return nlohmann::json::parse(in);
  }();
  return m;
}

/// The cases: inputs, residual outputs, the UNet driven by them.
/// The cases: inputs, residual outputs, the UNet driven by them.
inline const scedit::TensorMap& cases() { return scedit_test::fixture("controlnet/controlnet_cases.safetensors"); }
/// The tiny ControlNet's weights.
inline const scedit::TensorMap& tiny_weights() { return scedit_test::fixture("controlnet/controlnet_tiny.safetensors"); }

/// The tiny ControlNet's configuration.
inline sd::ControlNetConfig tiny_config() {
  return sd::ControlNetConfig::from_json(manifest().at("configs").at("controlnet_tiny"));
}

/// The tiny ControlNet with `weights` (default: the fixture's), in `dtype`, eval mode.
inline sd::ControlNet tiny_controlnet(torch::Dtype dtype, const scedit::TensorMap& weights = tiny_weights()) {
  sd::ControlNet controlnet(tiny_config());
  controlnet->to(dtype);
  scedit::load_state_dict(*controlnet, weights);
  controlnet->eval();
  return controlnet;
}

/// A case tensor in `dtype` (integer tensors as they are).
inline torch::Tensor input(const std::string& key, torch::Dtype dtype = torch::kFloat64) {
  const auto& t = cases().at(key);
  return t.is_floating_point() ? t.to(dtype) : t;
}

/// The number of down residuals of the cases.
inline size_t residual_count() { return manifest().at("down_res_channels").size(); }

/// The ControlNet's residuals on the case inputs in `dtype`; with `reference_features`, from the
/// reference's own float32 timestep features (`debug.timestep_features`).
inline sd::UNetResiduals run(sd::ControlNet& controlnet, torch::Dtype dtype, double scale = 1.0,
                             bool reference_features = false) {
  torch::NoGradGuard no_grad;
  const auto sample = input("input.sample", dtype);
  const auto context = input("input.encoder_hidden_states", dtype);
  const auto cond = input("input.controlnet_cond", dtype);
  if (reference_features) {
    return controlnet->forward_with_time_features(sample, cases().at("debug.timestep_features"),
                                                  context, cond, scale);
  }
  return controlnet->forward(sample, cases().at("input.timestep"), context, cond, scale);
}

/// The largest relative error of `residuals` against the case outputs `prefix`.down.{i} / .mid.
inline double max_error(const sd::UNetResiduals& residuals, const std::string& prefix) {
  EXPECT_EQ(residuals.down.size(), residual_count());
  double worst = scedit_test::rel_err(residuals.mid, cases().at(prefix + ".mid"));
  for (size_t i = 0; i < residuals.down.size(); ++i) {
    const auto& expected = cases().at(prefix + ".down." + std::to_string(i));
    EXPECT_EQ(residuals.down[i].sizes(), expected.sizes()) << prefix << ".down." << i;
    worst = std::max(worst, scedit_test::rel_err(residuals.down[i], expected));
  }
  return worst;
}

/// The float64 bound with this build's own timestep features: the reference computed them in
/// float32 with an older torch whose exp/sin/cos differ by an ulp in some elements
/// (controlnet/README.md: ~1e-8); with the reference's features (`debug.timestep_features`)
/// everything is float64 and agrees to ~1e-12.
inline constexpr double kFloat64OwnFeatures = 1e-7;
inline constexpr double kFloat64ReferenceFeatures = 1e-10;
inline constexpr double kFloat32 = 1e-4;

/// True when `key` starts with one of `prefixes` followed by a dot.
inline bool under(const std::string& key, const nlohmann::json& prefixes) {
  for (const auto& prefix : prefixes) {
    if (key.rfind(prefix.get<std::string>() + ".", 0) == 0) return true;
  }
  return false;
}

}  // namespace scedit_test::controlnet
