#pragma once
/// @file ldm_keys.hpp
/// @brief The key tables between the original single-file Stable Diffusion checkpoint layout
/// (CompVis LDM: `model.diffusion_model.*`, `first_stage_model.*`,
/// `cond_stage_model.transformer.*`) and the diffusers / transformers layout of this example's
/// models.
///
/// The tables are built from the model configurations (levels, layers per block, attention per
/// block, channels), following diffusers' conversion (`scripts/convert_original_stable_diffusion_
/// to_diffusers.py`, `loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
/// `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), so the tiny test configurations
/// and SD 1.5 use the same code. Every entry names one tensor on both sides; SD 1.5's only tensor
/// change is the VAE mid-block attention, whose LDM 1×1 convolutions `q/k/v/proj_out` ([C, C, 1,
/// 1]) are diffusers linears `to_q/to_k/to_v/to_out.0` ([C, C]). The OpenCLIP text encoders of
/// SD 2.x and SDXL (ldm_keys_xl.hpp) add two: a fused q/k/v projection split in three, and a
/// transposed text projection. How the tensors move along a table: ldm_key_pairs.hpp.

#include <torch/torch.h>

#include <scedit/safetensors.hpp>

#include <sd/clip.hpp>
#include <sd/config.hpp>
#include <sd/ldm_key_pairs.hpp>

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace sd {

namespace detail {

/// True when a diffusers block type has attention layers (`CrossAttnDownBlock2D`, ...).
inline bool has_cross_attention(const std::string& block_type) {
  return block_type.find("CrossAttn") != std::string::npos;
}

/// UNet ResBlock (LDM `in_layers/emb_layers/out_layers/skip_connection`) -> diffusers
/// ResnetBlock2D.
inline void unet_resnet(KeyTable& t, const std::string& ldm, const std::string& d, bool shortcut) {
  t.wb(ldm + ".in_layers.0", d + ".norm1");
  t.wb(ldm + ".in_layers.2", d + ".conv1");
  t.wb(ldm + ".emb_layers.1", d + ".time_emb_proj");
  t.wb(ldm + ".out_layers.0", d + ".norm2");
  t.wb(ldm + ".out_layers.3", d + ".conv2");
  if (shortcut) t.wb(ldm + ".skip_connection", d + ".conv_shortcut");
}

/// SpatialTransformer -> Transformer2DModel: the names inside are the same in both layouts.
inline void unet_transformer(KeyTable& t, const std::string& ldm, const std::string& d,
                             int64_t depth) {
  auto same = [&](const std::string& suffix) { t.wb(ldm + "." + suffix, d + "." + suffix); };
  auto same_weight = [&](const std::string& suffix) {
    t.add(ldm + "." + suffix + ".weight", d + "." + suffix + ".weight");
  };
  same("norm");
  same("proj_in");
  for (int64_t b = 0; b < depth; ++b) {
    const std::string block = "transformer_blocks." + std::to_string(b) + ".";
    for (const char* attn : {"attn1", "attn2"}) {
      const std::string a = block + attn + ".";
      same_weight(a + "to_q");  // q/k/v have no bias in SD's attention
      same_weight(a + "to_k");
      same_weight(a + "to_v");
      same(a + "to_out.0");
    }
    for (const char* norm : {"norm1", "norm2", "norm3"}) same(block + norm);
    same(block + "ff.net.0.proj");
    same(block + "ff.net.2");
  }
  same("proj_out");
}

/// VAE ResnetBlock: the same names except `nin_shortcut` -> `conv_shortcut`.
inline void vae_resnet(KeyTable& t, const std::string& ldm, const std::string& d, bool shortcut) {
  for (const char* name : {"norm1", "conv1", "norm2", "conv2"}) {
    t.wb(ldm + "." + name, d + "." + name);
  }
  if (shortcut) t.wb(ldm + ".nin_shortcut", d + ".conv_shortcut");
}

/// VAE AttnBlock (1×1 convs) -> diffusers Attention (linears).
inline void vae_attention(KeyTable& t, const std::string& ldm, const std::string& d) {
  t.wb(ldm + ".norm", d + ".group_norm");
  t.wb(ldm + ".q", d + ".to_q", KeyTransform::kConv1x1ToLinear);
  t.wb(ldm + ".k", d + ".to_k", KeyTransform::kConv1x1ToLinear);
  t.wb(ldm + ".v", d + ".to_v", KeyTransform::kConv1x1ToLinear);
  t.wb(ldm + ".proj_out", d + ".to_out.0", KeyTransform::kConv1x1ToLinear);
}

/// The tensors a UNet and a ControlNet share, LDM (keys under `p`) <-> diffusers: the time
/// embedding, `input_blocks` (conv_in and the encoder) and `middle_block`. LDM numbers the
/// encoder `input_blocks.{k}`: k = 0 is conv_in; then, per level, one block per resnet
/// (+attention) and one for the downsampler.
inline void ldm_unet_encoder_keys(KeyTable& t, const UNetConfig& config,
                                  const std::string& p) {
  const auto& channels = config.block_out_channels;
  const int64_t levels = static_cast<int64_t>(channels.size());
  const int64_t layers = config.layers_per_block;
  config.validate();

  t.wb(p + "time_embed.0", "time_embedding.linear_1");
  t.wb(p + "time_embed.2", "time_embedding.linear_2");
  if (config.has_text_time()) {
    // sgm's `label_emb`: Sequential(Sequential(linear, SiLU, linear)) (num_classes "sequential").
    t.wb(p + "label_emb.0.0", "add_embedding.linear_1");
    t.wb(p + "label_emb.0.2", "add_embedding.linear_2");
  }
  t.wb(p + "input_blocks.0.0", "conv_in");

  // Encoder: level i holds `layers` resnets (+ attentions), then a downsampler except at the end.
  int64_t in_ch = channels[0];
  for (int64_t i = 0; i < levels; ++i) {
    const bool attn = detail::has_cross_attention(config.down_block_types[i]);
    const std::string d = "down_blocks." + std::to_string(i);
    for (int64_t j = 0; j < layers; ++j) {
      const std::string ldm = p + "input_blocks." + std::to_string(1 + i * (layers + 1) + j);
      const int64_t resnet_in = j == 0 ? in_ch : channels[i];
      detail::unet_resnet(t, ldm + ".0", d + ".resnets." + std::to_string(j),
                          resnet_in != channels[i]);
      if (attn) {
        detail::unet_transformer(t, ldm + ".1", d + ".attentions." + std::to_string(j),
                                 config.transformer_layers(i));
      }
    }
    if (i != levels - 1) {
      t.wb(p + "input_blocks." + std::to_string((i + 1) * (layers + 1)) + ".0.op",
           d + ".downsamplers.0.conv");
    }
    in_ch = channels[i];
  }

  detail::unet_resnet(t, p + "middle_block.0", "mid_block.resnets.0", false);
  detail::unet_transformer(t, p + "middle_block.1", "mid_block.attentions.0",
                           config.transformer_layers(levels - 1));
  detail::unet_resnet(t, p + "middle_block.2", "mid_block.resnets.1", false);
}

/// A transformers `CLIPTextModel` under `p` (`...text_model.`) <-> the same keys without
/// `text_model.` (SD 1.x's `cond_stage_model.transformer.`, SDXL's first text encoder).
inline void clip_text_keys(KeyTable& t, const CLIPTextConfig& config, const std::string& p) {
  config.validate();
  auto same = [&](const std::string& name) { t.wb(p + name, name); };
  t.add(p + "embeddings.token_embedding.weight", "embeddings.token_embedding.weight");
  t.add(p + "embeddings.position_embedding.weight", "embeddings.position_embedding.weight");
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string layer = "encoder.layers." + std::to_string(i) + ".";
    for (const char* proj : {"k_proj", "v_proj", "q_proj", "out_proj"}) {
      same(layer + "self_attn." + proj);
    }
    same(layer + "layer_norm1");
    same(layer + "mlp.fc1");
    same(layer + "mlp.fc2");
    same(layer + "layer_norm2");
  }
  same("final_layer_norm");
}

}  // namespace detail

