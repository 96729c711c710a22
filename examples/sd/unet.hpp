#pragma once
/// @file unet.hpp
/// @brief Stable Diffusion 1.x / 2.x / XL denoising UNet: diffusers' `UNet2DConditionModel`,
/// configuration-driven, with diffusers' state-dict keys and shapes, SDXL's added "text_time"
/// conditioning, and its skip connections marked as `scedit::SkipSite`s (scepter's
/// `lsc_identity`) for SCEdit's tuners.
///
/// Reference: diffusers `models/unets/unet_2d_condition.py`, `models/embeddings.py`
/// (`get_timestep_embedding`, `TimestepEmbedding`).
///
/// Example:
/// @code
/// sd::UNet unet(sd::UNetConfig::sd15());
/// scedit::load_state_dict(*unet, scedit::safetensors::load("unet.safetensors"));
/// auto eps = unet(latents, t, text_embeddings);  // [B, 4, 64, 64], [B], [B, 77, 768]
/// sd::UNet xl(sd::UNetConfig::sdxl());           // SDXL also takes the added conditioning:
/// auto eps_xl = xl(latents, t, context, sd::UNetAddedConditions{pooled, time_ids});
/// @endcode

#include <sd/config.hpp>
#include <sd/embeddings.hpp>
#include <sd/layers.hpp>
#include <sd/lean_ops.hpp>
#include <sd/unet_blocks.hpp>

#include <scedit/csctuner.hpp>
#include <scedit/sites.hpp>

#include <torch/torch.h>

#include <cmath>
#include <ostream>
#include <utility>
#include <vector>

namespace sd {

namespace detail {

/// The attention settings of UNet level `block` (`has_attention` false: a block without).
inline UNetAttentionOptions unet_attention_options(const UNetConfig& c, size_t block,
                                                   bool has_attention) {
  return UNetAttentionOptions()
      .heads(has_attention ? c.heads(block) : 0)
      .cross_attention_dim(c.cross_attention_dim)
      .transformer_layers(c.transformer_layers(block))
      .use_linear_projection(c.use_linear_projection)
      .only_cross_attention(c.only_cross_attention);
}

/// Encoder level `i` as diffusers builds it from a UNet configuration (the UNet's and a
/// ControlNet's encoders are the same blocks, so both build them here).
inline DownBlock2DOptions unet_down_block_options(const UNetConfig& c, size_t i) {
  const auto& ch = c.block_out_channels;
  return DownBlock2DOptions(i == 0 ? ch[0] : ch[i - 1], ch[i], c.time_embed_dim())
      .num_layers(c.layers_per_block)
      .groups(c.norm_num_groups)
      .eps(c.norm_eps)
      .output_scale_factor(c.resnet_out_scale_factor)
      .add_downsample(i + 1 < c.num_blocks())
      .downsample_padding(c.downsample_padding)
      .attention(unet_attention_options(c, i, c.down_block_types[i] == "CrossAttnDownBlock2D"));
}

/// The middle block as diffusers builds it from a UNet configuration.
inline UNetMidBlock2DCrossAttnOptions unet_mid_block_options(const UNetConfig& c) {
  const size_t last = c.num_blocks() - 1;
  return UNetMidBlock2DCrossAttnOptions(c.block_out_channels[last], c.time_embed_dim())
      .groups(c.norm_num_groups)
      .eps(c.norm_eps)
      .output_scale_factor(c.mid_block_scale_factor)
      .attention(unet_attention_options(c, last, true));
}

/// The sinusoidal timestep features of a UNet configuration, one row per sample of `sample`:
/// timestep [B], [1] or a scalar -> [B, block_out_channels[0]] float32 (diffusers' `time_proj`).
inline torch::Tensor timestep_features(const UNetConfig& c, const torch::Tensor& timestep,
                                       const torch::Tensor& sample) {
  auto timesteps = timestep.reshape({-1}).to(sample.device()).expand({sample.size(0)});
  return functional::timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos,
                                        static_cast<double>(c.freq_shift));
}

/// The input of a "text_time" UNet's `add_embedding`: cat(text_embeds, the time ids' sinusoidal
/// features) -> [B, projection_class_embeddings_input_dim] in `dtype` (diffusers `get_aug_embed`:
/// text_embeds first; the features are float32, then cast).
inline torch::Tensor text_time_input(const UNetConfig& c, const UNetAddedConditions& added,
                                     torch::ScalarType dtype) {
  auto features = functional::time_ids_embedding(added.time_ids, c.addition_time_embed_dim,
                                                 c.flip_sin_to_cos,
                                                 static_cast<double>(c.freq_shift));
  // [B, D] + [B, 6·addition_time_embed_dim] -> [B, projection_class_embeddings_input_dim]
  return torch::cat({added.text_embeds.to(dtype), features.to(added.text_embeds.device(), dtype)},
                    -1);
}

/// Sets the lean activation variants (lean_ops.hpp) of every resnet, GEGLU, transformer block
/// and transformer under `root`.
inline void set_block_lean_activations(torch::nn::Module& root, const LeanActivations& options) {
  for (auto& module : root.modules(/*include_self=*/false)) {
    if (auto* resnet = dynamic_cast<ResnetBlock2DImpl*>(module.get())) {
      resnet->lean = options;
    } else if (auto* geglu = dynamic_cast<GEGLUImpl*>(module.get())) {
      geglu->lean = options;
    } else if (auto* block = dynamic_cast<BasicTransformerBlockImpl*>(module.get())) {
      block->lean = options;
    } else if (auto* transformer = dynamic_cast<Transformer2DModelImpl*>(module.get())) {
      transformer->lean = options;
    }
  }
}

/// Lays out the 4-d parameters (the convolution weights) of `root` channels-last, or back.
inline void set_conv_weights_channels_last(torch::nn::Module& root, bool enabled) {
  torch::NoGradGuard no_grad;
  const auto format = enabled ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  for (auto& p : root.parameters()) {
    if (p.dim() == 4) p.set_data(p.contiguous(format));
  }
}

}  // namespace detail

