#pragma once
/// @file controlnet_config.hpp
/// @brief Configuration of `sd::ControlNetModel`, read from diffusers' `config.json` (the
/// constructor arguments of `ControlNetModel`).
///
/// The keys a ControlNet shares with its UNet (encoder, middle block, time embedding) are read
/// by `UNetConfig::from_json`, so both take the same defaults and refuse the same values; the
/// control-specific keys are read here. Keys `ControlNetModel` does not take are refused, naming
/// the key, as config.hpp refuses them.

#include <sd/config.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <set>
#include <string>
#include <vector>

namespace sd {

/// Configuration of `sd::ControlNetModel`: diffusers' `ControlNetModel` arguments.
///
/// Example:
/// @code
/// auto json = nlohmann::json::parse(std::ifstream("controlnet/config.json"));
/// sd::ControlNet controlnet(sd::ControlNetConfig::from_json(json));
/// @endcode
struct ControlNetConfig {
  /// The keys ControlNetModel shares with UNet2DConditionModel (encoder, middle block, time
  /// embedding): the UNet whose encoder this ControlNet mirrors. Its decoder keys
  /// (up_block_types, out_channels, conv_out_kernel), sample_size and center_input_sample are
  /// not used: diffusers' ControlNet has no decoder and never centres its input.
  UNetConfig unet = {};
  int64_t conditioning_channels = 3;  ///< channels of the condition image
  /// Widths of `controlnet_cond_embedding`; each step after the first halves the resolution.
  std::vector<int64_t> conditioning_embedding_out_channels = {16, 32, 96, 256};
  /// "rgb", or "bgr": the condition's channels are flipped first (as diffusers does).
  std::string controlnet_conditioning_channel_order = "rgb";
  bool global_pool_conditions = false;  ///< only false (diffusers marks it unused)

  /// How much larger than the latent the condition image is: 2^(len(widths) - 1) (8 for SD).
  int64_t conditioning_factor() const {
    return int64_t{1} << (conditioning_embedding_out_channels.size() - 1);
  }

  /// Channels of the residuals in encoder order (conv_in's first; 12 for SD 1.5).
  std::vector<int64_t> residual_channels() const {
    std::vector<int64_t> channels{unet.block_out_channels.at(0)};
    for (size_t i = 0; i < unet.num_blocks(); ++i) {
      const int64_t count = unet.layers_per_block + (i + 1 < unet.num_blocks() ? 1 : 0);
      channels.insert(channels.end(), count, unet.block_out_channels[i]);
    }
    return channels;
  }

  /// Throws, naming `what` (its file), unless this ControlNet fits a UNet of `target`'s
  /// configuration: a residual for each of its skips and its middle block, of the same widths,
  /// from the same context width, with SDXL's added conditioning exactly where `target` has it.
  void check_fits(const UNetConfig& target, const std::string& what) const {
    TORCH_CHECK(unet.has_text_time() == target.has_text_time(), what, ": a ControlNet for another model: ",
                target.has_text_time() ? "this model is an SDXL and the ControlNet lacks SDXL's added "
                                         "conditioning (\"text_time\")"
                                       : "the ControlNet is an SDXL's (\"text_time\") and this model is not");
    ControlNetConfig expected;
    expected.unet = target;
    const auto ours = residual_channels(), theirs = expected.residual_channels();
    TORCH_CHECK(ours == theirs, what, ": a ControlNet for another model: its residuals have ",
                torch::IntArrayRef(ours), " channels, this model's skips ", torch::IntArrayRef(theirs));
    TORCH_CHECK(unet.cross_attention_dim == target.cross_attention_dim, what, ": a ControlNet for another "
                "model: it reads a text context ", unet.cross_attention_dim, " wide, this model's is ",
                target.cross_attention_dim);
  }