/// Every UNet tensor: LDM `model.diffusion_model.*` <-> diffusers `UNet2DConditionModel` keys.
///
/// LDM numbers the encoder `input_blocks.{k}` (k = 0 is conv_in; then, per level, one block per
/// resnet (+attention) and one for the downsampler), the decoder `output_blocks.{k}`
/// (layers_per_block + 1 per level, the last one holding the upsampler) and the middle
/// `middle_block.{0,1,2}`. A level without attention (SDXL's first) has resnets only
/// (`input_blocks.{k}.0`), its decoder upsampler is `output_blocks.{k}.1.conv`, and a transformer
/// of depth D has `transformer_blocks.{0..D-1}` (the mid block the last level's depth, up block i
/// level n-1-i's). `use_linear_projection` changes only proj_in/proj_out's shapes ([C, C] in both
/// layouts), no name. SDXL ("text_time" added conditioning) adds `label_emb.0.{0,2}`
/// (`add_embedding.linear_{1,2}`).
inline std::vector<KeyPair> ldm_unet_keys(const UNetConfig& config) {
  const std::string p = kLdmUNetPrefix;
  const int64_t levels = static_cast<int64_t>(config.block_out_channels.size());
  const int64_t layers = config.layers_per_block;
  detail::KeyTable t;
  detail::ldm_unet_encoder_keys(t, config, p);

  // Decoder: level i holds `layers + 1` resnets (+ attentions); the last one of every level but
  // the final carries the upsampler (`.1.conv` without attention, `.2.conv` with).
  for (int64_t i = 0; i < levels; ++i) {
    const bool attn = detail::has_cross_attention(config.up_block_types[i]);
    const std::string d = "up_blocks." + std::to_string(i);
    for (int64_t j = 0; j <= layers; ++j) {
      const std::string ldm = p + "output_blocks." + std::to_string(i * (layers + 1) + j);
      // Every decoder resnet sees [h, skip] concatenated, so its input never equals its output.
      detail::unet_resnet(t, ldm + ".0", d + ".resnets." + std::to_string(j), true);
      if (attn) {  // up block i mirrors down block levels-1-i (diffusers reverses the list)
        detail::unet_transformer(t, ldm + ".1", d + ".attentions." + std::to_string(j),
                                 config.transformer_layers(levels - 1 - i));
      }
      if (j == layers && i != levels - 1) {
        t.wb(ldm + (attn ? ".2" : ".1") + ".conv", d + ".upsamplers.0.conv");
      }
    }
  }

  t.wb(p + "out.0", "conv_norm_out");
  t.wb(p + "out.2", "conv_out");
  return t.pairs;
}

