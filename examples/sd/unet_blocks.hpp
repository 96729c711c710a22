#pragma once
/// @file unet_blocks.hpp
/// @brief The UNet's down, mid and up blocks in diffusers' layout: `DownBlock2D` (diffusers'
/// `CrossAttnDownBlock2D` when it has attention heads, `DownBlock2D` otherwise),
/// `UNetMidBlock2DCrossAttn` and `UpBlock2D` (`CrossAttnUpBlock2D` / `UpBlock2D`).
///
/// Reference: diffusers `models/unets/unet_2d_blocks.py`. The up blocks are where the skip
/// connections come back: each pops its skip, passes it through its `scedit::SkipSite`, and
/// concatenates it.

#include <sd/layers.hpp>
#include <sd/transformer.hpp>

#include <scedit/checkpoint.hpp>
#include <scedit/sites.hpp>

#include <torch/torch.h>

#include <ostream>
#include <utility>
#include <vector>

namespace sd {

/// The attention settings of a UNet block (`heads == 0`: a block without attention).
struct UNetAttentionOptions {
  /// Attention heads per transformer; 0 = no attention (DownBlock2D / UpBlock2D).
  TORCH_ARG(int64_t, heads) = 0;
  /// Channels of the context (text embeddings).
  TORCH_ARG(int64_t, cross_attention_dim) = 768;
  /// Transformer blocks per Transformer2DModel.
  TORCH_ARG(int64_t, transformer_layers) = 1;
  /// proj_in / proj_out as Linear (SD 2.x).
  TORCH_ARG(bool, use_linear_projection) = false;
  /// attn1 attends to the context too.
  TORCH_ARG(bool, only_cross_attention) = false;
};

namespace detail {

/// A `Transformer2DModel` of `channels` channels with the block's attention settings.
inline Transformer2DModel make_transformer(int64_t channels, int64_t groups,
                                           const UNetAttentionOptions& a) {
  return Transformer2DModel(Transformer2DModelOptions(channels, a.heads(), a.cross_attention_dim())
                                .num_layers(a.transformer_layers())
                                .norm_num_groups(groups)
                                .use_linear_projection(a.use_linear_projection())
                                .only_cross_attention(a.only_cross_attention()));
}

}  // namespace detail

// ---- DownBlock2D -------------------------------------------------------------------------------

/// Options of a UNet `DownBlock2D`.
struct DownBlock2DOptions {
  /// Example: `DownBlock2DOptions(320, 320, 1280).attention(UNetAttentionOptions().heads(8))`.
  DownBlock2DOptions(int64_t in_channels, int64_t out_channels, int64_t temb_channels)
      : in_channels_(in_channels), out_channels_(out_channels), temb_channels_(temb_channels) {}
  /// Input channels.
  TORCH_ARG(int64_t, in_channels);
  /// Output channels.
  TORCH_ARG(int64_t, out_channels);
  /// Width of the time embedding.
  TORCH_ARG(int64_t, temb_channels);
  /// Resnets (each followed by a transformer when the block has attention).
  TORCH_ARG(int64_t, num_layers) = 2;
  /// GroupNorm groups.
  TORCH_ARG(int64_t, groups) = 32;
  /// GroupNorm eps of the resnets.
  TORCH_ARG(double, eps) = 1e-5;
  /// Output scale of the resnets.
  TORCH_ARG(double, output_scale_factor) = 1.0;
  /// Ends with a stride-2 downsampler (all but the last block).
  TORCH_ARG(bool, add_downsample) = true;
  /// Padding of the downsampler's conv.
  TORCH_ARG(int64_t, downsample_padding) = 1;
  /// Cross-attention settings (heads 0: none).
  TORCH_ARG(UNetAttentionOptions, attention) = {};
};

/// A UNet encoder level: `num_layers` × (resnet [+ transformer]) [+ downsampler]; every output
/// is a skip feature for the decoder.
class DownBlock2DImpl : public detail::BoundCloneable<DownBlock2DImpl> {
 public:
  /// Builds the block.
  explicit DownBlock2DImpl(DownBlock2DOptions options) : options(std::move(options)) { reset(); }

