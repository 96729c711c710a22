#pragma once
/// @file tuner_files.hpp
/// @brief Attaching tuner files — SC-Tuners, CSC-Tuners, LoRA in any of the layouts the library
/// reads (into the UNet and the text encoder) — to a Stable Diffusion, each at its own strength,
/// as `generate` does.
///
/// Example:
/// @code
/// sd::AttachedTuners tuners;
/// sd::attach_tuner_file(pipe, "style.safetensors", /*scale=*/0.8, tuners);
/// auto canny = sd::attach_tuner_file(pipe, "canny.safetensors", 1.0, tuners);
/// options.conditions.push_back({canny.name, edges});  // sampler.hpp
/// @endcode

#include <sd/lora_targets.hpp>
#include <sd/stable_diffusion.hpp>

#include <scedit/csctuner.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/tuner_io.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace sd {

/// One tuner file attached by `attach_tuner_file`.
struct AttachedTuner {
  scedit::TunerKind kind = scedit::TunerKind::kUnknown;  ///< What the file held.
  std::string name;    ///< Its name on the skip sites / its LoRA adapter / its CSC module.
  std::string path;    ///< The file.
  double scale = 1.0;  ///< Its strength (LoRA: the adapter weight).
  int64_t count = 0;   ///< Skip sites (SC, CSC) or layers (LoRA, all models) it edits.
  /// The format seen: LoRA, what loaded per model and format (`scedit::LoRALoadResult::describe`);
  /// SC / CSC, the layout (`scedit::detect_tuner_file`).
  std::string summary;
};

/// The tuner files attached to one pipeline, and the LoRA injections they share (LoRA layers of
/// a model belong to one `scedit::LoRAInjection`). Keep it alive while generating.
struct AttachedTuners {
  std::vector<AttachedTuner> tuners;                ///< In attachment order.
  std::shared_ptr<scedit::LoRAInjection> lora;       ///< The UNet's; made by the first LoRA file.
  std::shared_ptr<scedit::LoRAInjection> text_lora;  ///< The text encoder's; made with `lora`.
  std::shared_ptr<scedit::LoRAInjection> text_lora_2;  ///< SDXL's second text encoder's; made with `lora`.

  /// `file:scale` of each tuner, comma-separated ("" when none).
  std::string describe() const {
    std::ostringstream out;
    for (size_t i = 0; i < tuners.size(); ++i) {
      out << (i ? ", " : "") << std::filesystem::path(tuners[i].path).filename().string() << ":"
          << tuners[i].scale;
    }
    return out.str();
  }
};

/// "SC-Tuners", "CSC-Tuner", "LoRA" or "unknown".
inline const char* tuner_kind_name(scedit::TunerKind kind) {
  switch (kind) {
    case scedit::TunerKind::kSC: return "SC-Tuners";
    case scedit::TunerKind::kCSC: return "CSC-Tuner";
    case scedit::TunerKind::kLoRA: return "LoRA";
    case scedit::TunerKind::kUnknown: break;
  }
  return "unknown";
}

/// What a tuner path holds: `scedit::detect_tuner_file` for a file; for a folder, the SCEdit
/// weights `scedit::find_scedit_files` finds in it (a scepter or SWIFT folder), else a LoRA when
/// it has `adapter_model.safetensors` (peft) or `pytorch_lora_weights.safetensors` (diffusers).
/// `format`, when given, receives the format seen (not for a LoRA folder). Throws naming the path when it
/// does not exist.
inline scedit::TunerKind detect_tuner_path(const std::string& path, std::string* format = nullptr) {
  TORCH_CHECK(std::filesystem::exists(path), "tuner file '", path, "' does not exist");
  if (std::filesystem::is_directory(path)) {
    if (auto files = scedit::find_scedit_files(path)) return scedit::detect_tuner_file(files->weights, format);
    const std::filesystem::path folder(path);
    return std::filesystem::is_regular_file(folder / "adapter_model.safetensors") ||
                   std::filesystem::is_regular_file(folder / "pytorch_lora_weights.safetensors")
               ? scedit::TunerKind::kLoRA
               : scedit::TunerKind::kUnknown;
  }
  return scedit::detect_tuner_file(path, format);
}

