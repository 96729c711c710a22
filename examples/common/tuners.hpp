#pragma once
/// @file tuners.hpp
/// @brief The tuners a training program attaches to the UNet (`--method`): SC-Tuners on the
/// skips, LoRA in the attention and feed-forward layers, or both — and, on request, LoRA in the
/// text encoder; what they train as a `Trainable`, and the files they are saved in.

#include <common/strings.hpp>
#include <common/train_step.hpp>

#include <sd/clip.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/unet.hpp>

#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace common {

/// The modules LoRA adapts unless told otherwise: the attention projections and the
/// feed-forwards of SD's transformers (peft-style names; the seed's table uses these).
inline const char* const kDefaultLoRATargets = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2";
/// The text encoder's modules LoRA adapts with `--train-text-encoder`: attention and MLP, as
/// sd-scripts does.
inline const char* const kDefaultTextEncoderLoRATargets = "q_proj,k_proj,v_proj,out_proj,fc1,fc2";

/// Which tuners a run trains (the `--method` family of flags).
struct MethodOptions {
  std::string method = "scedit";  ///< scedit | lora | scedit+lora
  double sc_down_ratio = 1.0;     ///< SC-Tuner hidden width as a fraction of the skip channels
  std::string sc_pattern;         ///< regex over site paths (`lsc_identity\.[0-9]+`); empty = all 12
  int64_t lora_rank = 64;         ///< LoRA rank r (the seed's table uses 64)
  double lora_alpha = 8;          ///< LoRA alpha; scale alpha / r (the seed's table uses 8)
  std::string lora_targets = kDefaultLoRATargets;  ///< comma-separated peft-style module names
  bool train_text_encoder = false;  ///< LoRA in the text encoder(s) too (same rank and alpha)
  double text_encoder_lr = 0;       ///< its learning rate; 0: the run's
  std::string text_encoder_targets = kDefaultTextEncoderLoRATargets;  ///< its LoRA's modules
};

/// The tuners attached to a UNet for training.
struct TrainedTuners {
  std::vector<scedit::SCTuner> sc;            ///< SC-Tuners in decoder order (empty without SCEdit)
  std::optional<scedit::LoRAInjection> lora;  ///< LoRA layers (absent without LoRA)
  std::optional<scedit::LoRAInjection> text_lora;  ///< the text encoder's (`--train-text-encoder`)
  /// SDXL's second text encoder's, with `text_lora` (`--train-text-encoder` on SDXL).
  std::optional<scedit::LoRAInjection> text_lora_2;

  /// LoRA is injected weight-side: rebind the effective weights before each forward.
  void refresh() {
    if (lora) lora->refresh();
    if (text_lora) text_lora->refresh();
    if (text_lora_2) text_lora_2->refresh();
  }

  /// Writes the final weights in the library's formats into `folder`: `sc_tuners.safetensors`
  /// (+ `.json`), and for LoRA `lora_kohya.safetensors` and `lora_diffusers.safetensors` (the
  /// UNet's and the text encoders' adapters in one file each, as sd-scripts and diffusers write
  /// them: `lora_te1_` / `lora_te2_` with two text encoders) plus peft folders `lora/`,
  /// `lora_text_encoder/` and (SDXL) `lora_text_encoder_2/`.
  std::vector<std::string> save(const std::filesystem::path& folder) const {
    std::filesystem::create_directories(folder);
    std::vector<std::string> written;
    auto note = [&](const std::string& name) {
      written.push_back((folder / name).string());
      return written.back();
    };
    if (!sc.empty()) scedit::save_sc_tuners(note("sc_tuners.safetensors"), sc);
    if (lora || text_lora) {
      std::vector<scedit::LoRAPart> parts;
      if (lora) parts.push_back({scedit::LoRARole::unet, &*lora});
      if (text_lora) parts.push_back({scedit::LoRARole::text_encoder, &*text_lora});
      if (text_lora_2) parts.push_back({scedit::LoRARole::text_encoder_2, &*text_lora_2});
      if (lora) scedit::save_lora_peft(note("lora"), *lora);
      // Named as peft names a transformers CLIPTextModel's modules (`text_model.…`), which is
      // also how loaders tell a text encoder's peft folder from a UNet's.
      if (text_lora) scedit::save_lora_peft(note("lora_text_encoder"), *text_lora, "default",
                                            "base_model.model.text_model.");
      // The second encoder's paths already start at `text_model.` (its module holds one, beside
      // `text_projection`), as in transformers' CLIPTextModelWithProjection.
      if (text_lora_2) scedit::save_lora_peft(note("lora_text_encoder_2"), *text_lora_2);
      scedit::export_lora_diffusers(note("lora_diffusers.safetensors"), parts);
      scedit::export_lora_kohya(note("lora_kohya.safetensors"), parts);
    }
    return written;
  }
};