/// What the UNet's encoder hands its decoder (`UNet2DConditionModel::encode`): the middle
/// block's output, the skip features and the conditioning both halves use.
struct UNetFeatures {
  /// The middle block's output [B, C_last, H/f, W/f] (f = 2^(levels-1)).
  torch::Tensor mid_output;
  /// The skip features in the order the encoder made them (`conv_in`'s output first; 12 for
  /// SD 1.x / 2.x, 9 for SDXL).
  std::vector<torch::Tensor> skips;
  /// The time embedding [B, 4·C0] (with SDXL's added conditioning's embedding added).
  torch::Tensor time_embedding;
  /// The text context (encoder_hidden_states) [B, L, cross_attention_dim].
  torch::Tensor context;
};

/// Additive residuals for the skips and the middle block's output, as diffusers' UNet takes them
/// from a ControlNet (`down_block_additional_residuals`, `mid_block_additional_residual`).
struct UNetResiduals {
  /// One per skip, in encoder order, each shaped like its skip; empty: none.
  std::vector<torch::Tensor> down;
  /// Shaped like the middle block's output; undefined: none.
  torch::Tensor mid;
};

/// diffusers' `UNet2DConditionModel` for SD 1.x / 2.x / XL: predicts the noise (or v) of a
/// latent. With `addition_embed_type` "text_time" (SDXL) it also takes `UNetAddedConditions`,
/// whose `add_embedding` is added to the time embedding; other UNets refuse them.
///
/// The 12 skip connections of SD (conv_in, each resnet/transformer output and each downsampler of
/// the encoder) pass through `lsc_identity[i]`, one `scedit::SkipSite` per skip in decoder order
/// (i = 0 is the deepest skip, the last one the encoder produced). The sites are the identity
/// until tuners are attached, and have no parameters, so the state dict is diffusers'. Attached
/// CSC-Tuners live in `csc_tuners` (empty without) and are cloned with the model.
///
/// `forward` runs both halves; `encode` (time embedding, encoder, middle block) and `decode` (the
/// decoder, which takes the skips back through their sites) run them apart, and residuals from a
/// ControlNet are added to the skips and the middle output in between.
class UNet2DConditionModelImpl : public detail::BoundCloneable<UNet2DConditionModelImpl> {
 public:
  /// Builds the model (random init) from `config`; load weights with `scedit::load_state_dict`.
  explicit UNet2DConditionModelImpl(UNetConfig config) : config(std::move(config)) { reset(); }

