#pragma once
/// @file ldm_keys_xl.hpp
/// @brief The key tables of SD 2.x and SDXL single-file checkpoints: Stability's LDM layout
/// (SD 2.x: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.model.*`) and
/// sgm's (SDXL base: the same UNet and VAE prefixes, `conditioner.embedders.{0,1}.*`), against
/// the diffusers / transformers layout of this example's models.
///
/// The UNet and the VAE use ldm_keys.hpp's tables, which follow every level's configuration
/// (attention or not, transformer depth, linear projections, SDXL's `label_emb` for its
/// "text_time" added conditioning). The text encoders differ:
/// - SD 2.x's OpenCLIP ViT-H (`FrozenOpenCLIPEmbedder`) keeps OpenCLIP's names:
///   `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.{ln_1,
///   attn.in_proj_{weight,bias}, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, with q,
///   k and v fused along dim 0 (`KeyTransform::kFusedQKV`). SD 2.x reads the penultimate layer,
///   so diffusers' text encoder has 23 of the file's 24 blocks: the last block (index
///   `num_hidden_layers`) is passed over on reading, as are `text_projection` and `logit_scale`
///   (diffusers' `convert_open_clip_checkpoint` skips the same: the block and the projection by
///   `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`, `logit_scale` by mapping nothing to it). Writing gives
///   23 blocks and none of those, as diffusers'
///   `scripts/convert_diffusers_to_original_stable_diffusion.py` does; a tool that loads such a
///   file strictly wants the 24th block.
/// - SDXL's first encoder, CLIP ViT-L (`FrozenCLIPEmbedder`), is transformers' layout under
///   `conditioner.embedders.0.transformer.text_model.`.
/// - SDXL's second, OpenCLIP ViT-bigG (`FrozenOpenCLIPEmbedder2`), is the OpenCLIP layout under
///   `conditioner.embedders.1.model.` with all its blocks, plus `text_projection` [hidden,
///   projection] (used as `x @ P`), transformers' `text_projection.weight` [projection, hidden]
///   transposed (`KeyTransform::kTranspose`). `logit_scale` is passed over.
///
/// The diffusers side is the state dict of this example's modules: `CLIPTextModel`'s keys
/// without `text_model.` (SD 2.x's and SDXL's first encoder), `CLIPTextModelWithProjection`'s
/// with it, beside `text_projection.weight` (SDXL's second, as transformers names it). SDXL's
/// refiner (OpenCLIP bigG alone, as `conditioner.embedders.0.model.`) is not covered.
///
/// Example:
/// @code
/// auto layout = sd::sdxl_ldm_layout(unet_config, vae_config, text_config, text_2_config);
/// sd::LdmComponents parts = sd::ldm_to_diffusers(file_tensors, layout, "'model.safetensors'");
/// scedit::TensorMap back = sd::diffusers_to_ldm(parts, layout);  // less the keys passed over
/// @endcode

#include <torch/torch.h>

#include <scedit/safetensors.hpp>

#include <sd/clip.hpp>
#include <sd/config.hpp>
#include <sd/ldm_key_pairs.hpp>
#include <sd/ldm_keys.hpp>

#include <optional>
#include <string>
#include <vector>

namespace sd {

/// Key prefix of SD 2.x's OpenCLIP text encoder inside an LDM checkpoint.
inline constexpr const char* kLdmOpenCLIPPrefix = "cond_stage_model.model.";
/// Key prefix of SDXL's first text encoder (CLIP ViT-L, transformers layout) in an sgm checkpoint.
inline constexpr const char* kSgmCLIPPrefix = "conditioner.embedders.0.transformer.";
/// Key prefix of SDXL's second text encoder (OpenCLIP ViT-bigG) in an sgm checkpoint.
inline constexpr const char* kSgmOpenCLIPPrefix = "conditioner.embedders.1.model.";

namespace detail {

/// OpenCLIP's text transformer under `p` <-> transformers `CLIPTextModel` keys under `dp` ("" or
/// "text_model."), for the config's `num_hidden_layers` blocks.
inline void open_clip_text_keys(KeyTable& t, const CLIPTextConfig& config, const std::string& p,
                                const std::string& dp) {
  config.validate();
  const int64_t width = config.hidden_size;  // the rows of each of q, k, v
  t.add(p + "token_embedding.weight", dp + "embeddings.token_embedding.weight");
  t.add(p + "positional_embedding", dp + "embeddings.position_embedding.weight");  // a Parameter
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string ldm = p + "transformer.resblocks." + std::to_string(i) + ".";
    const std::string d = dp + "encoder.layers." + std::to_string(i) + ".";
    t.wb(ldm + "ln_1", d + "layer_norm1");
    for (const char* kind : {"weight", "bias"}) {
      const std::string suffix = std::string("_proj.") + kind;
      t.fused_qkv(ldm + "attn.in_proj_" + kind, d + "self_attn.q" + suffix,
                  d + "self_attn.k" + suffix, d + "self_attn.v" + suffix, width);
    }
    t.wb(ldm + "attn.out_proj", d + "self_attn.out_proj");
    t.wb(ldm + "ln_2", d + "layer_norm2");
    t.wb(ldm + "mlp.c_fc", d + "mlp.fc1");
    t.wb(ldm + "mlp.c_proj", d + "mlp.fc2");
  }
  t.wb(p + "ln_final", dp + "final_layer_norm");
}

}  // namespace detail