/// Every VAE tensor: LDM `first_stage_model.*` <-> diffusers `AutoencoderKL` keys.
///
/// LDM's decoder numbers its levels from the lowest resolution up (`decoder.up.{levels-1}` is
/// diffusers' `decoder.up_blocks.0`).
inline std::vector<KeyPair> ldm_vae_keys(const VAEConfig& config) {
  const std::string p = kLdmVAEPrefix;
  const auto& channels = config.block_out_channels;
  const int64_t levels = static_cast<int64_t>(channels.size());
  const int64_t layers = config.layers_per_block;
  config.validate();
  detail::KeyTable t;

  t.wb(p + "encoder.conv_in", "encoder.conv_in");
  int64_t in_ch = channels[0];
  for (int64_t i = 0; i < levels; ++i) {
    const std::string ldm = p + "encoder.down." + std::to_string(i);
    const std::string d = "encoder.down_blocks." + std::to_string(i);
    for (int64_t j = 0; j < layers; ++j) {
      const int64_t resnet_in = j == 0 ? in_ch : channels[i];
      detail::vae_resnet(t, ldm + ".block." + std::to_string(j), d + ".resnets." + std::to_string(j),
                         resnet_in != channels[i]);
    }
    if (i != levels - 1) t.wb(ldm + ".downsample.conv", d + ".downsamplers.0.conv");
    in_ch = channels[i];
  }
  for (const char* part : {"encoder", "decoder"}) {
    const std::string ldm = p + part + ".mid.";
    const std::string d = std::string(part) + ".mid_block.";
    detail::vae_resnet(t, ldm + "block_1", d + "resnets.0", false);
    if (config.mid_block_add_attention) detail::vae_attention(t, ldm + "attn_1", d + "attentions.0");
    detail::vae_resnet(t, ldm + "block_2", d + "resnets.1", false);
  }
  t.wb(p + "encoder.norm_out", "encoder.conv_norm_out");
  t.wb(p + "encoder.conv_out", "encoder.conv_out");
  if (config.use_quant_conv) t.wb(p + "quant_conv", "quant_conv");
  if (config.use_post_quant_conv) t.wb(p + "post_quant_conv", "post_quant_conv");

  t.wb(p + "decoder.conv_in", "decoder.conv_in");
  in_ch = channels[levels - 1];
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t out_ch = channels[levels - 1 - i];
    const std::string ldm = p + "decoder.up." + std::to_string(levels - 1 - i);
    const std::string d = "decoder.up_blocks." + std::to_string(i);
    for (int64_t j = 0; j <= layers; ++j) {
      const int64_t resnet_in = j == 0 ? in_ch : out_ch;
      detail::vae_resnet(t, ldm + ".block." + std::to_string(j), d + ".resnets." + std::to_string(j),
                         resnet_in != out_ch);
    }
    if (i != levels - 1) t.wb(ldm + ".upsample.conv", d + ".upsamplers.0.conv");
    in_ch = out_ch;
  }
  t.wb(p + "decoder.norm_out", "decoder.conv_norm_out");
  t.wb(p + "decoder.conv_out", "decoder.conv_out");
  return t.pairs;
}