  /// Registers conv_in, time_embedding, add_embedding ("text_time" only), down_blocks,
  /// up_blocks, mid_block, conv_norm_out, conv_out (diffusers' order), lsc_identity and an empty
  /// csc_tuners.
  void reset() override {
    const auto& c = config;
    c.validate();
    const size_t n = c.num_blocks();
    const auto& ch = c.block_out_channels;
    const int64_t temb = c.time_embed_dim();
    conv_in = register_module(
        "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, ch[0], c.conv_in_kernel)
                                         .padding((c.conv_in_kernel - 1) / 2)));
    time_embedding =
        register_module("time_embedding", TimestepEmbedding(TimestepEmbeddingOptions(ch[0], temb)));
    if (c.has_text_time()) {
      add_embedding = register_module(
          "add_embedding", TimestepEmbedding(TimestepEmbeddingOptions(
                               c.projection_class_embeddings_input_dim, temb)));
    }

    down_blocks = register_module("down_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < n; ++i) {
      down_blocks->push_back(DownBlock2D(detail::unet_down_block_options(c, i)));
    }

    up_blocks = register_module("up_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < n; ++i) {
      const size_t level = n - 1 - i;  // the encoder level this up block mirrors
      up_blocks->push_back(UpBlock2D(
          UpBlock2DOptions(/*in_channels=*/ch[level == 0 ? 0 : level - 1],
                           /*prev_output_channels=*/ch[i == 0 ? n - 1 : level + 1],
                           /*out_channels=*/ch[level], temb)
              .num_layers(c.layers_per_block + 1)
              .groups(c.norm_num_groups)
              .eps(c.norm_eps)
              .output_scale_factor(c.resnet_out_scale_factor)
              .add_upsample(i + 1 < n)
              .attention(detail::unet_attention_options(
                  c, level, c.up_block_types[i] == "CrossAttnUpBlock2D"))));
    }