/// SD 2.x's text encoder: `cond_stage_model.model.*` <-> `CLIPTextModel` keys without
/// `text_model.` (`num_hidden_layers` = 23 for SD 2.x). Passed over on reading: the file's last
/// block `transformer.resblocks.{num_hidden_layers}.*`, `text_projection`, `logit_scale`.
inline LdmComponentKeys ldm_open_clip_keys(const CLIPTextConfig& config) {
  const std::string p = kLdmOpenCLIPPrefix;
  detail::KeyTable t;
  detail::open_clip_text_keys(t, config, p, "");
  return {p, t.pairs,
          {p + "transformer.resblocks." + std::to_string(config.num_hidden_layers) + ".",
           p + "text_projection", p + "logit_scale"}};
}

/// SDXL's first text encoder: `conditioner.embedders.0.transformer.text_model.*` <->
/// `CLIPTextModel` keys without `text_model.` (`position_ids` passed over).
inline LdmComponentKeys sdxl_clip_keys(const CLIPTextConfig& config) {
  const std::string p = kSgmCLIPPrefix;
  detail::KeyTable t;
  detail::clip_text_keys(t, config, p + "text_model.");
  return {p, t.pairs, {p + "text_model.embeddings.position_ids"}};
}

/// SDXL's second text encoder: `conditioner.embedders.1.model.*` <->
/// `CLIPTextModelWithProjection` keys (`text_model.*` and `text_projection.weight`
/// [projection_dim, hidden], the file's `text_projection` [hidden, projection_dim] transposed;
/// `logit_scale` passed over).
inline LdmComponentKeys sdxl_open_clip_keys(const CLIPTextConfig& config) {
  const std::string p = kSgmOpenCLIPPrefix;
  detail::KeyTable t;
  detail::open_clip_text_keys(t, config, p, "text_model.");
  t.add(p + "text_projection", "text_projection.weight", KeyTransform::kTranspose);
  return {p, t.pairs, {p + "logit_scale"}};
}

/// The components of one model family's single-file checkpoint, each with its keys.
struct LdmLayout {
  LdmComponentKeys unet;                           ///< `model.diffusion_model.*`
  LdmComponentKeys vae;                            ///< `first_stage_model.*`
  LdmComponentKeys text_encoder;                   ///< the (first) text encoder
  std::optional<LdmComponentKeys> text_encoder_2;  ///< SDXL's second text encoder
};

/// SD 1.x: ldm_keys.hpp's tables (the same as `ldm_to_diffusers(checkpoint, unet, vae, text)`).
inline LdmLayout sd15_ldm_layout(const UNetConfig& unet, const VAEConfig& vae,
                                 const CLIPTextConfig& text) {
  return {{kLdmUNetPrefix, ldm_unet_keys(unet), {}},
          {kLdmVAEPrefix, ldm_vae_keys(vae), {}},
          {kLdmTextPrefix, ldm_clip_keys(text), {}},
          std::nullopt};
}

/// SD 2.x: the UNet and VAE tables of SD 1.x over their configurations, OpenCLIP ViT-H.
inline LdmLayout sd21_ldm_layout(const UNetConfig& unet, const VAEConfig& vae,
                                 const CLIPTextConfig& text) {
  return {{kLdmUNetPrefix, ldm_unet_keys(unet), {}},
          {kLdmVAEPrefix, ldm_vae_keys(vae), {}},
          ldm_open_clip_keys(text),
          std::nullopt};
}

/// SDXL base: the UNet (with `label_emb` where the configuration has "text_time" added
/// conditioning, as SDXL's does), the VAE, CLIP ViT-L and OpenCLIP ViT-bigG.
inline LdmLayout sdxl_ldm_layout(const UNetConfig& unet, const VAEConfig& vae,
                                 const CLIPTextConfig& text, const CLIPTextConfig& text_2) {
  return {{kLdmUNetPrefix, ldm_unet_keys(unet), {}},
          {kLdmVAEPrefix, ldm_vae_keys(vae), {}},
          sdxl_clip_keys(text),
          sdxl_open_clip_keys(text_2)};
}

/// Splits and renames a whole single-file checkpoint by `layout` (strict per component, see
/// `ldm_component_to_diffusers`). The tensors are views of `checkpoint`'s.
inline LdmComponents ldm_to_diffusers(const scedit::TensorMap& checkpoint, const LdmLayout& layout,
                                      const std::string& source = "the checkpoint") {
  LdmComponents out;
  out.unet = ldm_component_to_diffusers(checkpoint, layout.unet, source);
  out.vae = ldm_component_to_diffusers(checkpoint, layout.vae, source);
  out.text_encoder = ldm_component_to_diffusers(checkpoint, layout.text_encoder, source);
  if (layout.text_encoder_2) {
    out.text_encoder_2 = ldm_component_to_diffusers(checkpoint, *layout.text_encoder_2, source);
  }
  return out;
}

/// A whole single-file checkpoint from the components' diffusers tensors, by `layout` (views of
/// them, but for the concatenated q/k/v projections; write it with `scedit::safetensors::save`).
/// `components.text_encoder_2` must be empty unless the layout has a second text encoder.
inline scedit::TensorMap diffusers_to_ldm(const LdmComponents& components,
                                          const LdmLayout& layout) {
  scedit::TensorMap checkpoint;
  diffusers_component_to_ldm(components.unet, layout.unet.pairs, "UNet", checkpoint);
  diffusers_component_to_ldm(components.vae, layout.vae.pairs, "VAE", checkpoint);
  diffusers_component_to_ldm(components.text_encoder, layout.text_encoder.pairs, "text encoder",
                             checkpoint);
  diffusers_component_to_ldm(components.text_encoder_2,
                             layout.text_encoder_2 ? layout.text_encoder_2->pairs
                                                   : std::vector<KeyPair>{},
                             "second text encoder", checkpoint);
  return checkpoint;
}

}  // namespace sd
