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
/// and SD 1.5 use the same code. Every entry names one tensor on both sides; the only tensor
/// change is the VAE mid-block attention, whose LDM 1×1 convolutions `q/k/v/proj_out` ([C, C, 1,
/// 1]) are diffusers linears `to_q/to_k/to_v/to_out.0` ([C, C]).

#include <torch/torch.h>

#include <scedit/safetensors.hpp>

#include <sd/clip.hpp>
#include <sd/config.hpp>

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// Key prefix of the UNet inside an LDM checkpoint.
inline constexpr const char* kLdmUNetPrefix = "model.diffusion_model.";
/// Key prefix of the VAE (the "first stage") inside an LDM checkpoint.
inline constexpr const char* kLdmVAEPrefix = "first_stage_model.";
/// Key prefix of the CLIP text encoder inside an LDM checkpoint (followed by `text_model.` in
/// most checkpoints; older ones omit it).
inline constexpr const char* kLdmTextPrefix = "cond_stage_model.transformer.";

/// How a tensor changes between the two layouts.
enum class KeyTransform {
  kNone,            ///< Same tensor, same shape.
  kConv1x1ToLinear  ///< LDM 1×1 convolution weight [O, I, 1, 1] <-> diffusers linear [O, I].
};

/// One tensor in both layouts.
struct KeyPair {
  /// Full key in the LDM single-file checkpoint (with its component prefix).
  std::string ldm;
  /// Key in the diffusers / transformers state dict of the component (no prefix).
  std::string diffusers;
  /// The tensor change between the two.
  KeyTransform transform = KeyTransform::kNone;
};

namespace detail {

/// Collects key pairs; `wb` adds the `.weight` and `.bias` of one layer.
struct KeyTable {
  std::vector<KeyPair> pairs;
  void add(const std::string& ldm, const std::string& diffusers,
           KeyTransform transform = KeyTransform::kNone) {
    pairs.push_back({ldm, diffusers, transform});
  }
  void wb(const std::string& ldm, const std::string& diffusers,
          KeyTransform weight_transform = KeyTransform::kNone) {
    add(ldm + ".weight", diffusers + ".weight", weight_transform);
    add(ldm + ".bias", diffusers + ".bias");
  }
};

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

}  // namespace detail

/// Every UNet tensor: LDM `model.diffusion_model.*` <-> diffusers `UNet2DConditionModel` keys.
///
/// LDM numbers the encoder `input_blocks.{k}` (k = 0 is conv_in; then, per level, one block per
/// resnet (+attention) and one for the downsampler), the decoder `output_blocks.{k}`
/// (layers_per_block + 1 per level, the last one holding the upsampler) and the middle
/// `middle_block.{0,1,2}`.
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
  const std::string p = std::string(kLdmTextPrefix) + "text_model.";
  config.validate();
  detail::KeyTable t;
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
  return t.pairs;
}

/// An LDM tensor in diffusers form (`kConv1x1ToLinear`: [O, I, 1, 1] -> [O, I]; a tensor already
/// [O, I] passes, as some converted checkpoints store it so). A view, never a copy.
inline torch::Tensor ldm_tensor_to_diffusers(const torch::Tensor& tensor, const KeyPair& pair) {
  if (pair.transform == KeyTransform::kNone || tensor.dim() == 2) return tensor;
  TORCH_CHECK(tensor.dim() == 4 && tensor.size(2) == 1 && tensor.size(3) == 1, "LDM key '",
              pair.ldm, "': expected a 1x1 convolution weight [O, I, 1, 1], got ", tensor.sizes());
  return tensor.flatten(1);  // [O, I, 1, 1] -> [O, I]
}

/// A diffusers tensor in LDM form (`kConv1x1ToLinear`: [O, I] -> [O, I, 1, 1]). A view.
inline torch::Tensor diffusers_tensor_to_ldm(const torch::Tensor& tensor, const KeyPair& pair) {
  if (pair.transform == KeyTransform::kNone) return tensor;
  TORCH_CHECK(tensor.dim() == 2, "diffusers key '", pair.diffusers,
              "': expected a linear weight [O, I], got ", tensor.sizes());
  return tensor.unsqueeze(-1).unsqueeze(-1);  // [O, I] -> [O, I, 1, 1]
}