    mid_block =
        register_module("mid_block", UNetMidBlock2DCrossAttn(detail::unet_mid_block_options(c)));
    conv_norm_out = register_module(
        "conv_norm_out",
        torch::nn::GroupNorm(torch::nn::GroupNormOptions(c.norm_num_groups, ch[0]).eps(c.norm_eps)));
    conv_out = register_module(
        "conv_out",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(ch[0], c.out_channels, c.conv_out_kernel)
                              .padding((c.conv_out_kernel - 1) / 2)));

    // One site per skip, in decoder order (the reverse of the order the encoder makes them).
    lsc_identity = register_module("lsc_identity", torch::nn::ModuleList());
    const auto channels = skip_channels();
    for (auto it = channels.rbegin(); it != channels.rend(); ++it) {
      lsc_identity->push_back(scedit::SkipSite(scedit::SkipSiteOptions(*it)));
    }
    csc_tuners = register_module(scedit::kCSCTunersKey, torch::nn::ModuleDict());
    bind();

    // diffusers sizes each up-block resnet for the skip it expects; check that these are the
    // skips the encoder makes, in the order the decoder pops them.
    size_t site = 0;
    for (size_t i = 0; i < n; ++i) {
      for (int64_t layer = 0; layer < c.layers_per_block + 1; ++layer, ++site) {
        TORCH_CHECK(site < sites.size() &&
                        ups[i]->skip_channels(layer) == sites[site]->options.channels(),
                    "UNet2DConditionModel: up block ", i, " resnet ", layer,
                    " expects a skip that the encoder does not produce at that point");
      }
    }
    TORCH_CHECK(site == sites.size(), "UNet2DConditionModel: the decoder consumes ", site,
                " skips but the encoder produces ", sites.size());
  }

  /// Re-reads the typed holders of the module lists and points the sites at this model's own
  /// CSC-Tuners (see `detail::BoundCloneable`: a clone's sites still point at the original's).
  void bind() {
    downs = detail::typed_items<DownBlock2D>(down_blocks);
    ups = detail::typed_items<UpBlock2D>(up_blocks);
    sites = detail::typed_items<scedit::SkipSite>(lsc_identity);
    scedit::relink_csc_tuners(*this);
  }

  /// Predicts the noise: sample [B, in_channels, H, W] (any positive H and W: as diffusers, each
  /// upsampler follows the size of the skip it meets), timestep [B], [1] or a scalar (int or float),
  /// encoder_hidden_states [B, L, cross_attention_dim] -> [B, out_channels, H, W]. `residuals`
  /// (a ControlNet's) are added to the skips and the middle output between the halves. A
  /// "text_time" UNet (SDXL) needs the overload with `UNetAddedConditions`.
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states,
                        const UNetResiduals& residuals = {}) {
    return forward(sample, timestep, encoder_hidden_states, UNetAddedConditions{}, residuals);
  }

  /// As above, with SDXL's added conditioning: `added.text_embeds` [B, text_embeds_dim] and
  /// `added.time_ids` [B, 6] (any numeric dtype) for a "text_time" UNet.
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states,
                        const UNetAddedConditions& added, const UNetResiduals& residuals = {}) {
    auto features = encode(sample, timestep, encoder_hidden_states, added);
    add_residuals(features, residuals);
    return decode(std::move(features));
  }

  /// The first half: time embedding (with the added conditioning's, for "text_time"), encoder
  /// and middle block (arguments as `forward`). `decode` needs nothing else: the added
  /// conditioning reaches it inside `UNetFeatures::time_embedding`.
  UNetFeatures encode(const torch::Tensor& sample, const torch::Tensor& timestep,
                      const torch::Tensor& encoder_hidden_states,
                      const UNetAddedConditions& added = {}) {
    check_inputs(sample, timestep, encoder_hidden_states, added);
    UNetFeatures features;
    features.context = encoder_hidden_states;

    // 1. Time: sinusoidal embedding in float32, then the sample's dtype (as diffusers), plus
    //    SDXL's add_embedding of cat(text_embeds, time id features).
    auto t_emb = detail::timestep_features(config, timestep, sample);
    auto& emb = features.time_embedding =
        time_embedding(t_emb.to(sample.scalar_type()));  // [B, C0] -> [B, 4·C0]
    if (config.has_text_time()) {
      // [B, D + 6·addition_time_embed_dim] -> [B, 4·C0]
      emb = emb + add_embedding(detail::text_time_input(config, added, sample.scalar_type()));
    }

    // 2. Encoder: every feature it keeps for the decoder goes onto the skip stack.
    auto input = config.center_input_sample ? 2.0 * sample - 1.0 : sample;
    if (channels_last) input = input.contiguous(torch::MemoryFormat::ChannelsLast);
    auto h = conv_in(input);
    auto& skips = features.skips;
    skips.reserve(sites.size());
    skips.push_back(h);
    for (auto& block : downs) h = block(h, emb, features.context, skips);

    // 3. Middle.
    features.mid_output = mid_block(h, emb, features.context);
    return features;
  }

  /// Adds `residuals` to the skips and the middle output of `features` (diffusers adds
  /// residual i to skip i, encoder order). Either part may be absent.
  void add_residuals(UNetFeatures& features, const UNetResiduals& residuals) const {
    if (!residuals.down.empty()) {
      TORCH_CHECK(residuals.down.size() == features.skips.size(), "UNet2DConditionModel: ",
                  residuals.down.size(), " skip residuals for ", features.skips.size(), " skips");
      for (size_t i = 0; i < features.skips.size(); ++i) {
        TORCH_CHECK(residuals.down[i].sizes() == features.skips[i].sizes(),
                    "UNet2DConditionModel: skip residual ", i, " has shape ",
                    residuals.down[i].sizes(), ", skip ", i, " has ", features.skips[i].sizes());
        features.skips[i] = features.skips[i] + residuals.down[i];
      }
    }
    if (residuals.mid.defined()) {
      TORCH_CHECK(residuals.mid.sizes() == features.mid_output.sizes(),
                  "UNet2DConditionModel: the middle residual has shape ", residuals.mid.sizes(),
                  ", the middle block's output ", features.mid_output.sizes());
      features.mid_output = features.mid_output + residuals.mid;
    }
  }

  /// The second half: the decoder takes the skips back, deepest first, each through its site,
  /// then the output norm and conv -> [B, out_channels, H, W].
  torch::Tensor decode(UNetFeatures features) {
    TORCH_CHECK(features.skips.size() == sites.size(), "UNet2DConditionModel::decode: ",
                features.skips.size(), " skip features for ", sites.size(), " skip sites");
    auto h = std::move(features.mid_output);
    size_t next_site = 0;
    for (auto& block : ups) {
      h = block(h, features.time_embedding, features.context, features.skips, sites, next_site);
    }
    return conv_out(norm_silu(h, *conv_norm_out, lean));
  }

  /// Channels of the skip features in the order the encoder produces them (conv_in first).
  std::vector<int64_t> skip_channels() const {
    std::vector<int64_t> channels{config.block_out_channels[0]};
    for (size_t i = 0; i < config.num_blocks(); ++i) {
      const int64_t count = config.layers_per_block + (i + 1 < config.num_blocks() ? 1 : 0);
      channels.insert(channels.end(), count, config.block_out_channels[i]);
    }
    return channels;
  }

  /// For each skip in encoder order, whether the stage that made it halved the resolution
  /// (true for the downsamplers' outputs): the strides of CSC-Tuner's dense hint blocks.
  std::vector<bool> skip_down_flags() const {
    std::vector<bool> flags{false};
    for (size_t i = 0; i < config.num_blocks(); ++i) {
      flags.insert(flags.end(), config.layers_per_block, false);
      if (i + 1 < config.num_blocks()) flags.push_back(true);
    }
    return flags;
  }

  /// Recompute the decoder's resnets and transformers in the backward pass instead of keeping
  /// their activations (diffusers' `enable_gradient_checkpointing`, decoder only: with tuners on
  /// the skips nothing upstream of the decoder keeps activations anyway).
  void set_gradient_checkpointing(bool enabled) {
    for (auto& up : ups) up->gradient_checkpointing = enabled;
  }

  /// Chooses the lean activation variants (lean_ops.hpp) in every block: training-memory and
  /// speed levers, off by default; exact in float32 but for the fused kernels' own rounding.
  void set_lean_activations(const LeanActivations& options) {
    lean = options;
    detail::set_block_lean_activations(*this, options);
  }

  /// Keeps the convolution weights and the input sample in channels-last memory order (NHWC)
  /// instead of NCHW, or back: a speed lever for tensor-core convolutions (it changes only the
  /// layout, not the values; the state dict reads the same). Call it after `to(device, dtype)`.
  void set_channels_last(bool enabled) {
    detail::set_conv_weights_channels_last(*this, enabled);
    channels_last = enabled;
  }

  /// The skip sites in decoder order (`lsc_identity[0]` = the deepest skip).
  std::vector<scedit::SkipSite> skip_sites() const { return sites; }

  /// Overall downsampling of the latent: 2^(levels - 1). Other sizes work too (the encoder rounds
  /// up, the decoder's upsamplers follow the skips' sizes); at multiples of it no side is rounded.
  int64_t downsampling_factor() const { return int64_t{1} << (config.num_blocks() - 1); }

  /// Prints `sd::UNet2DConditionModel(block_out_channels=[320, 640, 1280, 1280], ...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::UNet2DConditionModel(block_out_channels="
           << torch::IntArrayRef(config.block_out_channels)
           << ", layers_per_block=" << config.layers_per_block
           << ", cross_attention_dim=" << config.cross_attention_dim;
    if (config.has_text_time()) stream << ", addition_embed_type=text_time";
    stream << ")";
  }

  /// The configuration it was built with.
  UNetConfig config;
  /// Input conv.
  torch::nn::Conv2d conv_in{nullptr};
  /// Time embedding MLP (time_proj, the sinusoidal part, has no parameters).
  TimestepEmbedding time_embedding{nullptr};
  /// SDXL's added-conditioning MLP ("text_time" only; add_time_proj has no parameters).
  TimestepEmbedding add_embedding{nullptr};
  /// Encoder levels.
  torch::nn::ModuleList down_blocks{nullptr};
  /// Decoder levels (deepest first).
  torch::nn::ModuleList up_blocks{nullptr};
  /// Middle block.
  UNetMidBlock2DCrossAttn mid_block{nullptr};
  /// Output GroupNorm.
  torch::nn::GroupNorm conv_norm_out{nullptr};
  /// Output conv.
  torch::nn::Conv2d conv_out{nullptr};
  /// Skip sites in decoder order.
  torch::nn::ModuleList lsc_identity{nullptr};
  /// The attached CSC-Tuners by name (`scedit::attach_csc_tuner`; empty without).
  torch::nn::ModuleDict csc_tuners{nullptr};
  /// Typed holders of `down_blocks`.
  std::vector<DownBlock2D> downs;
  /// Typed holders of `up_blocks`.
  std::vector<UpBlock2D> ups;
  /// Typed holders of `lsc_identity`.
  std::vector<scedit::SkipSite> sites;
  /// Lean activation variants of the output norm (see `set_lean_activations`).
  LeanActivations lean;
  /// Whether the input is laid out channels-last (see `set_channels_last`).
  bool channels_last = false;

 private:
  void check_inputs(const torch::Tensor& sample, const torch::Tensor& timestep,
                    const torch::Tensor& context, const UNetAddedConditions& added) const {
    TORCH_CHECK(sample.dim() == 4 && sample.size(1) == config.in_channels,
                "UNet2DConditionModel: expected sample [B, ", config.in_channels,
                ", H, W], got shape ", sample.sizes());
    TORCH_CHECK(sample.size(2) > 0 && sample.size(3) > 0,
                "UNet2DConditionModel: sample height and width must be positive, got shape ",
                sample.sizes());
    TORCH_CHECK(context.dim() == 3 && context.size(0) == sample.size(0) &&
                    context.size(2) == config.cross_attention_dim,
                "UNet2DConditionModel: expected encoder_hidden_states [", sample.size(0), ", L, ",
                config.cross_attention_dim, "], got shape ", context.sizes());
    TORCH_CHECK(timestep.dim() <= 1 && (timestep.numel() == 1 || timestep.numel() == sample.size(0)),
                "UNet2DConditionModel: expected timestep [", sample.size(0),
                "], [1] or a scalar, got shape ", timestep.sizes());
    const int64_t b = sample.size(0);
    if (!config.has_text_time()) {
      TORCH_CHECK(!added.defined(), "UNet2DConditionModel: added conditions (text_embeds, "
                  "time_ids) were given, but this UNet has no addition_embed_type");
    } else {
      TORCH_CHECK(added.text_embeds.defined() && added.time_ids.defined(),
                  "UNet2DConditionModel: this UNet (addition_embed_type text_time) needs "
                  "UNetAddedConditions: text_embeds [B, ", config.text_embeds_dim(),
                  "] and time_ids [B, ", UNetConfig::kTextTimeIds, "]");
      TORCH_CHECK(added.text_embeds.dim() == 2 && added.text_embeds.size(0) == b &&
                      added.text_embeds.size(1) == config.text_embeds_dim(),
                  "UNet2DConditionModel: expected text_embeds [", b, ", ",
                  config.text_embeds_dim(), "], got shape ", added.text_embeds.sizes());
      TORCH_CHECK(added.time_ids.dim() == 2 && added.time_ids.size(0) == b &&
                      added.time_ids.size(1) == UNetConfig::kTextTimeIds,
                  "UNet2DConditionModel: expected time_ids [", b, ", ", UNetConfig::kTextTimeIds,
                  "] (original h, w, crop top, left, target h, w), got shape ",
                  added.time_ids.sizes());
    }
  }
};

