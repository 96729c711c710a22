#pragma once
/// @file sd_fixtures.hpp
/// @brief What the tests of the SD models share: the fixture cases, the tiny UNet and VAE with
/// the fixture weights, a skip-site probe, and the `Models` test fixture.
///
/// Sizes come from the fixtures, never from constants: a test that needs a batch, a latent size
/// or a text context of its own derives it from the case it runs next to (`unet_case`), so the
/// tests hold on any fixture set that $SCEDIT_FIXTURES names.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/sites.hpp>
#include <scedit/state_dict.hpp>
#include <sd/config.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include "test_util.hpp"

#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace scedit_test {

// ---- the fixture cases ------------------------------------------------------------------------

/// A tensor of the UNet cases ("input.sample", "input.encoder_hidden_states", "output.base", ...).
inline torch::Tensor unet_case(const std::string& key) { return fixture_tensor("unet_cases.safetensors", key); }

/// A tensor of the UNet cases at latent sizes that do not halve evenly (odd_size/README.md:
/// "odd_a.input.sample", "odd_a.output", ...).
inline torch::Tensor odd_size_case(const std::string& key) {
  return fixture_tensor("odd_size/unet_odd_cases.safetensors", key);
}

/// The names of the odd-size cases ("odd_a", ...): one per `{case}.output` of the file.
inline std::vector<std::string> odd_size_case_names() {
  const std::string suffix = ".output";
  std::vector<std::string> names;
  for (const auto& item : fixture("odd_size/unet_odd_cases.safetensors")) {
    const auto& key = item.first;
    if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0) {
      names.push_back(key.substr(0, key.size() - suffix.size()));
    }
  }
  return names;
}

/// A tensor of the other cases ("vae.input.image", "clip.input.ids", "ddim.input.eps", ...).
inline torch::Tensor other_case(const std::string& key) { return fixture_tensor("other_cases.safetensors", key); }

// ---- shapes ------------------------------------------------------------------------------------

/// Key -> shape of the tensors of a key list, a state dict or a module.
using Shapes = std::map<std::string, std::vector<int64_t>>;

/// The shapes of a manifest key list (`keys_unet_tiny`, ...).
inline Shapes shapes_of(const nlohmann::json& keys) {
  Shapes out;
  for (const auto& [key, shape] : keys.items()) out.emplace(key, shape.get<std::vector<int64_t>>());
  return out;
}

/// The shapes of `tensors`.
inline Shapes shapes_of(const scedit::TensorMap& tensors) {
  Shapes out;
  for (const auto& [key, tensor] : tensors) out.emplace(key, tensor.sizes().vec());
  return out;
}

/// The shapes of `module`'s state dict.
inline Shapes shapes_of(const torch::nn::Module& module) { return shapes_of(scedit::state_dict(module)); }

/// The number of parameter elements of `module`.
inline int64_t parameter_count(const torch::nn::Module& module) {
  int64_t count = 0;
  for (const auto& p : module.parameters()) count += p.numel();
  return count;
}

/// "[2, 4, 16, 16]", as LibTorch prints sizes in its error messages.
inline std::string shape_string(torch::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

// ---- the tiny models ---------------------------------------------------------------------------

/// The manifest's tiny UNet configuration.
inline sd::UNetConfig tiny_unet_config() { return sd::UNetConfig::from_json(config_json("unet_tiny")); }

/// The manifest's tiny VAE configuration.
inline sd::VAEConfig tiny_vae_config() { return sd::VAEConfig::from_json(config_json("vae_tiny")); }

/// The tiny UNet with the fixture weights, in `dtype`, eval mode.
inline sd::UNet tiny_unet(torch::ScalarType dtype) {
  sd::UNet unet(tiny_unet_config());
  unet->to(dtype);
  scedit::load_state_dict(*unet, fixture("unet_tiny.safetensors"));
  unet->eval();
  return unet;
}

/// The tiny VAE with the fixture weights, in `dtype`, eval mode.
inline sd::VAE tiny_vae(torch::ScalarType dtype) {
  sd::VAE vae(tiny_vae_config());
  vae->to(dtype);
  scedit::load_state_dict(*vae, fixture("vae_tiny.safetensors"));
  vae->eval();
  return vae;
}

/// The base case's output of `unet` in `dtype` (inputs cast to it).
inline torch::Tensor run_base(sd::UNet& unet, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  return unet(unet_case("input.sample").to(dtype), unet_case("input.timestep"),
              unet_case("input.encoder_hidden_states").to(dtype));
}

/// A skip editor for probing the sites: records the skips it sees, adds `value · s` (0 by
/// default, so the output must not change), or `factor · s` where a factor is set.
struct ProbeEditor : scedit::SkipEditor {
  std::vector<std::vector<int64_t>> shapes;
  bool saw_graph = false;
  torch::Tensor factor;  // optional trainable factor: delta = factor · s
  double value = 0.0;

  torch::Tensor delta(const torch::Tensor& skip) override {
    shapes.push_back(skip.sizes().vec());
    saw_graph = saw_graph || skip.requires_grad() || skip.grad_fn() != nullptr;
    if (factor.defined()) return factor * skip;
    return skip * value;
  }
  double scale() const override { return 1.0; }
  void set_scale(double) override {}
};

/// The fixture of the model tests: a seeded generator.
class Models : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }

  /// The base case's output of the float32 tiny UNet on `device`, set up by `configure`, with a
  /// trainable factor 0.1 on each skip, and the gradients of mean(output²) with respect to those
  /// factors (both returned on the CPU).
  static std::pair<torch::Tensor, torch::Tensor> output_and_skip_gradients(
      const std::function<void(sd::UNet&)>& configure, torch::Device device = torch::kCPU) {
    auto unet = tiny_unet(torch::kFloat32);
    unet->to(device);
    for (auto& p : unet->parameters()) p.requires_grad_(false);
    configure(unet);
    std::vector<std::shared_ptr<ProbeEditor>> probes;
    for (auto& site : unet->skip_sites()) {
      probes.push_back(std::make_shared<ProbeEditor>());
      probes.back()->factor = torch::full({}, 0.1, torch::TensorOptions().device(device).requires_grad(true));
      site->attach("probe", probes.back());
    }
    auto out = unet(unet_case("input.sample").to(device, torch::kFloat32), unet_case("input.timestep").to(device),
                    unet_case("input.encoder_hidden_states").to(device, torch::kFloat32));
    out.square().mean().backward();
    std::vector<torch::Tensor> grads;
    for (auto& probe : probes) grads.push_back(probe->factor.grad());
    return {out.detach().cpu(), torch::stack(grads).cpu()};
  }
};

}  // namespace scedit_test
