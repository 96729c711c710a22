#pragma once
/// @file model.hpp
/// @brief Bringing up the model a program's flags name — real weights (a diffusers folder or a
/// single file), the built-in tiny model, or SD 1.5's architecture with random weights — on the
/// device and in the precision asked, the same way in every program.

#include <common/cpu_threads.hpp>
#include <common/memory.hpp>
#include <sd/precision.hpp>
#include <sd/sampler.hpp>
#include <sd/scheduler.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tiny.hpp>
#include <sd/pipeline.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

namespace common {

/// The `--model`, `--tokenizer` and `--zero-terminal-snr` flags.
struct ModelFlags {
  /// A diffusers folder or a single-file checkpoint; empty: the built-in tiny model; one of
  /// `kBuiltIn`'s names: another model with random weights.
  std::string model;
  /// A tokenizer folder (vocab.json, merges.txt), which a single-file checkpoint lacks.
  std::string tokenizer;
  /// Rescale the noise schedule to zero terminal SNR (the scheduler config's
  /// `rescale_betas_zero_snr`), for models trained so (sampling) or to train one; needs v
  /// prediction.
  bool zero_terminal_snr = false;

  /// A model with random weights that `--model` can name.
  struct BuiltIn {
    const char* name;  ///< the `--model` value
    const char* what;  ///< what it is, printed when it is chosen
    sd::StableDiffusion (*make)(uint64_t seed, torch::Dtype dtype);  ///< builds it on the CPU
  };
  /// The models with random weights `--model` can name: the tiny SDXL (for trying the programs on
  /// SDXL's layout) and the full-size architectures (for measuring speed and memory).
  static constexpr BuiltIn kBuiltIn[] = {
      {"tiny:sdxl", "the built-in tiny SDXL (SDXL base's layout, random weights): it runs the "
                    "whole SDXL path in seconds, but its images are noise", sd::tiny_sdxl_pipeline},
      {"random:sd15", "SD 1.5's architecture with random weights, for measuring speed and memory "
                      "at real size", sd::random_sd15_pipeline},
      {"random:sd21", "SD 2.1's architecture (768-v) with random weights, for measuring speed and "
                      "memory at real size", sd::random_sd21_pipeline},
      {"random:sdxl", "SDXL base's architecture with random weights, for measuring speed and "
                      "memory at real size", sd::random_sdxl_pipeline},
  };