/// Holder of `UNet2DConditionModelImpl`: `TORCH_MODULE`'s expansion, with a call operator per
/// `forward` overload (the generic one deduces `forward`'s return type, which an overloaded
/// `forward` does not have).
class UNet2DConditionModel : public torch::nn::ModuleHolder<UNet2DConditionModelImpl> {
 public:
  using torch::nn::ModuleHolder<UNet2DConditionModelImpl>::ModuleHolder;
  /// The Impl type.
  using Impl = UNet2DConditionModelImpl;

  /// `forward(sample, timestep, encoder_hidden_states, residuals)`.
  torch::Tensor operator()(const torch::Tensor& sample, const torch::Tensor& timestep,
                           const torch::Tensor& encoder_hidden_states,
                           const UNetResiduals& residuals = {}) {
    return get()->forward(sample, timestep, encoder_hidden_states, residuals);
  }

  /// `forward(sample, timestep, encoder_hidden_states, added, residuals)` (SDXL).
  torch::Tensor operator()(const torch::Tensor& sample, const torch::Tensor& timestep,
                           const torch::Tensor& encoder_hidden_states,
                           const UNetAddedConditions& added, const UNetResiduals& residuals = {}) {
    return get()->forward(sample, timestep, encoder_hidden_states, added, residuals);
  }
};

/// Short name of the `UNet2DConditionModel` holder.
using UNet = UNet2DConditionModel;

}  // namespace sd
