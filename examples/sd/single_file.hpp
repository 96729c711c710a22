#pragma once
/// @file single_file.hpp
/// @brief What a single-file Stable Diffusion checkpoint is (CompVis LDM for SD 1.x and 2.x,
/// Stability's sgm for SDXL): which model family its keys say, the configurations and the
/// scheduler that family takes when none is given, and its key layout (ldm_keys_xl.hpp).
/// `load_pipeline` (weights.hpp) reads such files with these.
///
/// The family is told by the text encoder's keys, which differ in every family:
///  - `conditioner.embedders.` (sgm): SDXL base (CLIP ViT-L and OpenCLIP ViT-bigG);
///  - `cond_stage_model.model.` (OpenCLIP ViT-H): SD 2.x;
///  - `cond_stage_model.transformer.` (CLIP ViT-L): SD 1.x.
/// A file without text-encoder keys (a UNet or VAE alone) is told by its UNet: `label_emb.`
/// (added conditioning) says SDXL, linear `proj_in` layers say SD 2.x, anything else SD 1.x.
///
/// Example:
/// @code
/// const auto family = sd::detect_ldm_family(scedit::load_tensor_file("model.safetensors"));
/// const auto configs = sd::default_ldm_configs(family);
/// auto layout = sd::ldm_layout(family, configs);
/// @endcode

#include <sd/clip.hpp>
#include <sd/config.hpp>
#include <sd/ldm_keys_xl.hpp>
#include <sd/tiny.hpp>

#include <scedit/safetensors.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <string>

namespace sd {

/// The model families of single-file checkpoints.
enum class LdmFamily {
  kSD1,  ///< SD 1.x: CLIP ViT-L under `cond_stage_model.transformer.`.
  kSD2,  ///< SD 2.x: OpenCLIP ViT-H under `cond_stage_model.model.`.
  kSDXL  ///< SDXL base: two text encoders under `conditioner.embedders.{0,1}.`.
};

/// "SD 1.x", "SD 2.x" or "SDXL".
inline const char* ldm_family_name(LdmFamily family) {
  switch (family) {
    case LdmFamily::kSD1: return "SD 1.x";
    case LdmFamily::kSD2: return "SD 2.x";
    case LdmFamily::kSDXL: return "SDXL";
  }
  return "?";
}

namespace detail {

/// True when some key of `tensors` starts with `prefix`.
inline bool has_prefix(const scedit::TensorMap& tensors, const std::string& prefix) {
  const auto first = tensors.lower_bound(prefix);
  return first != tensors.end() && first->first.rfind(prefix, 0) == 0;
}

}  // namespace detail

/// Whether `checkpoint` holds keys of a single-file checkpoint (a UNet, VAE or text encoder
/// under one of the LDM / sgm prefixes) rather than one diffusers model's.
inline bool is_ldm_checkpoint(const scedit::TensorMap& checkpoint) {
  for (const char* prefix : {kLdmUNetPrefix, kLdmVAEPrefix, "cond_stage_model.", "conditioner."}) {
    if (detail::has_prefix(checkpoint, prefix)) return true;
  }
  return false;
}

/// The family of a single-file checkpoint, from its keys (see the file comment).
inline LdmFamily detect_ldm_family(const scedit::TensorMap& checkpoint) {
  if (detail::has_prefix(checkpoint, "conditioner.embedders.")) return LdmFamily::kSDXL;
  if (detail::has_prefix(checkpoint, kLdmOpenCLIPPrefix)) return LdmFamily::kSD2;
  if (detail::has_prefix(checkpoint, kLdmTextPrefix)) return LdmFamily::kSD1;
  const std::string unet = kLdmUNetPrefix;
  if (detail::has_prefix(checkpoint, unet + "label_emb.")) return LdmFamily::kSDXL;
  const auto proj_in = checkpoint.find(unet + "input_blocks.1.1.proj_in.weight");
  if (proj_in != checkpoint.end() && proj_in->second.dim() == 2) return LdmFamily::kSD2;  // [C, C]
  return LdmFamily::kSD1;  // SD 1.x's proj_in is a 1x1 convolution [C, C, 1, 1]
}

/// The configurations of a single-file checkpoint's models.
struct LdmConfigs {
  UNetConfig unet;        ///< The UNet's.
  VAEConfig vae;          ///< The VAE's.
  CLIPTextConfig text;    ///< The (first) text encoder's.
  CLIPTextConfig text_2;  ///< SDXL's second text encoder's (unused otherwise).
};

/// The released models' configurations of `family`: SD 1.5's (`UNetConfig::sd15()`,
/// `VAEConfig::sd15()`, `CLIPTextConfig::sd15()`); SD 2.1 768-v's (`UNetConfig::sd21()`,
/// `VAEConfig::sd15()`, `CLIPTextConfig::sd21()`); SDXL base's (`UNetConfig::sdxl()`,
/// `VAEConfig::sdxl()`, `CLIPTextConfig::sd15()` and `sdxl_2()`).
inline LdmConfigs default_ldm_configs(LdmFamily family) {
  switch (family) {
    case LdmFamily::kSD2:
      return {UNetConfig::sd21(), VAEConfig::sd15(), CLIPTextConfig::sd21(), {}};
    case LdmFamily::kSDXL:
      return {UNetConfig::sdxl(), VAEConfig::sdxl(), CLIPTextConfig::sd15(), CLIPTextConfig::sdxl_2()};
    case LdmFamily::kSD1: break;
  }
  return {UNetConfig::sd15(), VAEConfig::sd15(), CLIPTextConfig::sd15(), {}};
}

/// The key layout of a `family` checkpoint of the configurations `configs`.
inline LdmLayout ldm_layout(LdmFamily family, const LdmConfigs& configs) {
  switch (family) {
    case LdmFamily::kSD2: return sd21_ldm_layout(configs.unet, configs.vae, configs.text);
    case LdmFamily::kSDXL:
      return sdxl_ldm_layout(configs.unet, configs.vae, configs.text, configs.text_2);
    case LdmFamily::kSD1: break;
  }
  return sd15_ldm_layout(configs.unet, configs.vae, configs.text);
}

/// The scheduler configuration of a `family` single file, which carries none: null for SD 1.x
/// (the sampler's default is SD 1.5's); SDXL base's (`sdxl_scheduler_config()`); for SD 2.x,
/// SD 2.1's (`sd21_scheduler_config`) predicting v when the UNet's `sample_size` is 96 (768-v,
/// `UNetConfig::sd21()`), else ε (the 512-pixel SD 2.x-base models). The weights do not say
/// what the UNet predicts: this is a guess, which the programs' `--prediction` overrides.
inline nlohmann::json default_ldm_scheduler_config(LdmFamily family, const UNetConfig& unet) {
  switch (family) {
    case LdmFamily::kSD2:
      return sd21_scheduler_config(unet.sample_size == 96 ? "v_prediction" : "epsilon");
    case LdmFamily::kSDXL: return sdxl_scheduler_config();
    case LdmFamily::kSD1: break;
  }
  return nullptr;
}

}  // namespace sd