  /// The built-in model `--model` names, or null for weights from a file or folder (and for
  /// the default tiny model, which `model` leaves empty).
  const BuiltIn* built_in() const {
    for (const auto& entry : kBuiltIn) {
      if (model == entry.name) return &entry;
    }
    return nullptr;
  }
  /// Whether the model has random weights (the built-in tiny model or one of `kBuiltIn`): such a
  /// model can train on generated demo data, but its images are noise.
  bool random_weights() const { return model.empty() || built_in() != nullptr; }
};

/// Adds `--model`, `--tokenizer` and `--zero-terminal-snr` to `app`.
inline void add_model_flags(CLI::App& app, ModelFlags& flags) {
  app.add_option("--model", flags.model, "Diffusers folder, or single-file checkpoint (.safetensors or .ckpt) "
                 "of SD 1.x, 2.x or SDXL (empty: the built-in tiny model; tiny:sdxl: a tiny SDXL; "
                 "random:sd15 / random:sd21 / random:sdxl: the full architectures with random weights, "
                 "for speed and memory measurements)")->group("Model");
  app.add_option("--tokenizer", flags.tokenizer, "Tokenizer folder (vocab.json, merges.txt) for "
                 "a single-file checkpoint")->group("Model");
  app.add_flag("--zero-terminal-snr", flags.zero_terminal_snr, "Rescale the noise schedule to zero "
               "terminal SNR (diffusers' rescale_betas_zero_snr; Lin et al. 2023), for a model "
               "trained so or to train one; needs v prediction")->group("Model");
}

/// Checks the model flags without loading anything: the paths exist.
inline void check_model_flags(const ModelFlags& flags) {
  if (!flags.random_weights() && !std::filesystem::exists(flags.model)) {
    std::string names;
    for (const auto& entry : ModelFlags::kBuiltIn) names += std::string(names.empty() ? "" : ", ") + entry.name;
    TORCH_CHECK(false, "--model: '", flags.model, "' does not exist (give a diffusers folder, a single "
                "file, or a built-in model: ", names, ")");
  }
  TORCH_CHECK(flags.tokenizer.empty() || !flags.model.empty(),
              "--tokenizer needs --model (the built-in model has its own tokenizer)");
  TORCH_CHECK(flags.tokenizer.empty() || std::filesystem::is_directory(flags.tokenizer),
              "--tokenizer: '", flags.tokenizer, "' is not a folder");
}

/// Resolves `--device auto|cpu|cuda|cuda:N`; `auto` picks CUDA when there is one. A program
/// that computes on the CPU also keeps the memory of freed tensors (`keep_freed_cpu_memory`) and
/// computes on every core it may use (`use_cpu_cores`).
inline torch::Device resolve_device(const std::string& flag) {
  torch::Device device(torch::kCPU);
  if (flag == "auto") {
    if (torch::cuda::is_available()) device = torch::Device(torch::kCUDA);
  } else {
    try {
      device = torch::Device(flag);
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "--device must be auto, cpu or cuda[:N], got '", flag, "'");
    }
    TORCH_CHECK(!device.is_cuda() || torch::cuda::is_available(),
                "--device ", flag, ": this build or machine has no CUDA device");
  }
  if (device.is_cpu()) {
    keep_freed_cpu_memory();
    use_cpu_cores();
  }
  return device;
}

/// The model `flags` name, with its weights in `precision`'s dtype on `device`; the random
/// weights of the built-in models are drawn from `seed`. The VAE and the text encoder are
/// frozen (eval mode, no gradients); the UNet is as loaded. `--zero-terminal-snr` sets the
/// scheduler config's `rescale_betas_zero_snr`, which sampling and `sd::noise_schedule` read.
inline sd::StableDiffusion load_model(const ModelFlags& flags, const torch::Device& device,
                                      sd::Precision precision, uint64_t seed) {
  check_model_flags(flags);
  const auto dtype = sd::compute_dtype(precision);
  sd::StableDiffusion pipe;
  if (const auto* built_in = flags.built_in()) {
    std::printf("--model %s: %s\n", built_in->name, built_in->what);
    pipe = built_in->make(seed, torch::kFloat32);
  } else if (flags.model.empty()) {
    std::printf("no --model given: the built-in tiny model (SD 1.5's layout, random weights): it "
                "runs the whole path in seconds, but its images are noise\n");
    pipe = sd::tiny_pipeline(seed);
  }
  if (flags.random_weights()) {
    pipe.to(device, dtype);
  } else {
    const auto start = std::chrono::steady_clock::now();
    auto options = sd::WeightsOptions().dtype(dtype).device(device);
    if (!flags.tokenizer.empty()) options.tokenizer(flags.tokenizer);
    pipe = sd::load_pipeline(flags.model, options);
    std::printf("model: %s (%.1f s)\n", flags.model.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    const std::filesystem::path model(flags.model);
    if (!std::filesystem::is_regular_file(model / "scheduler" / "scheduler_config.json")) {
      std::printf("model: no scheduler/scheduler_config.json: its family's scheduler is assumed (prediction_type "
                  "%s; --prediction overrides it)\n", sd::prediction_type(pipe).c_str());
    }
  }
  auto frozen = pipe.text_encoders();
  frozen.push_back(pipe.vae.get());
  for (auto* module : frozen) {
    module->eval();
    for (auto& p : module->parameters()) p.set_requires_grad(false);
  }
  if (flags.zero_terminal_snr) sd::set_scheduler_option(pipe.scheduler_config, "rescale_betas_zero_snr", true);
  return pipe;
}

}  // namespace common
