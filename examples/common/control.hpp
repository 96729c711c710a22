#pragma once
/// @file control.hpp
/// @brief What controllable generation trains (`train_control --method`): a CSC-Tuner on the
/// skips, optionally with SC-Tuners, as a `Trainable` whose denoiser hands each batch's condition
/// images to the CSC-Tuner for that forward pass; or, as the baseline, a ControlNet whose
/// residuals the frozen UNet adds. And the files each is saved in: scepter's CSC layout with its
/// options in the sidecar (`generate --tuner`), a diffusers ControlNet folder (`--controlnet`).

#include <common/train_step.hpp>
#include <common/tuners.hpp>

#include <sd/controlnet.hpp>
#include <sd/controlnet_weights.hpp>
#include <sd/unet.hpp>

#include <scedit/csctuner.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

namespace common {

/// How a CSC-Tuner is built and which tuners train with it (the `train_control` flags).
struct ControlOptions {
  std::string method = "csc";  ///< csc | csc+sc | controlnet
  int64_t kernel_size = 3;     ///< dense hint convs: 3 (the released configurations) or 1 (the paper's count)
  /// Width multiplier r of the pre-hint convs; 0: the model's (`with_model_defaults`).
  int64_t hint_ratio = 0;
  /// Output channels P of the pre-hint encoder; 0: the model's (`with_model_defaults`).
  int64_t hint_channels = 0;
  double down_ratio = 1.0;     ///< per-skip MLP hidden width / skip channels
  std::string skips;  ///< regex over the skip sites the CSC-Tuner edits (lsc_identity.0 … 11); empty = all
};

/// The tuners of a controllable-generation run.
struct ControlTuners {
  scedit::CSCTuner csc{nullptr};  ///< the CSC-Tuner, attached as "csc"
  std::vector<scedit::SCTuner> sc;  ///< SC-Tuners with it (`csc+sc`), else none