/// Every CLIP text-encoder tensor: LDM `cond_stage_model.transformer.text_model.*` <->
/// transformers `CLIPTextModel` keys without their `text_model.` prefix (this example's layout).
/// Checkpoints without the `text_model.` segment are read by `ldm_to_diffusers` too.
inline std::vector<KeyPair> ldm_clip_keys(const CLIPTextConfig& config) {
  detail::KeyTable t;
  detail::clip_text_keys(t, config, std::string(kLdmTextPrefix) + "text_model.");
  return t.pairs;
}

/// The components of an LDM single-file checkpoint, in diffusers / transformers layout.
struct LdmComponents {
  scedit::TensorMap unet;          ///< `UNet2DConditionModel` keys.
  scedit::TensorMap vae;           ///< `AutoencoderKL` keys.
  scedit::TensorMap text_encoder;  ///< `CLIPTextModel` keys without `text_model.`.
  /// SDXL's second text encoder: `CLIPTextModelWithProjection` keys (`text_model.*`,
  /// `text_projection.weight`; ldm_keys_xl.hpp); empty for SD 1.x and 2.x.
  scedit::TensorMap text_encoder_2;
};

/// Splits and renames a whole LDM checkpoint (strict per component, see
/// `ldm_component_to_diffusers`). The tensors are views of `checkpoint`'s.
inline LdmComponents ldm_to_diffusers(const scedit::TensorMap& checkpoint,
                                      const UNetConfig& unet, const VAEConfig& vae,
                                      const CLIPTextConfig& text,
                                      const std::string& source = "the checkpoint") {
  LdmComponents out;
  out.unet = ldm_component_to_diffusers(checkpoint, ldm_unet_keys(unet), kLdmUNetPrefix, source);
  out.vae = ldm_component_to_diffusers(checkpoint, ldm_vae_keys(vae), kLdmVAEPrefix, source);
  out.text_encoder =
      ldm_component_to_diffusers(checkpoint, ldm_clip_keys(text), kLdmTextPrefix, source);
  return out;
}

/// A whole LDM single-file checkpoint from the three components' diffusers state dicts (views
/// of the given tensors; write it with `scedit::safetensors::save`).
inline scedit::TensorMap diffusers_to_ldm(const scedit::TensorMap& unet_tensors,
                                          const scedit::TensorMap& vae_tensors,
                                          const scedit::TensorMap& text_tensors,
                                          const UNetConfig& unet, const VAEConfig& vae,
                                          const CLIPTextConfig& text) {
  scedit::TensorMap checkpoint;
  diffusers_component_to_ldm(unet_tensors, ldm_unet_keys(unet), "UNet", checkpoint);
  diffusers_component_to_ldm(vae_tensors, ldm_vae_keys(vae), "VAE", checkpoint);
  diffusers_component_to_ldm(text_tensors, ldm_clip_keys(text), "text encoder", checkpoint);
  return checkpoint;
}

}  // namespace sd