  /// Registers attentions (if any), resnets and downsamplers, as diffusers orders them.
  void reset() override {
    const auto& o = options;
    if (o.attention().heads() > 0) {
      attentions = register_module("attentions", torch::nn::ModuleList());
    }
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < o.num_layers(); ++i) {
      resnets->push_back(ResnetBlock2D(
          ResnetBlock2DOptions(i == 0 ? o.in_channels() : o.out_channels(), o.out_channels())
              .temb_channels(o.temb_channels())
              .groups(o.groups())
              .eps(o.eps())
              .output_scale_factor(o.output_scale_factor())));
      if (!attentions.is_empty()) {
        attentions->push_back(detail::make_transformer(o.out_channels(), o.groups(), o.attention()));
      }
    }
    if (o.add_downsample()) {
      downsamplers = register_module("downsamplers", torch::nn::ModuleList());
      downsamplers->push_back(Downsample2D(
          Downsample2DOptions(o.out_channels()).padding(o.downsample_padding())));
    }
    bind();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    resnet_blocks = detail::typed_items<ResnetBlock2D>(resnets);
    transformers = attentions.is_empty()
                       ? std::vector<Transformer2DModel>{}
                       : detail::typed_items<Transformer2DModel>(attentions);
    downsampler = downsamplers.is_empty() ? Downsample2D(nullptr)
                                          : detail::typed_items<Downsample2D>(downsamplers).at(0);
  }

  /// h [B, C_in, H, W] -> [B, C_out, H/2, W/2] (or [B, C_out, H, W] without downsampler);
  /// appends each resnet/transformer output and the downsampler output to `skips`.
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& temb, const torch::Tensor& context,
                        std::vector<torch::Tensor>& skips) {
    for (size_t i = 0; i < resnet_blocks.size(); ++i) {
      h = resnet_blocks[i](h, temb);
      if (!transformers.empty()) h = transformers[i](h, context);
      skips.push_back(h);
    }
    if (!downsampler.is_empty()) {
      h = downsampler(h);
      skips.push_back(h);
    }
    return h;
  }

  /// Channels of the skips this block produces, in order.
  std::vector<int64_t> skip_channels() const {
    std::vector<int64_t> channels(options.num_layers() + (options.add_downsample() ? 1 : 0),
                                  options.out_channels());
    return channels;
  }

  /// Prints `sd::DownBlock2D(in_channels=320, out_channels=640, heads=8, add_downsample=true)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::DownBlock2D(in_channels=" << options.in_channels()
           << ", out_channels=" << options.out_channels();
    if (options.attention().heads() > 0) stream << ", heads=" << options.attention().heads();
    stream << ", add_downsample=" << (options.add_downsample() ? "true" : "false") << ")";
  }

  /// The options it was built with.
  DownBlock2DOptions options;
  /// Transformers after each resnet (CrossAttnDownBlock2D only).
  torch::nn::ModuleList attentions{nullptr};
  /// The resnets.
  torch::nn::ModuleList resnets{nullptr};
  /// The downsampler (all but the last block).
  torch::nn::ModuleList downsamplers{nullptr};
  /// Typed holders of `resnets`.
  std::vector<ResnetBlock2D> resnet_blocks;
  /// Typed holders of `attentions` (empty without attention).
  std::vector<Transformer2DModel> transformers;
  /// Typed holder of `downsamplers.0` (empty without).
  Downsample2D downsampler{nullptr};
};

/// Holder of `DownBlock2DImpl`.
TORCH_MODULE(DownBlock2D);

// ---- UNetMidBlock2DCrossAttn -------------------------------------------------------------------

/// Options of a `UNetMidBlock2DCrossAttn`.
struct UNetMidBlock2DCrossAttnOptions {
  /// Example: `UNetMidBlock2DCrossAttnOptions(1280, 1280).attention(UNetAttentionOptions().heads(8))`.
  UNetMidBlock2DCrossAttnOptions(int64_t channels, int64_t temb_channels)
      : channels_(channels), temb_channels_(temb_channels) {}
  /// Channels in and out.
  TORCH_ARG(int64_t, channels);
  /// Width of the time embedding.
  TORCH_ARG(int64_t, temb_channels);
  /// GroupNorm groups.
  TORCH_ARG(int64_t, groups) = 32;
  /// GroupNorm eps of the resnets.
  TORCH_ARG(double, eps) = 1e-5;
  /// Output scale of the resnets (mid_block_scale_factor).
  TORCH_ARG(double, output_scale_factor) = 1.0;
  /// Cross-attention settings (heads must be positive).
  TORCH_ARG(UNetAttentionOptions, attention) = {};
};

/// The UNet's middle: resnet, then (transformer, resnet).
class UNetMidBlock2DCrossAttnImpl : public detail::BoundCloneable<UNetMidBlock2DCrossAttnImpl> {
 public:
  /// Builds the block.
  explicit UNetMidBlock2DCrossAttnImpl(UNetMidBlock2DCrossAttnOptions options)
      : options(std::move(options)) {
    reset();
  }

