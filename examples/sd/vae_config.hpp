#pragma once
/// @file vae_config.hpp
/// @brief Configuration of the Stable Diffusion VAE, read from diffusers' `config.json` (the
/// constructor arguments of `AutoencoderKL`); missing keys take diffusers' defaults.

#include <sd/config_json.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace sd {

/// Configuration of `sd::AutoencoderKL`: diffusers' `AutoencoderKL` arguments.
///
/// Example:
/// @code
/// sd::VAE vae(sd::VAEConfig::sd15());
/// @endcode
struct VAEConfig {
  int64_t in_channels = 3;                  ///< image channels in
  int64_t out_channels = 3;                 ///< image channels out
  std::vector<std::string> down_block_types = {"DownEncoderBlock2D"};  ///< SD: 4 of them
  std::vector<std::string> up_block_types = {"UpDecoderBlock2D"};      ///< SD: 4 of them
  std::vector<int64_t> block_out_channels = {64};  ///< SD: 128, 256, 512, 512
  int64_t layers_per_block = 1;             ///< encoder resnets per block (decoder: one more); SD: 2
  std::string act_fn = "silu";              ///< the only activation supported
  int64_t latent_channels = 4;              ///< latent channels
  int64_t norm_num_groups = 32;             ///< GroupNorm groups everywhere (eps is 1e-6)
  int64_t sample_size = 32;                 ///< image side it was trained at; SD: 512
  double scaling_factor = 0.18215;          ///< latents = scaling_factor · (z - shift_factor)
  double shift_factor = 0.0;                ///< 0 (null) for SD 1.x / 2.x
  bool force_upcast = true;                 ///< SDXL's pipelines run a float16 VAE in float32 (upcasts_float16_vae)
  bool use_quant_conv = true;               ///< 1×1 conv on the moments after the encoder
  bool use_post_quant_conv = true;          ///< 1×1 conv on the latent before the decoder
  bool mid_block_add_attention = true;      ///< self-attention in the mid blocks

  /// Throws on a configuration this implementation cannot build.
  void validate() const {
    const char* m = "AutoencoderKL";
    const size_t n = block_out_channels.size();
    TORCH_CHECK(n >= 1, m, " config: block_out_channels is empty");
    TORCH_CHECK(down_block_types.size() == n && up_block_types.size() == n, m, " config: ",
                down_block_types.size(), " down_block_types and ", up_block_types.size(),
                " up_block_types for ", n, " block_out_channels");
    for (const auto& type : down_block_types) {
      TORCH_CHECK(type == "DownEncoderBlock2D", m, " config: down block type '", type,
                  "' is not supported (only DownEncoderBlock2D)");
    }
    for (const auto& type : up_block_types) {
      TORCH_CHECK(type == "UpDecoderBlock2D", m, " config: up block type '", type,
                  "' is not supported (only UpDecoderBlock2D)");
    }
    TORCH_CHECK(act_fn == "silu" || act_fn == "swish", m, " config: act_fn '", act_fn,
                "' is not supported (only silu)");
    TORCH_CHECK(in_channels > 0 && out_channels > 0 && latent_channels > 0 &&
                    layers_per_block > 0 && norm_num_groups > 0,
                m, " config: channels, layers_per_block and norm_num_groups must be positive");
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(block_out_channels[i] > 0 && block_out_channels[i] % norm_num_groups == 0, m,
                  " config: block_out_channels[", i, "] = ", block_out_channels[i],
                  " is not a positive multiple of norm_num_groups = ", norm_num_groups);
    }
  }

  /// Reads diffusers' config.json of an `AutoencoderKL`; missing keys take diffusers' defaults.
  static VAEConfig from_json(const nlohmann::json& json) {
    const char* m = "AutoencoderKL";
    detail::check_known_keys(
        json,
        {"in_channels", "out_channels", "down_block_types", "up_block_types",
         "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
         "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
         "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
         "mid_block_add_attention"},
        m);
    for (const char* key : {"latents_mean", "latents_std"}) {
      const nlohmann::json* value = detail::config_value(json, key);
      TORCH_CHECK(value == nullptr, m, " config: key '", key, "' = ", value->dump(),
                  " is not supported (only null)");
    }
    VAEConfig c;
    detail::read_config(json, "in_channels", c.in_channels, m);
    detail::read_config(json, "out_channels", c.out_channels, m);
    detail::read_list(json, "down_block_types", c.down_block_types, m);
    detail::read_list(json, "up_block_types", c.up_block_types, m);
    detail::read_list(json, "block_out_channels", c.block_out_channels, m);
    detail::read_config(json, "layers_per_block", c.layers_per_block, m);
    detail::read_config(json, "act_fn", c.act_fn, m);
    detail::read_config(json, "latent_channels", c.latent_channels, m);
    detail::read_config(json, "norm_num_groups", c.norm_num_groups, m);
    detail::read_config(json, "sample_size", c.sample_size, m);
    detail::read_config(json, "scaling_factor", c.scaling_factor, m);
    detail::read_config(json, "shift_factor", c.shift_factor, m);
    detail::read_config(json, "force_upcast", c.force_upcast, m);
    detail::read_config(json, "use_quant_conv", c.use_quant_conv, m);
    detail::read_config(json, "use_post_quant_conv", c.use_post_quant_conv, m);
    detail::read_config(json, "mid_block_add_attention", c.mid_block_add_attention, m);
    c.validate();
    return c;
  }

  /// The configuration as diffusers' config.json keys (every field written out).
  nlohmann::json to_json() const {
    return {{"in_channels", in_channels},
            {"out_channels", out_channels},
            {"down_block_types", down_block_types},
            {"up_block_types", up_block_types},
            {"block_out_channels", block_out_channels},
            {"layers_per_block", layers_per_block},
            {"act_fn", act_fn},
            {"latent_channels", latent_channels},
            {"norm_num_groups", norm_num_groups},
            {"sample_size", sample_size},
            {"scaling_factor", scaling_factor},
            {"shift_factor", shift_factor != 0.0 ? nlohmann::json(shift_factor) : nlohmann::json()},
            {"force_upcast", force_upcast},
            {"use_quant_conv", use_quant_conv},
            {"use_post_quant_conv", use_post_quant_conv},
            {"mid_block_add_attention", mid_block_add_attention}};
  }

  /// Stable Diffusion 1.x / 2.x (`vae/config.json` of stable-diffusion-v1-5).
  static VAEConfig sd15() {
    VAEConfig c;
    const std::string down = "DownEncoderBlock2D", up = "UpDecoderBlock2D";
    c.down_block_types = {down, down, down, down};
    c.up_block_types = {up, up, up, up};
    c.block_out_channels = {128, 256, 512, 512};
    c.layers_per_block = 2;
    c.sample_size = 512;
    return c;
  }

  /// Stable Diffusion XL (`vae/config.json` of stable-diffusion-xl-base-1.0): SD's layout with
  /// its own latent scale, trained at 1024 px; `force_upcast` (it overflows in float16).
  static VAEConfig sdxl() {
    VAEConfig c = sd15();
    c.sample_size = 1024;
    c.scaling_factor = 0.13025;
    return c;
  }
};

}  // namespace sd
