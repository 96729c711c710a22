#pragma once
/// @file generate_fixtures.hpp
/// @brief What the sampler's and the `generate` program's tests share: small settings on the tiny
/// model, a scratch folder, and tuner files with random (non-identity) weights.

#include <sd/sampler.hpp>
#include <sd/tiny.hpp>

#include <scedit/csctuner.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/tuner_io.hpp>

#include <torch/torch.h>

#include <filesystem>
#include <string>

#include "test_util.hpp"

namespace scedit_test::generate {

/// The settings every test starts from: 64×64 (8×8 latents), 3 steps, SCEdit's guidance.
inline sd::GenerateOptions small_options(uint64_t seed = 1) {
  sd::GenerateOptions options;
  options.width = 64;
  options.height = 64;
  options.steps = 3;
  options.seed = seed;
  return options;
}

/// A per-process scratch folder, removed at exit.
inline const std::filesystem::path& scratch() {
  static const scedit_test::TempDir dir("generate");
  return dir.path();
}

/// Fills every parameter of `module` with N(0, std²) from a seeded generator.
inline void randomize(torch::nn::Module& module, double std, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto generator = at::detail::createCPUGenerator(seed);
  for (auto& p : module.parameters()) p.copy_(torch::randn(p.sizes(), generator) * std);
}

/// SC-Tuners for the tiny UNet with random weights (ln2 non-zero, so they change the skips).
inline std::string sc_tuner_file() {
  const auto path = (scratch() / "sc.safetensors").string();
  if (std::filesystem::exists(path)) return path;
  auto pipe = sd::tiny_pipeline(0);
  auto tuners = scedit::attach_sc_tuners(*pipe.unet);
  for (auto& tuner : tuners) randomize(*tuner, 0.2, 11);
  scedit::save_sc_tuners(path, tuners);
  return path;
}

/// A Kohya-layout LoRA file for the tiny UNet's attention projections, B non-zero.
inline std::string lora_file() {
  const auto path = (scratch() / "lora_kohya.safetensors").string();
  if (std::filesystem::exists(path)) return path;
  auto pipe = sd::tiny_pipeline(0);
  auto lora = scedit::inject_lora(*pipe.unet, scedit::LoRAConfig(scedit::LoRAOptions(4).alpha(4))
                                                  .target_modules({"to_q", "to_k", "to_v", "to_out.0"}));
  {
    torch::NoGradGuard no_grad;
    auto generator = at::detail::createCPUGenerator(12);
    for (const auto& [path_in_model, layer] : lora.entries()) {
      auto b = layer->lora_B_weight("default");
      b.copy_(torch::randn(b.sizes(), generator) * 0.5);
    }
  }
  scedit::export_lora_kohya(path, lora);
  return path;
}

/// A CSC-Tuner for the tiny UNet with random weights everywhere (so its hint is non-zero).
inline std::string csc_tuner_file() {
  const auto path = (scratch() / "csc.safetensors").string();
  if (std::filesystem::exists(path)) return path;
  auto pipe = sd::tiny_pipeline(0);
  scedit::CSCTuner csc(scedit::CSCTunerOptions(pipe.unet->skip_channels(), pipe.unet->skip_down_flags())
                           .hint_channels(32));
  randomize(*csc, 0.1, 13);
  scedit::save_csc_tuner(path, csc);
  return path;
}

/// A random uint8 [64, 64, 3] image (the size of `small_options`).
inline torch::Tensor random_image(uint64_t seed) { return scedit_test::random_image(64, 64, seed); }

/// Largest absolute difference of two uint8 images.
inline int64_t max_pixel_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kInt32) - b.to(torch::kInt32)).abs().max().item<int64_t>();
}

}  // namespace scedit_test::generate