/// LDM checkpoint keys that carry no weights and are ignored (`position_ids` buffers).
inline bool is_ignored_ldm_key(const std::string& key) {
  const std::string suffix = "embeddings.position_ids";
  return key.rfind(kLdmTextPrefix, 0) == 0 && key.size() >= suffix.size() &&
         key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// The tensors of one component of an LDM checkpoint under their diffusers names.
///
/// Strict: every key of `table` must be present (an error names the first missing LDM key and
/// `source`), and every checkpoint key under `prefix` must be in the table (or ignorable). Keys
/// outside `prefix` (other components, `model_ema.*`, `alphas_cumprod`, ...) are not looked at.
/// For the text encoder, keys lacking the `text_model.` segment are accepted as well.
/// The tensors returned are views of the checkpoint's (reshaped where the table says so).
/// `file_keys`, when given, receives each diffusers key's checkpoint key (for messages).
inline scedit::TensorMap ldm_component_to_diffusers(
    const scedit::TensorMap& checkpoint, const std::vector<KeyPair>& table,
    const std::string& prefix, const std::string& source = "the checkpoint",
    std::map<std::string, std::string>* file_keys = nullptr) {
  const std::string text_model = std::string(kLdmTextPrefix) + "text_model.";
  scedit::TensorMap out;
  std::set<std::string> used;
  for (const auto& pair : table) {
    auto it = checkpoint.find(pair.ldm);
    if (it == checkpoint.end() && pair.ldm.rfind(text_model, 0) == 0) {
      // Older checkpoints: cond_stage_model.transformer.<key> without text_model.
      it = checkpoint.find(kLdmTextPrefix + pair.ldm.substr(text_model.size()));
    }
    TORCH_CHECK(it != checkpoint.end(), "missing key '", pair.ldm, "' (diffusers '", pair.diffusers,
                "') in ", source);
    used.insert(it->first);
    if (file_keys != nullptr) (*file_keys)[pair.diffusers] = it->first;
    TORCH_CHECK(out.emplace(pair.diffusers, ldm_tensor_to_diffusers(it->second, pair)).second,
                "duplicate diffusers key '", pair.diffusers, "' in the key table");
  }
  for (const auto& [key, tensor] : checkpoint) {
    if (key.rfind(prefix, 0) != 0 || used.count(key) != 0 || is_ignored_ldm_key(key)) continue;
    TORCH_CHECK(false, "unexpected key '", key, "' in ", source,
                " (not a tensor of this model configuration)");
  }
  return out;
}

/// The three components of an LDM single-file checkpoint, in diffusers / transformers layout.
struct LdmComponents {
  scedit::TensorMap unet;          ///< `UNet2DConditionModel` keys.
  scedit::TensorMap vae;           ///< `AutoencoderKL` keys.
  scedit::TensorMap text_encoder;  ///< `CLIPTextModel` keys without `text_model.`.
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

/// One component's diffusers tensors under their LDM names, added to `checkpoint`. Strict: each
/// table key must be in `tensors` and `tensors` may hold no other key (`what` names the
/// component in the error).
inline void diffusers_component_to_ldm(const scedit::TensorMap& tensors,
                                       const std::vector<KeyPair>& table, const std::string& what,
                                       scedit::TensorMap& checkpoint) {
  std::set<std::string> known;
  for (const auto& pair : table) {
    auto it = tensors.find(pair.diffusers);
    TORCH_CHECK(it != tensors.end(), "diffusers_to_ldm: the ", what, " tensors lack key '",
                pair.diffusers, "'");
    known.insert(pair.diffusers);
    TORCH_CHECK(checkpoint.emplace(pair.ldm, diffusers_tensor_to_ldm(it->second, pair)).second,
                "diffusers_to_ldm: duplicate LDM key '", pair.ldm, "'");
  }
  for (const auto& [key, tensor] : tensors) {
    TORCH_CHECK(known.count(key) != 0, "diffusers_to_ldm: unexpected ", what, " key '", key,
                "' (not a tensor of this model configuration)");
  }
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
