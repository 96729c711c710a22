#pragma once
/// @file config.hpp
/// @brief Configuration of the Stable Diffusion 1.x / 2.x / XL UNet, read from diffusers'
/// `config.json` (the constructor arguments of `UNet2DConditionModel`); the VAE's is in
/// vae_config.hpp, included here.
///
/// Missing keys take diffusers' defaults (so the struct defaults below are diffusers' defaults,
/// not SD 1.5's: use `sd15()` for those). Values this implementation cannot build (class
/// embeddings, other block types, ...) are rejected with an error naming the key and the value,
/// rather than silently ignored. Keys starting with `_` (`_class_name`, `_diffusers_version`)
/// are metadata and skipped.

#include <sd/config_json.hpp>
#include <sd/vae_config.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace sd {

/// Configuration of `sd::UNet2DConditionModel`: diffusers' `UNet2DConditionModel` arguments.
///
/// Example:
/// @code
/// auto config = sd::UNetConfig::from_json(nlohmann::json::parse(std::ifstream("config.json")));
/// sd::UNet unet(config);
/// @endcode
struct UNetConfig {
  int64_t sample_size = 0;                  ///< latent side it was trained at; 0 = unset (null). SD 1.5: 64
  int64_t in_channels = 4;                  ///< latent channels in
  int64_t out_channels = 4;                 ///< latent channels out
  bool center_input_sample = false;         ///< map the input x to 2x - 1 first
  bool flip_sin_to_cos = true;              ///< timestep embedding as [cos, sin] instead of [sin, cos]
  int64_t freq_shift = 0;                   ///< downscale_freq_shift of the timestep embedding
  /// Encoder levels: CrossAttnDownBlock2D (with transformers) or DownBlock2D.
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D", "DownBlock2D"};
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";  ///< the only mid block supported
  /// Decoder levels, deepest first: UpBlock2D or CrossAttnUpBlock2D.
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  bool only_cross_attention = false;        ///< attn1 attends to the context too
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};  ///< channels per level
  int64_t layers_per_block = 2;             ///< resnets per down block (up blocks: one more)
  int64_t downsample_padding = 1;           ///< padding of the stride-2 downsampling conv
  double mid_block_scale_factor = 1.0;      ///< output scale of the mid block's resnets
  std::string act_fn = "silu";              ///< the only activation supported ("swish" = "silu")
  int64_t norm_num_groups = 32;             ///< GroupNorm groups everywhere
  double norm_eps = 1e-5;                   ///< GroupNorm eps of the resnets and conv_norm_out
  int64_t cross_attention_dim = 1280;       ///< context width; 768 for SD 1.x, 1024 for SD 2.x
  std::vector<int64_t> transformer_layers_per_block = {1};  ///< one value, or one per block
  /// One value, or one per down block. For historical reasons diffusers uses this as the number
  /// of attention HEADS when `num_attention_heads` is null (SD 1.x: 8 heads; SD 2.x: 5,10,20,20).
  std::vector<int64_t> attention_head_dim = {8};
  std::vector<int64_t> num_attention_heads = {};  ///< empty (null): equals attention_head_dim
  bool use_linear_projection = false;       ///< proj_in/proj_out as Linear (SD 2.x) or 1×1 conv
  /// Accepted for SD 2.1 configs; like diffusers' SDPA processor, the fused attention ignores it.
  bool upcast_attention = false;
  double resnet_out_scale_factor = 1.0;     ///< output scale of the down/up blocks' resnets
  int64_t time_embedding_dim = 0;           ///< 0 (null): 4 · block_out_channels[0]
  int64_t conv_in_kernel = 3;               ///< kernel of conv_in (odd)
  int64_t conv_out_kernel = 3;              ///< kernel of conv_out (odd)
  /// Added conditioning: "" (null: none) or "text_time" (SDXL: the pooled text embedding and the
  /// six size / crop ids, `UNetAddedConditions`).
  std::string addition_embed_type;
  int64_t addition_time_embed_dim = 0;      ///< sinusoidal width per time id; 0 (null). SDXL: 256
  /// add_embedding's input: text_embeds + 6 · addition_time_embed_dim; 0 (null). SDXL: 2816
  int64_t projection_class_embeddings_input_dim = 0;
  /// Time ids of "text_time": original (h, w), crop (top, left), target (h, w).
  static constexpr int64_t kTextTimeIds = 6;

  /// Number of down (= up) blocks.
  size_t num_blocks() const { return block_out_channels.size(); }

  /// Attention heads of down block `block` (up block n-1-block and, for the last, the mid block).
  int64_t heads(size_t block) const {
    return detail::per_block(num_attention_heads.empty() ? attention_head_dim : num_attention_heads,
                             block);
  }

  /// Transformer layers of down block `block`.
  int64_t transformer_layers(size_t block) const {
    return detail::per_block(transformer_layers_per_block, block);
  }

  /// Width of the time embedding (linear_1 / linear_2 output).
  int64_t time_embed_dim() const {
    return time_embedding_dim > 0 ? time_embedding_dim : 4 * block_out_channels.at(0);
  }

  /// Whether the UNet takes SDXL's added conditioning (`addition_embed_type` "text_time").
  bool has_text_time() const { return addition_embed_type == "text_time"; }

  /// Width of the pooled text embedding "text_time" expects (SDXL 1280).
  int64_t text_embeds_dim() const {
    return projection_class_embeddings_input_dim - kTextTimeIds * addition_time_embed_dim;
  }

  /// Throws on a configuration this implementation cannot build, naming the field and value.
  void validate() const {
    const char* m = "UNet2DConditionModel";
    TORCH_CHECK(addition_embed_type.empty() || has_text_time(), m,
                " config: addition_embed_type '", addition_embed_type,
                "' is not supported (only null, text_time)");
    if (has_text_time()) {
      TORCH_CHECK(addition_time_embed_dim > 0 && text_embeds_dim() > 0, m,
                  " config: addition_embed_type text_time needs addition_time_embed_dim > 0 and "
                  "projection_class_embeddings_input_dim > 6 · addition_time_embed_dim, got ",
                  addition_time_embed_dim, " and ", projection_class_embeddings_input_dim);
    } else {
      TORCH_CHECK(addition_time_embed_dim == 0 && projection_class_embeddings_input_dim == 0, m,
                  " config: addition_time_embed_dim (", addition_time_embed_dim,
                  ") and projection_class_embeddings_input_dim (",
                  projection_class_embeddings_input_dim,
                  ") are only supported with addition_embed_type text_time");
    }
    const size_t n = num_blocks();
    TORCH_CHECK(n >= 1, m, " config: block_out_channels is empty");
    TORCH_CHECK(down_block_types.size() == n && up_block_types.size() == n, m,
                " config: ", down_block_types.size(), " down_block_types and ",
                up_block_types.size(), " up_block_types for ", n, " block_out_channels");
    for (const auto& type : down_block_types) {
      TORCH_CHECK(type == "CrossAttnDownBlock2D" || type == "DownBlock2D", m,
                  " config: down block type '", type,
                  "' is not supported (only CrossAttnDownBlock2D, DownBlock2D)");
    }
    for (const auto& type : up_block_types) {
      TORCH_CHECK(type == "CrossAttnUpBlock2D" || type == "UpBlock2D", m,
                  " config: up block type '", type,
                  "' is not supported (only CrossAttnUpBlock2D, UpBlock2D)");
    }
    TORCH_CHECK(mid_block_type == "UNetMidBlock2DCrossAttn", m, " config: mid_block_type '",
                mid_block_type, "' is not supported (only UNetMidBlock2DCrossAttn)");
    TORCH_CHECK(act_fn == "silu" || act_fn == "swish", m, " config: act_fn '", act_fn,
                "' is not supported (only silu)");
    TORCH_CHECK(in_channels > 0 && out_channels > 0 && layers_per_block > 0 &&
                    norm_num_groups > 0 && cross_attention_dim > 0,
                m, " config: in_channels, out_channels, layers_per_block, norm_num_groups and "
                "cross_attention_dim must be positive");
    TORCH_CHECK(downsample_padding == 0 || downsample_padding == 1, m,
                " config: downsample_padding must be 0 or 1, got ", downsample_padding);
    TORCH_CHECK(conv_in_kernel % 2 == 1 && conv_out_kernel % 2 == 1, m,
                " config: conv_in_kernel / conv_out_kernel must be odd, got ", conv_in_kernel,
                " / ", conv_out_kernel);
    for (const auto* list : {&attention_head_dim, &transformer_layers_per_block}) {
      TORCH_CHECK(list->size() == 1 || list->size() == n, m,
                  " config: attention_head_dim / transformer_layers_per_block need 1 or ", n,
                  " values, got ", list->size());
    }
    TORCH_CHECK(num_attention_heads.empty() || num_attention_heads.size() == 1 ||
                    num_attention_heads.size() == n,
                m, " config: num_attention_heads needs 1 or ", n, " values, got ",
                num_attention_heads.size());
    for (size_t i = 0; i < n; ++i) {
      const int64_t c = block_out_channels[i];
      TORCH_CHECK(c > 0 && c % norm_num_groups == 0, m, " config: block_out_channels[", i,
                  "] = ", c, " is not a positive multiple of norm_num_groups = ",
                  norm_num_groups);
      TORCH_CHECK(heads(i) > 0 && c % heads(i) == 0, m, " config: block_out_channels[", i,
                  "] = ", c, " is not divisible by its ", heads(i), " attention heads");
      TORCH_CHECK(transformer_layers(i) > 0, m, " config: transformer_layers_per_block[", i,
                  "] must be positive");
    }
  }

  /// Reads diffusers' config.json of a `UNet2DConditionModel`; missing keys take diffusers'
  /// defaults, unsupported values are errors.
  static UNetConfig from_json(const nlohmann::json& json) {
    const char* m = "UNet2DConditionModel";
    detail::check_known_keys(
        json,
        {"sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos",
         "freq_shift", "down_block_types", "mid_block_type", "up_block_types",
         "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
         "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups", "norm_eps",
         "cross_attention_dim", "transformer_layers_per_block",
         "reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
         "attention_head_dim", "num_attention_heads", "dual_cross_attention",
         "use_linear_projection", "class_embed_type", "addition_embed_type",
         "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
         "resnet_time_scale_shift", "resnet_skip_time_act", "resnet_out_scale_factor",
         "time_embedding_type", "time_embedding_dim", "time_embedding_act_fn",
         "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
         "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
         "mid_block_only_cross_attention", "cross_attention_norm",
         "addition_embed_type_num_heads"},
        m);
    // Features this implementation does not build: only their defaults are accepted.
    for (const char* key : {"encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type",
                            "num_class_embeds", "time_embedding_act_fn", "timestep_post_act",
                            "time_cond_proj_dim", "cross_attention_norm",
                            "reverse_transformer_layers_per_block"}) {
      const nlohmann::json* value = detail::config_value(json, key);
      TORCH_CHECK(value == nullptr, m, " config: key '", key, "' = ", value->dump(),
                  " is not supported (class embeddings, encoder_hid_proj and time conditioning "
                  "are not implemented; only null)");
    }
    detail::require_default(json, "dropout", 0.0, m);
    detail::require_default(json, "dual_cross_attention", false, m);
    detail::require_default(json, "resnet_time_scale_shift", "default", m);
    detail::require_default(json, "resnet_skip_time_act", false, m);
    detail::require_default(json, "time_embedding_type", "positional", m);
    detail::require_default(json, "attention_type", "default", m);
    detail::require_default(json, "class_embeddings_concat", false, m);

    UNetConfig c;
    detail::read_config(json, "sample_size", c.sample_size, m);
    detail::read_config(json, "in_channels", c.in_channels, m);
    detail::read_config(json, "out_channels", c.out_channels, m);
    detail::read_config(json, "center_input_sample", c.center_input_sample, m);
    detail::read_config(json, "flip_sin_to_cos", c.flip_sin_to_cos, m);
    detail::read_config(json, "freq_shift", c.freq_shift, m);
    detail::read_list(json, "down_block_types", c.down_block_types, m);
    detail::read_list(json, "up_block_types", c.up_block_types, m);
    if (json.contains("mid_block_type")) {
      TORCH_CHECK(!json.at("mid_block_type").is_null(), m,
                  " config: mid_block_type null (no mid block) is not supported");
      detail::read_config(json, "mid_block_type", c.mid_block_type, m);
    }
    detail::read_config(json, "only_cross_attention", c.only_cross_attention, m);
    detail::require_default(json, "mid_block_only_cross_attention", c.only_cross_attention, m);
    detail::read_list(json, "block_out_channels", c.block_out_channels, m);
    detail::read_config(json, "layers_per_block", c.layers_per_block, m);
    detail::read_config(json, "downsample_padding", c.downsample_padding, m);
    detail::read_config(json, "mid_block_scale_factor", c.mid_block_scale_factor, m);
    detail::read_config(json, "act_fn", c.act_fn, m);
    if (json.contains("norm_num_groups")) {
      TORCH_CHECK(!json.at("norm_num_groups").is_null(), m,
                  " config: norm_num_groups null (no output norm) is not supported");
    }
    detail::read_config(json, "norm_num_groups", c.norm_num_groups, m);
    detail::read_config(json, "norm_eps", c.norm_eps, m);
    detail::read_config(json, "cross_attention_dim", c.cross_attention_dim, m);
    detail::read_int_or_list(json, "transformer_layers_per_block",
                             c.transformer_layers_per_block, m);
    detail::read_int_or_list(json, "attention_head_dim", c.attention_head_dim, m);
    detail::read_int_or_list(json, "num_attention_heads", c.num_attention_heads, m);
    detail::read_config(json, "use_linear_projection", c.use_linear_projection, m);
    detail::read_config(json, "upcast_attention", c.upcast_attention, m);
    detail::read_config(json, "resnet_out_scale_factor", c.resnet_out_scale_factor, m);
    detail::read_config(json, "time_embedding_dim", c.time_embedding_dim, m);
    detail::read_config(json, "conv_in_kernel", c.conv_in_kernel, m);
    detail::read_config(json, "conv_out_kernel", c.conv_out_kernel, m);
    detail::read_config(json, "addition_embed_type", c.addition_embed_type, m);
    detail::read_config(json, "addition_time_embed_dim", c.addition_time_embed_dim, m);
    detail::read_config(json, "projection_class_embeddings_input_dim",
                        c.projection_class_embeddings_input_dim, m);
    c.validate();
    return c;
  }

  /// The configuration as diffusers' config.json keys (every field written out).
  nlohmann::json to_json() const {
    auto null_if_zero = [](int64_t v) { return v > 0 ? nlohmann::json(v) : nlohmann::json(); };
    auto int_or_list = [](const std::vector<int64_t>& v) -> nlohmann::json {
      if (v.empty()) return nullptr;
      return v.size() == 1 ? nlohmann::json(v[0]) : nlohmann::json(v);
    };
    return {{"sample_size", sample_size > 0 ? nlohmann::json(sample_size) : nlohmann::json()},
            {"in_channels", in_channels},
            {"out_channels", out_channels},
            {"center_input_sample", center_input_sample},
            {"flip_sin_to_cos", flip_sin_to_cos},
            {"freq_shift", freq_shift},
            {"down_block_types", down_block_types},
            {"mid_block_type", mid_block_type},
            {"up_block_types", up_block_types},
            {"only_cross_attention", only_cross_attention},
            {"block_out_channels", block_out_channels},
            {"layers_per_block", layers_per_block},
            {"downsample_padding", downsample_padding},
            {"mid_block_scale_factor", mid_block_scale_factor},
            {"act_fn", act_fn},
            {"norm_num_groups", norm_num_groups},
            {"norm_eps", norm_eps},
            {"cross_attention_dim", cross_attention_dim},
            {"transformer_layers_per_block", int_or_list(transformer_layers_per_block)},
            {"attention_head_dim", int_or_list(attention_head_dim)},
            {"num_attention_heads", int_or_list(num_attention_heads)},
            {"use_linear_projection", use_linear_projection},
            {"upcast_attention", upcast_attention},
            {"resnet_out_scale_factor", resnet_out_scale_factor},
            {"time_embedding_dim", null_if_zero(time_embedding_dim)},
            {"conv_in_kernel", conv_in_kernel},
            {"conv_out_kernel", conv_out_kernel},
            {"addition_embed_type",
             addition_embed_type.empty() ? nlohmann::json() : nlohmann::json(addition_embed_type)},
            {"addition_time_embed_dim", null_if_zero(addition_time_embed_dim)},
            {"projection_class_embeddings_input_dim",
             null_if_zero(projection_class_embeddings_input_dim)}};
  }

  /// Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5 `unet/config.json`).
  static UNetConfig sd15() {
    UNetConfig c;
    c.sample_size = 64;
    c.cross_attention_dim = 768;
    return c;
  }

  /// Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1 `unet/config.json`, 768-v): linear
  /// projections, 5, 10, 20, 20 heads of 64 channels, OpenCLIP ViT-H's 1024-wide context.
  static UNetConfig sd21() {
    UNetConfig c;
    c.sample_size = 96;
    c.cross_attention_dim = 1024;
    c.attention_head_dim = {5, 10, 20, 20};
    c.use_linear_projection = true;
    c.upcast_attention = true;
    return c;
  }

  /// Stable Diffusion XL base (stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`):
  /// three levels, the first without attention, 1, 2, 10 transformer layers per level, the
  /// 2048-wide context of two text encoders and the "text_time" added conditioning.
  static UNetConfig sdxl() {
    UNetConfig c;
    c.sample_size = 128;
    c.down_block_types = {"DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
    c.up_block_types = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"};
    c.block_out_channels = {320, 640, 1280};
    c.transformer_layers_per_block = {1, 2, 10};
    c.cross_attention_dim = 2048;
    c.attention_head_dim = {5, 10, 20};
    c.use_linear_projection = true;
    c.addition_embed_type = "text_time";
    c.addition_time_embed_dim = 256;
    c.projection_class_embeddings_input_dim = 2816;
    return c;
  }
};

}  // namespace sd