  /// Registers attentions and resnets.
  void reset() override {
    const auto& o = options;
    TORCH_CHECK(o.attention().heads() > 0, "UNetMidBlock2DCrossAttn: heads must be positive");
    attentions = register_module("attentions", torch::nn::ModuleList());
    attentions->push_back(detail::make_transformer(o.channels(), o.groups(), o.attention()));
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int i = 0; i < 2; ++i) {
      resnets->push_back(ResnetBlock2D(ResnetBlock2DOptions(o.channels(), o.channels())
                                           .temb_channels(o.temb_channels())
                                           .groups(o.groups())
                                           .eps(o.eps())
                                           .output_scale_factor(o.output_scale_factor())));
    }
    bind();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    resnet_blocks = detail::typed_items<ResnetBlock2D>(resnets);
    transformers = detail::typed_items<Transformer2DModel>(attentions);
  }

  /// [B, C, H, W] -> [B, C, H, W].
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& temb, const torch::Tensor& context) {
    h = resnet_blocks[0](h, temb);
    for (size_t i = 0; i < transformers.size(); ++i) {
      h = transformers[i](h, context);
      h = resnet_blocks[i + 1](h, temb);
    }
    return h;
  }

  /// Prints `sd::UNetMidBlock2DCrossAttn(channels=1280, heads=8)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::UNetMidBlock2DCrossAttn(channels=" << options.channels()
           << ", heads=" << options.attention().heads() << ")";
  }

  /// The options it was built with.
  UNetMidBlock2DCrossAttnOptions options;
  /// The transformer.
  torch::nn::ModuleList attentions{nullptr};
  /// The two resnets.
  torch::nn::ModuleList resnets{nullptr};
  /// Typed holders of `resnets`.
  std::vector<ResnetBlock2D> resnet_blocks;
  /// Typed holders of `attentions`.
  std::vector<Transformer2DModel> transformers;
};

/// Holder of `UNetMidBlock2DCrossAttnImpl`.
TORCH_MODULE(UNetMidBlock2DCrossAttn);

// ---- UpBlock2D ---------------------------------------------------------------------------------

/// Options of a UNet `UpBlock2D`.
struct UpBlock2DOptions {
  /// Example: `UpBlock2DOptions(640, 1280, 1280, 1280)` (diffusers' argument names: the last
  /// skip has `in_channels`, the input from the block below `prev_output_channels`).
  UpBlock2DOptions(int64_t in_channels, int64_t prev_output_channels, int64_t out_channels,
                   int64_t temb_channels)
      : in_channels_(in_channels),
        prev_output_channels_(prev_output_channels),
        out_channels_(out_channels),
        temb_channels_(temb_channels) {}
  /// Channels of the block's last (shallowest) skip.
  TORCH_ARG(int64_t, in_channels);
  /// Channels of the input coming from the block below.
  TORCH_ARG(int64_t, prev_output_channels);
  /// Output channels (and those of the block's other skips).
  TORCH_ARG(int64_t, out_channels);
  /// Width of the time embedding.
  TORCH_ARG(int64_t, temb_channels);
  /// Resnets (= skips consumed); layers_per_block + 1 in the UNet.
  TORCH_ARG(int64_t, num_layers) = 3;
  /// GroupNorm groups.
  TORCH_ARG(int64_t, groups) = 32;
  /// GroupNorm eps of the resnets.
  TORCH_ARG(double, eps) = 1e-5;
  /// Output scale of the resnets.
  TORCH_ARG(double, output_scale_factor) = 1.0;
  /// Ends with a nearest ×2 upsampler (all but the last block).
  TORCH_ARG(bool, add_upsample) = true;
  /// Cross-attention settings (heads 0: none).
  TORCH_ARG(UNetAttentionOptions, attention) = {};
};

/// A UNet decoder level: `num_layers` × (pop a skip, pass it through its site, concatenate,
/// resnet [+ transformer]) [+ upsampler].
class UpBlock2DImpl : public detail::BoundCloneable<UpBlock2DImpl> {
 public:
  /// Builds the block.
  explicit UpBlock2DImpl(UpBlock2DOptions options) : options(std::move(options)) { reset(); }