/// Attaches the tuners of the file at `path` to `sd`'s UNet with strength `scale`, under a name
/// unique within `attached` (`sc0`, `csc1`, `lora2`, ...), on the UNet's device and dtype:
///  - SC-Tuners (`lsc_identity.*`, in this library's, scepter's or SWIFT's layout; a scepter or
///    SWIFT folder too): each at the skip site its keys name (`scedit::read_sc_tuners`); sites the
///    file leaves out stay unedited; scale `s + scale·(T(s) − s)`;
///  - a CSC-Tuner (`pre_hint_blocks.*`, this library's or scepter's layout; a scepter control
///    folder too): `read_csc_tuner` + `attach_csc_tuner`; its condition
///    image comes with each `generate` call (`GenerateOptions::conditions`, by the tuner's name);
///  - LoRA (any layout of scedit/lora_formats.hpp; a peft or diffusers folder too):
///    `scedit::load_lora` into the UNet's and the text encoder's shared injections
///    (`lora_targets`: LDM and transformers' names found too), adapter weight = `scale` on both.
///    A file may hold either model's keys or both; a key of neither is an error.
/// A tuner at scale 0 is attached but disabled: the images are exactly those without it.
/// Throws naming the file for a missing file, an unknown kind or a mismatch with the model;
/// the model is left unchanged then.
inline AttachedTuner attach_tuner_file(StableDiffusion& sd, const std::string& path, double scale,
                                       AttachedTuners& attached) {
  TORCH_CHECK(std::isfinite(scale), "tuner file '", path, "': scale must be finite, got ", scale);
  AttachedTuner tuner;
  tuner.kind = detect_tuner_path(path, &tuner.summary);
  tuner.path = path;
  tuner.scale = scale;
  const auto index = std::to_string(attached.tuners.size());
  const auto reference = detail::first_parameter(*sd.unet, "UNet");
  auto& unet = *sd.unet;
  switch (tuner.kind) {
    case scedit::TunerKind::kSC: {
      tuner.name = "sc" + index;
      auto tuners = scedit::read_sc_tuners(path);
      auto sites = unet.skip_sites();
      for (const auto& [site, sc] : tuners) {
        TORCH_CHECK(site < static_cast<int64_t>(sites.size()), "tuner file '", path,
                    "' holds an SC-Tuner for skip site ", site, " but the UNet has ", sites.size(),
                    " skip sites");
        TORCH_CHECK(sc->options.channels() == sites[site]->skip_channels(), "tuner file '", path,
                    "': the SC-Tuner for skip site ", site, " has ", sc->options.channels(),
                    " channels but that site of the UNet has ", sites[site]->skip_channels());
      }
      for (auto& [site, sc] : tuners) {
        sc->to(reference.device(), reference.scalar_type());
        sc->set_scale(scale);
        sites[site]->attach(tuner.name, sc.ptr(), sc.ptr());
        if (scale == 0) sites[site]->set_enabled(tuner.name, false);
      }
      tuner.count = static_cast<int64_t>(tuners.size());
      break;
    }
    case scedit::TunerKind::kCSC: {
      tuner.name = "csc" + index;
      auto csc = scedit::read_csc_tuner(path, "", unet.skip_down_flags());
      csc->to(reference.device(), reference.scalar_type());
      csc->options.scale(scale);
      try {
        scedit::attach_csc_tuner(unet, csc, tuner.name);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "tuner file '", path, "': ", e.what_without_backtrace());
      }
      if (scale == 0) scedit::set_tuner_enabled(unet, tuner.name, false);
      for (int64_t k = 0; k < csc->num_skips(); ++k) tuner.count += csc->edits(k);
      break;
    }
    case scedit::TunerKind::kLoRA: {
      tuner.name = "lora" + index;
      if (!attached.lora) attached.lora = std::make_shared<scedit::LoRAInjection>();
      if (!attached.text_lora) attached.text_lora = std::make_shared<scedit::LoRAInjection>();
      if (!attached.text_lora_2) attached.text_lora_2 = std::make_shared<scedit::LoRAInjection>();
      const auto result = scedit::load_lora(
          path, lora_targets(sd, *attached.lora, *attached.text_lora, *attached.text_lora_2),
          scedit::LoRALoadOptions().adapter_name(tuner.name));
      TORCH_CHECK(!result.paths.empty(), "tuner file '", path,
                  "' holds no LoRA weights for the UNet or the text encoders");
      for (const auto& role : result.roles) {
        auto& injection = role.role == scedit::LoRARole::unet           ? *attached.lora
                          : role.role == scedit::LoRARole::text_encoder_2 ? *attached.text_lora_2
                                                                          : *attached.text_lora;
        injection.set_adapter_weight(tuner.name, scale);
        if (scale == 0) injection.set_adapter_enabled(tuner.name, false);
      }
      tuner.count = static_cast<int64_t>(result.paths.size());
      tuner.summary = result.describe();
      break;
    }
    case scedit::TunerKind::kUnknown:
      TORCH_CHECK(false, "tuner file '", path, "' holds neither SC-Tuners (lsc_identity.* keys), "
                  "a CSC-Tuner (pre_hint_blocks.*) nor LoRA weights (lora_A / lora.down / "
                  "lora_down keys)");
  }
  attached.tuners.push_back(tuner);
  return tuner;
}

}  // namespace sd