/// Checks the `--method` family of flags, each message naming its flag and what it accepts
/// (before any model loads; `attach_tuners` checks again).
inline void check_method_options(const MethodOptions& options) {
  TORCH_CHECK(options.method == "scedit" || options.method == "lora" || options.method == "scedit+lora",
              "--method must be scedit, lora or scedit+lora, got '", options.method, "'");
  TORCH_CHECK(std::isfinite(options.sc_down_ratio) && options.sc_down_ratio > 0,
              "--sc-down-ratio must be a positive number, got ", options.sc_down_ratio);
  check_regex_flag("--sc-skips", options.sc_pattern);
  TORCH_CHECK(options.lora_rank > 0, "--lora-rank must be positive, got ", options.lora_rank);
  TORCH_CHECK(std::isfinite(options.lora_alpha) && options.lora_alpha > 0,
              "--lora-alpha must be a positive number, got ", options.lora_alpha);
  TORCH_CHECK(!split_list(options.lora_targets).empty(), "--lora-targets names no module");
  TORCH_CHECK(!options.train_text_encoder || options.method != "scedit",
              "--train-text-encoder trains LoRA in the text encoder: give --method lora or scedit+lora");
  TORCH_CHECK(std::isfinite(options.text_encoder_lr) && options.text_encoder_lr >= 0,
              "--text-encoder-lr must be a number ≥ 0 (0: --lr), got ", options.text_encoder_lr);
  TORCH_CHECK(!split_list(options.text_encoder_targets).empty(), "--text-encoder-lora-targets names no module");
}

/// With `options.train_text_encoder`: injects LoRA (`--lora-rank`, `--lora-alpha`) into the
/// `--text-encoder-lora-targets` of `pipe`'s text encoder and, for SDXL, of its second one,
/// freezes the rest of them, and keeps the LoRA weights in float32 on `device`.
inline void attach_text_encoder_lora(TrainedTuners& tuners, sd::StableDiffusion& pipe,
                                     const MethodOptions& options, const torch::Device& device) {
  check_method_options(options);
  if (!options.train_text_encoder) return;
  auto inject = [&](torch::nn::Module& encoder) {
    auto injection = scedit::inject_lora(
        encoder, scedit::LoRAConfig(scedit::LoRAOptions(options.lora_rank).alpha(options.lora_alpha))
                     .target_modules(split_list(options.text_encoder_targets)));
    scedit::freeze_except_tuners(encoder);
    torch::NoGradGuard no_grad;
    for (auto& p : scedit::tuner_parameters(encoder)) p.set_data(p.data().to(device, torch::kFloat32));
    return injection;
  };
  tuners.text_lora = inject(*pipe.text_encoder);
  if (pipe.is_sdxl()) tuners.text_lora_2 = inject(*pipe.text_encoder_2);
}

/// Attaches the tuners `options` asks for to `unet`, freezes everything else, and keeps the
/// trainable weights in float32 on `device` whatever dtype the frozen weights have.
inline TrainedTuners attach_tuners(sd::UNet& unet, const MethodOptions& options,
                                   const torch::Device& device) {
  check_method_options(options);
  const bool sc = options.method == "scedit" || options.method == "scedit+lora";
  const bool lora = options.method == "lora" || options.method == "scedit+lora";
  TrainedTuners tuners;
  if (sc) {
    tuners.sc = scedit::attach_sc_tuners(
        *unet, scedit::SCAttachOptions().pattern(options.sc_pattern).down_ratio(options.sc_down_ratio));
  }
  if (lora) {
    tuners.lora = scedit::inject_lora(
        *unet, scedit::LoRAConfig(scedit::LoRAOptions(options.lora_rank).alpha(options.lora_alpha))
                   .target_modules(split_list(options.lora_targets)));
  }
  scedit::freeze_except_tuners(*unet);
  torch::NoGradGuard no_grad;
  for (auto& p : scedit::tuner_parameters(*unet)) p.set_data(p.data().to(device, torch::kFloat32));
  return tuners;
}