  /// Writes `csc_tuner.safetensors` (+ `.json`) and, with SC-Tuners, `sc_tuners.safetensors`.
  std::vector<std::string> save(const std::filesystem::path& folder) const {
    std::filesystem::create_directories(folder);
    std::vector<std::string> written{(folder / "csc_tuner.safetensors").string()};
    scedit::save_csc_tuner(written.back(), csc);
    if (!sc.empty()) {
      written.push_back((folder / "sc_tuners.safetensors").string());
      scedit::save_sc_tuners(written.back(), sc);
    }
    return written;
  }
};

/// Checks `train_control`'s tuner flags, each message naming its flag and what it accepts
/// (before any model loads; `attach_control_tuners` checks again).
inline void check_control_options(const ControlOptions& options) {
  TORCH_CHECK(options.method == "csc" || options.method == "csc+sc" || options.method == "controlnet",
              "--method must be csc, csc+sc or controlnet, got '", options.method, "'");
  TORCH_CHECK(options.kernel_size == 1 || options.kernel_size == 3, "--hint-kernel must be 1 or 3, got ",
              options.kernel_size);
  TORCH_CHECK(options.hint_ratio >= 0, "--hint-ratio must be positive, or 0 for the model's, got ", options.hint_ratio);
  TORCH_CHECK(options.hint_channels >= 0, "--hint-channels must be positive, or 0 for the model's, got ",
              options.hint_channels);
  TORCH_CHECK(std::isfinite(options.down_ratio) && options.down_ratio > 0,
              "--csc-down-ratio must be a positive number, got ", options.down_ratio);
  check_regex_flag("--csc-skips", options.skips);
  TORCH_CHECK(options.method != "controlnet" || (options.skips.empty() && options.hint_ratio == 0 &&
                                                 options.hint_channels == 0 && options.down_ratio == 1.0),
              "--csc-skips, --hint-ratio, --hint-channels and --csc-down-ratio shape a CSC-Tuner: "
              "--method controlnet takes none of them");
}

/// `options` with the hint encoder the model's layout takes where they leave it to the model
/// (0): SCEdit.md's r = 2, P = 320 for SDXL (a UNet with added conditioning), r = 1, P = 256
/// for SD 1.x and 2.x.
inline ControlOptions with_model_defaults(ControlOptions options, const sd::UNetConfig& unet) {
  const bool sdxl = unet.has_text_time();
  if (options.hint_ratio == 0) options.hint_ratio = sdxl ? 2 : 1;
  if (options.hint_channels == 0) options.hint_channels = sdxl ? 320 : 256;
  return options;
}

/// Attaches a fresh CSC-Tuner (and SC-Tuners for `csc+sc`) to `unet`, freezes everything else,
/// and keeps the trainable weights in float32 on `device`.
inline ControlTuners attach_control_tuners(sd::UNet& unet, const ControlOptions& flags,
                                           const torch::Device& device) {
  check_control_options(flags);
  const auto options = with_model_defaults(flags, unet->config);
  TORCH_CHECK(options.method != "controlnet", "attach_control_tuners: a ControlNet is made by make_controlnet");
  ControlTuners tuners;
  // Which skips it edits, decoder order: the sites (decoder order) whose path matches.
  std::vector<bool> edited;
  if (!options.skips.empty()) {
    const auto all = scedit::find_sites(*unet);
    const auto chosen = scedit::find_sites(*unet, options.skips);
    TORCH_CHECK(!chosen.empty(), "--csc-skips: no skip site matches '", options.skips,
                "' (the sites are lsc_identity.0 … ", all.size() - 1, ", decoder order)");
    for (const auto& site : all) {
      edited.push_back(std::any_of(chosen.begin(), chosen.end(),
                                   [&](const scedit::SiteRef& c) { return c.path == site.path; }));
    }
  }
  tuners.csc = scedit::CSCTuner(scedit::CSCTunerOptions(unet->skip_channels(), unet->skip_down_flags())
                                    .kernel_size(options.kernel_size)
                                    .hint_ratio(options.hint_ratio)
                                    .hint_channels(options.hint_channels)
                                    .down_ratio(options.down_ratio)
                                    .edited_skips(edited));
  scedit::attach_csc_tuner(*unet, tuners.csc, "csc");
  if (options.method == "csc+sc") tuners.sc = scedit::attach_sc_tuners(*unet);
  scedit::freeze_except_tuners(*unet);
  tuners.csc->freeze_unedited();  // --csc-skips: what only the other skips use does not train (the file keeps it)
  torch::NoGradGuard no_grad;
  for (auto& p : scedit::tuner_parameters(*unet)) p.set_data(p.data().to(device, torch::kFloat32));
  return tuners;
}

/// What training `tuners` on `unet` is: their parameters; the UNet as the denoiser, the CSC-Tuner
/// given the batch's first condition through a `scedit::ConditionScope` for each forward pass; the
/// CSC (and SC) files at the end. Its settings record the hint encoder as built (the model's
/// where `options` leave it 0). `tuners` must outlive the result.
inline Trainable control_trainable(sd::UNet unet, ControlTuners& tuners, const ControlOptions& flags) {
  const auto options = with_model_defaults(flags, unet->config);
  Trainable trainable;
  trainable.parameters = trainable_parameters(*unet);
  trainable.denoiser = [unet, csc = tuners.csc](const torch::Tensor& noisy, const torch::Tensor& t,
                                                const torch::Tensor& text, const sd::UNetAddedConditions& added,
                                                const std::vector<torch::Tensor>& conditions) mutable {
    TORCH_CHECK(conditions.size() == 1, "a CSC-Tuner trains on one condition image per sample, got ",
                conditions.size());
    scedit::ConditionScope scope;
    scope.set(csc, conditions.front());
    return unet->forward(noisy, t, text, added);
  };
  trainable.settings = {{"method", options.method}, {"kernel_size", options.kernel_size},
                        {"hint_ratio", options.hint_ratio}, {"hint_channels", options.hint_channels},
                        {"down_ratio", options.down_ratio}, {"skips", options.skips}};
  trainable.save = [&tuners](const std::filesystem::path& folder) { return tuners.save(folder); };
  return trainable;
}

/// A ControlNet made from `unet` (diffusers' `from_unet`: its encoder copied, its zero
/// convolutions zero, so it adds nothing until trained), float32 on `device`, to train; the UNet
/// frozen entirely. On SDXL it reads the batch's added conditioning as its UNet does.
inline sd::ControlNetModel make_controlnet(sd::UNet& unet, const torch::Device& device) {
  for (auto& p : unet->parameters()) p.set_requires_grad(false);
  auto controlnet = sd::controlnet_from_unet(unet);
  controlnet->to(device, torch::kFloat32);
  controlnet->train();
  return controlnet;
}

/// What training `controlnet` for `unet` is: its parameters (checkpoint keys `controlnet.*`); the
/// UNet driven by the ControlNet's residuals for the batch's first condition as the denoiser;
/// the diffusers folder `controlnet/` at the end.
inline Trainable controlnet_trainable(sd::UNet unet, sd::ControlNetModel controlnet) {
  Trainable trainable;
  for (const auto& p : trainable_parameters(*controlnet)) {
    trainable.parameters.emplace_back("controlnet." + p.first, p.second);
  }
  trainable.denoiser = [unet, controlnet](const torch::Tensor& noisy, const torch::Tensor& t,
                                          const torch::Tensor& text, const sd::UNetAddedConditions& added,
                                          const std::vector<torch::Tensor>& conditions) mutable {
    TORCH_CHECK(conditions.size() == 1, "a ControlNet trains on one condition image per sample, got ",
                conditions.size());
    return unet->forward(noisy, t, text, added, controlnet->forward(noisy, t, text, added, conditions.front()));
  };
  trainable.settings = {{"method", "controlnet"}};
  trainable.save = [controlnet](const std::filesystem::path& folder) {
    return std::vector<std::string>{sd::save_controlnet(folder / "controlnet", controlnet).string()};
  };
  return trainable;
}

}  // namespace common