  /// Registers attentions (if any), resnets and upsamplers, as diffusers orders them.
  void reset() override {
    const auto& o = options;
    if (o.attention().heads() > 0) {
      attentions = register_module("attentions", torch::nn::ModuleList());
    }
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < o.num_layers(); ++i) {
      const int64_t input = i == 0 ? o.prev_output_channels() : o.out_channels();
      resnets->push_back(ResnetBlock2D(ResnetBlock2DOptions(input + skip_channels(i), o.out_channels())
                                           .temb_channels(o.temb_channels())
                                           .groups(o.groups())
                                           .eps(o.eps())
                                           .output_scale_factor(o.output_scale_factor())));
      if (!attentions.is_empty()) {
        attentions->push_back(detail::make_transformer(o.out_channels(), o.groups(), o.attention()));
      }
    }
    if (o.add_upsample()) {
      upsamplers = register_module("upsamplers", torch::nn::ModuleList());
      upsamplers->push_back(Upsample2D(Upsample2DOptions(o.out_channels())));
    }
    bind();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    resnet_blocks = detail::typed_items<ResnetBlock2D>(resnets);
    transformers = attentions.is_empty()
                       ? std::vector<Transformer2DModel>{}
                       : detail::typed_items<Transformer2DModel>(attentions);
    upsampler = upsamplers.is_empty() ? Upsample2D(nullptr)
                                      : detail::typed_items<Upsample2D>(upsamplers).at(0);
  }

  /// Channels of the skip that resnet `layer` concatenates (diffusers' `res_skip_channels`).
  int64_t skip_channels(int64_t layer) const {
    return layer == options.num_layers() - 1 ? options.in_channels() : options.out_channels();
  }

  /// h [B, C_prev, H, W] -> [B, C_out, 2H, 2W] (or [B, C_out, H, W] without upsampler).
  /// Consumes `num_layers` skips from the back of `skips`, passing skip k through
  /// `sites[next_site]` (then advancing `next_site`). The upsampler targets the spatial size of
  /// the next skip still on the stack, so odd sizes line up as in diffusers.
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& temb, const torch::Tensor& context,
                        std::vector<torch::Tensor>& skips, std::vector<scedit::SkipSite>& sites,
                        size_t& next_site) {
    TORCH_CHECK(skips.size() >= resnet_blocks.size() &&
                    next_site + resnet_blocks.size() <= sites.size(),
                "UpBlock2D: ", skips.size(), " skips and ", sites.size() - next_site,
                " sites left for ", resnet_blocks.size(), " resnets");
    for (size_t i = 0; i < resnet_blocks.size(); ++i) {
      // The skip path: pop the deepest remaining skip, let its site edit it, concatenate.
      torch::Tensor skip = std::move(skips.back());
      skips.pop_back();
      skip = sites[next_site++](skip);
      h = torch::cat({h, skip}, 1);  // [B, C_h, H, W] + [B, C_s, H, W] -> [B, C_h + C_s, H, W]
      if (gradient_checkpointing) {
        // Keep only this layer's inputs; its activations are recomputed in the backward pass.
        auto resnet = resnet_blocks[i];
        auto transformer = transformers.empty() ? Transformer2DModel(nullptr) : transformers[i];
        h = scedit::checkpoint(
            [resnet, transformer](const std::vector<torch::Tensor>& in) mutable {
              auto x = resnet(in[0], in[1]);
              return transformer.is_empty() ? x : transformer(x, in[2]);
            },
            transformers.empty() ? std::vector<torch::Tensor>{h, temb}
                                 : std::vector<torch::Tensor>{h, temb, context});
      } else {
        h = resnet_blocks[i](h, temb);
        if (!transformers.empty()) h = transformers[i](h, context);
      }
    }
    if (!upsampler.is_empty()) {
      h = skips.empty() ? upsampler(h) : upsampler(h, skips.back().sizes().slice(2));
    }
    return h;
  }

  /// Prints `sd::UpBlock2D(in_channels=640, prev_output_channels=1280, out_channels=1280,
  /// heads=8, add_upsample=true)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::UpBlock2D(in_channels=" << options.in_channels()
           << ", prev_output_channels=" << options.prev_output_channels()
           << ", out_channels=" << options.out_channels();
    if (options.attention().heads() > 0) stream << ", heads=" << options.attention().heads();
    stream << ", add_upsample=" << (options.add_upsample() ? "true" : "false") << ")";
  }

  /// The options it was built with.
  UpBlock2DOptions options;
  /// Transformers after each resnet (CrossAttnUpBlock2D only).
  torch::nn::ModuleList attentions{nullptr};
  /// The resnets.
  torch::nn::ModuleList resnets{nullptr};
  /// The upsampler (all but the last block).
  torch::nn::ModuleList upsamplers{nullptr};
  /// Typed holders of `resnets`.
  std::vector<ResnetBlock2D> resnet_blocks;
  /// Typed holders of `attentions` (empty without attention).
  std::vector<Transformer2DModel> transformers;
  /// Typed holder of `upsamplers.0` (empty without).
  Upsample2D upsampler{nullptr};
  /// Recompute each resnet + transformer in the backward pass instead of keeping activations.
  bool gradient_checkpointing = false;
};

/// Holder of `UpBlock2DImpl`.
TORCH_MODULE(UpBlock2D);

}  // namespace sd