  /// Throws on a configuration this implementation cannot build, naming the key and value.
  void validate() const {
    const char* m = "ControlNetModel config: ";
    unet.validate();
    // diffusers' ControlNet fixes these; a UNet with others has no ControlNet of its encoder.
    TORCH_CHECK(unet.conv_in_kernel == 3, m, "conv_in_kernel ", unet.conv_in_kernel,
                " is not supported (only 3)");
    TORCH_CHECK(unet.time_embed_dim() == 4 * unet.block_out_channels[0], m, "time_embedding_dim ",
                unet.time_embedding_dim, " is not supported (only 4 · block_out_channels[0])");
    TORCH_CHECK(unet.resnet_out_scale_factor == 1.0, m, "resnet_out_scale_factor ",
                unet.resnet_out_scale_factor, " is not supported (only 1)");
    bool positive = conditioning_channels > 0 && !conditioning_embedding_out_channels.empty();
    for (int64_t c : conditioning_embedding_out_channels) positive = positive && c > 0;
    TORCH_CHECK(positive, m, "conditioning_channels (", conditioning_channels,
                ") and conditioning_embedding_out_channels (",
                torch::IntArrayRef(conditioning_embedding_out_channels), ") must be positive");
    TORCH_CHECK(controlnet_conditioning_channel_order == "rgb" ||
                    controlnet_conditioning_channel_order == "bgr",
                m, "controlnet_conditioning_channel_order '", controlnet_conditioning_channel_order,
                "' is not supported (only rgb, bgr)");
    TORCH_CHECK(!global_pool_conditions, m,
                "global_pool_conditions = true is not supported (only false)");
  }

  /// The config.json keys ControlNetModel shares with UNet2DConditionModel.
  static const std::vector<std::string>& shared_keys() {
    // clang-format off
    static const std::vector<std::string> keys = {
        "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
        "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
        "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
        "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
        "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
        "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
        "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
        "addition_embed_type_num_heads"};
    // clang-format on
    return keys;
  }

  /// Reads diffusers' config.json of a `ControlNetModel`; missing keys take diffusers' defaults,
  /// keys it does not take and values this implementation cannot build are errors naming them.
  static ControlNetConfig from_json(const nlohmann::json& json) {
    const char* m = "ControlNetModel";
    const std::vector<std::string> own = {
        "conditioning_channels", "conditioning_embedding_out_channels",
        "controlnet_conditioning_channel_order", "global_pool_conditions"};
    std::set<std::string> known(own.begin(), own.end());
    known.insert(shared_keys().begin(), shared_keys().end());
    detail::check_known_keys(json, known, m);
    ControlNetConfig c;
    nlohmann::json shared = nlohmann::json::object();
    for (const auto& key : shared_keys()) {
      if (json.contains(key)) shared[key] = json.at(key);
    }
    // The UNet this ControlNet mirrors has the decoder that mirrors its encoder.
    std::vector<std::string> down = c.unet.down_block_types;
    detail::read_list(json, "down_block_types", down, m);
    std::vector<std::string> up;
    for (auto it = down.rbegin(); it != down.rend(); ++it) {
      up.push_back(*it == "CrossAttnDownBlock2D" ? "CrossAttnUpBlock2D" : "UpBlock2D");
    }
    shared["up_block_types"] = up;
    try {
      c.unet = UNetConfig::from_json(shared);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "ControlNetModel config: ", e.what_without_backtrace());
    }
    detail::read_config(json, "conditioning_channels", c.conditioning_channels, m);
    detail::read_list(json, "conditioning_embedding_out_channels",
                      c.conditioning_embedding_out_channels, m);
    detail::read_config(json, "controlnet_conditioning_channel_order",
                        c.controlnet_conditioning_channel_order, m);
    detail::read_config(json, "global_pool_conditions", c.global_pool_conditions, m);
    c.validate();
    return c;
  }

  /// The configuration as diffusers' config.json keys of a `ControlNetModel`.
  nlohmann::json to_json() const {
    const auto all = unet.to_json();
    nlohmann::json out = nlohmann::json::object();
    for (const auto& key : shared_keys()) {
      if (all.contains(key)) out[key] = all.at(key);
    }
    out["conditioning_channels"] = conditioning_channels;
    out["conditioning_embedding_out_channels"] = conditioning_embedding_out_channels;
    out["controlnet_conditioning_channel_order"] = controlnet_conditioning_channel_order;
    out["global_pool_conditions"] = global_pool_conditions;
    return out;
  }

  /// The ControlNet of a UNet of configuration `unet` (diffusers' `ControlNetModel.from_unet`):
  /// the UNet's shared keys, the control-specific ones at their defaults.
  static ControlNetConfig from_unet(const UNetConfig& unet) {
    ControlNetConfig c;
    c.unet = unet;
    c.validate();
    return c;
  }

  /// A ControlNet of Stable Diffusion 1.x (SD 1.5's UNet, the default control settings).
  static ControlNetConfig sd15() { return from_unet(UNetConfig::sd15()); }
};

}  // namespace sd