/// The parameters of `module` that train (a UNet's tuners after `attach_tuners`), each once,
/// with its name, in module order.
inline std::vector<std::pair<std::string, torch::Tensor>> trainable_parameters(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> named;
  std::unordered_set<const void*> seen;
  for (const auto& p : module.named_parameters()) {
    if (p.value().requires_grad() && seen.insert(p.value().unsafeGetTensorImpl()).second) {
      named.emplace_back(p.key(), p.value());
    }
  }
  return named;
}

/// What training `tuners` on `unet` is: their parameters, the UNet as the denoiser (LoRA's
/// weights rebound before each forward), `sc_tuners.safetensors` and the LoRA files at the end.
/// With a text-encoder LoRA (`attach_text_encoder_lora` on `pipe`, which must outlive the result)
/// the denoiser takes token ids and runs `sd::encode_tokens` first (for SDXL both encoders, the
/// pooled embedding then coming from the second); their LoRA parameters (named
/// `text_encoder.<path>`, `text_encoder_2.<path>`) form a second optimizer group at
/// `--text-encoder-lr`, relative to the run's `lr`. `tuners` must outlive the result.
inline Trainable tuner_trainable(sd::UNet unet, TrainedTuners& tuners, const MethodOptions& options,
                                 sd::StableDiffusion* pipe = nullptr, double lr = 0) {
  Trainable trainable;
  trainable.parameters = trainable_parameters(*unet);
  trainable.settings = {{"method", options.method}};
  if (tuners.text_lora) {
    TORCH_CHECK(pipe != nullptr, "tuner_trainable: the pipeline whose text encoder carries the LoRA is missing");
    TORCH_CHECK(lr > 0, "tuner_trainable: the run's learning rate is needed for --text-encoder-lr");
    const size_t unet_count = trainable.parameters.size();
    for (auto& [name, tensor] : trainable_parameters(*pipe->text_encoder)) {
      trainable.parameters.emplace_back("text_encoder." + name, tensor);
    }
    if (tuners.text_lora_2) {
      for (auto& [name, tensor] : trainable_parameters(*pipe->text_encoder_2)) {
        trainable.parameters.emplace_back("text_encoder_2." + name, tensor);
      }
    }
    const double text_lr = options.text_encoder_lr > 0 ? options.text_encoder_lr : lr;
    trainable.groups = {{unet_count, 1.0}, {trainable.parameters.size() - unet_count, text_lr / lr}};
    trainable.text_as_tokens = true;
    trainable.settings["text_encoder_lora"] = options.text_encoder_targets;
  }
  trainable.denoiser = [unet, pipe, &tuners](const torch::Tensor& noisy, const torch::Tensor& t,
                                             const torch::Tensor& text, const sd::UNetAddedConditions& added,
                                             const std::vector<torch::Tensor>& conditions) mutable {
    TORCH_CHECK(conditions.empty(), "SC-Tuners and LoRA take no condition images, got ",
                conditions.size());
    tuners.refresh();
    if (!tuners.text_lora) return unet->forward(noisy, t, text, added);
    auto encoded = sd::encode_tokens(*pipe, text);  // `text` holds token ids
    auto with_pooled = added;  // the batch's time ids, the pooled embedding of the LoRA'd encoder
    if (encoded.pooled.defined()) with_pooled.text_embeds = encoded.pooled.to(noisy.scalar_type());
    return unet->forward(noisy, t, encoded.context.to(noisy.scalar_type()), with_pooled);
  };
  trainable.save = [&tuners](const std::filesystem::path& folder) { return tuners.save(folder); };
  return trainable;
}

}  // namespace common
