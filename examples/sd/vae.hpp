#pragma once
/// @file vae.hpp
/// @brief Stable Diffusion's autoencoder: diffusers' `AutoencoderKL` (encoder to a diagonal
/// Gaussian over latents, decoder back to images), configuration-driven, with diffusers'
/// state-dict keys and shapes.
///
/// Reference: diffusers `models/autoencoders/autoencoder_kl.py`, `models/autoencoders/vae.py`
/// (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`), `models/unets/unet_2d_blocks.py`
/// (`DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`). GroupNorm eps is 1e-6
/// throughout. No scaling factor is applied here: pipelines multiply latents by
/// `config.scaling_factor` after `encode` and divide before `decode`.
///
/// Example:
/// @code
/// sd::VAE vae(sd::VAEConfig::sd15());
/// auto posterior = vae->encode(images);                       // images in [-1, 1]
/// auto latents = vae->sample(posterior.mean, posterior.logvar) * vae->config.scaling_factor;
/// auto decoded = vae->decode(latents / vae->config.scaling_factor);
/// @endcode

#include <sd/config.hpp>
#include <sd/layers.hpp>

#include <torch/torch.h>

#include <ostream>
#include <utility>
#include <vector>

namespace sd {

/// eps of every GroupNorm in the VAE (diffusers hard-codes it).
constexpr double kVAENormEps = 1e-6;

// ---- blocks ------------------------------------------------------------------------------------

/// Options of the VAE's `DownEncoderBlock2D` / `UpDecoderBlock2D`.
struct VAEBlockOptions {
  /// Example: `VAEBlockOptions(128, 256).num_layers(2).groups(32)`.
  VAEBlockOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  /// Input channels.
  TORCH_ARG(int64_t, in_channels);
  /// Output channels.
  TORCH_ARG(int64_t, out_channels);
  /// Resnets.
  TORCH_ARG(int64_t, num_layers) = 2;
  /// GroupNorm groups.
  TORCH_ARG(int64_t, groups) = 32;
  /// Ends with a resampler (down: stride-2 conv with (0, 1, 0, 1) padding; up: nearest ×2).
  TORCH_ARG(bool, add_sampler) = true;
};

namespace detail {

/// The resnets of a VAE block: in_channels -> out_channels, then out -> out.
inline torch::nn::ModuleList vae_resnets(const VAEBlockOptions& o) {
  torch::nn::ModuleList resnets;
  for (int64_t i = 0; i < o.num_layers(); ++i) {
    resnets->push_back(ResnetBlock2D(
        ResnetBlock2DOptions(i == 0 ? o.in_channels() : o.out_channels(), o.out_channels())
            .groups(o.groups())
            .eps(kVAENormEps)));
  }
  return resnets;
}

}  // namespace detail

/// diffusers' `DownEncoderBlock2D`: resnets, then a stride-2 downsampler.
class DownEncoderBlock2DImpl : public detail::BoundCloneable<DownEncoderBlock2DImpl> {
 public:
  /// Builds the block.
  explicit DownEncoderBlock2DImpl(VAEBlockOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers resnets and downsamplers.
  void reset() override {
    const auto& o = options;
    resnets = register_module("resnets", detail::vae_resnets(o));
    if (o.add_sampler()) {
      downsamplers = register_module("downsamplers", torch::nn::ModuleList());
      downsamplers->push_back(Downsample2D(Downsample2DOptions(o.out_channels()).padding(0)));
    }
    bind();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    resnet_blocks = detail::typed_items<ResnetBlock2D>(resnets);
    downsampler = downsamplers.is_empty() ? Downsample2D(nullptr)
                                          : detail::typed_items<Downsample2D>(downsamplers).at(0);
  }

  /// [B, C_in, H, W] -> [B, C_out, H/2, W/2] (or [B, C_out, H, W] without downsampler).
  torch::Tensor forward(torch::Tensor h) {
    for (auto& resnet : resnet_blocks) h = resnet(h);
    return downsampler.is_empty() ? h : downsampler(h);
  }

  /// The options it was built with.
  VAEBlockOptions options;
  /// The resnets.
  torch::nn::ModuleList resnets{nullptr};
  /// The downsampler (all but the last block).
  torch::nn::ModuleList downsamplers{nullptr};
  /// Typed holders of `resnets`.
  std::vector<ResnetBlock2D> resnet_blocks;
  /// Typed holder of `downsamplers.0` (empty without).
  Downsample2D downsampler{nullptr};
};

/// Holder of `DownEncoderBlock2DImpl`.
TORCH_MODULE(DownEncoderBlock2D);

/// diffusers' `UpDecoderBlock2D`: resnets, then a nearest ×2 upsampler.
class UpDecoderBlock2DImpl : public detail::BoundCloneable<UpDecoderBlock2DImpl> {
 public:
  /// Builds the block.
  explicit UpDecoderBlock2DImpl(VAEBlockOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers resnets and upsamplers.
  void reset() override {
    const auto& o = options;
    resnets = register_module("resnets", detail::vae_resnets(o));
    if (o.add_sampler()) {
      upsamplers = register_module("upsamplers", torch::nn::ModuleList());
      upsamplers->push_back(Upsample2D(Upsample2DOptions(o.out_channels())));
    }
    bind();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    resnet_blocks = detail::typed_items<ResnetBlock2D>(resnets);
    upsampler = upsamplers.is_empty() ? Upsample2D(nullptr)
                                      : detail::typed_items<Upsample2D>(upsamplers).at(0);
  }

  /// [B, C_in, H, W] -> [B, C_out, 2H, 2W] (or [B, C_out, H, W] without upsampler).
  torch::Tensor forward(torch::Tensor h) {
    for (auto& resnet : resnet_blocks) h = resnet(h);
    return upsampler.is_empty() ? h : upsampler(h);
  }

  /// The options it was built with.
  VAEBlockOptions options;
  /// The resnets.
  torch::nn::ModuleList resnets{nullptr};
  /// The upsampler (all but the last block).
  torch::nn::ModuleList upsamplers{nullptr};
  /// Typed holders of `resnets`.
  std::vector<ResnetBlock2D> resnet_blocks;
  /// Typed holder of `upsamplers.0` (empty without).
  Upsample2D upsampler{nullptr};
};

/// Holder of `UpDecoderBlock2DImpl`.
TORCH_MODULE(UpDecoderBlock2D);

/// Options of the VAE's `UNetMidBlock2D`.
struct UNetMidBlock2DOptions {
  /// Example: `UNetMidBlock2DOptions(512).groups(32)`.
  explicit UNetMidBlock2DOptions(int64_t channels) : channels_(channels) {}
  /// Channels in and out.
  TORCH_ARG(int64_t, channels);
  /// GroupNorm groups.
  TORCH_ARG(int64_t, groups) = 32;
  /// Single-head self-attention between the two resnets.
  TORCH_ARG(bool, add_attention) = true;
};

/// diffusers' `UNetMidBlock2D` (no time embedding): resnet, [attention,] resnet.
class UNetMidBlock2DImpl : public detail::BoundCloneable<UNetMidBlock2DImpl> {
 public:
  /// Builds the block.
  explicit UNetMidBlock2DImpl(UNetMidBlock2DOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers attentions (if any) and resnets.
  void reset() override {
    const int64_t c = options.channels();
    if (options.add_attention()) {
      attentions = register_module("attentions", torch::nn::ModuleList());
      attentions->push_back(Attention(AttentionOptions(c, 1, c)
                                          .bias(true)
                                          .norm_num_groups(options.groups())
                                          .eps(kVAENormEps)
                                          .residual_connection(true)));
    }
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int i = 0; i < 2; ++i) {
      resnets->push_back(
          ResnetBlock2D(ResnetBlock2DOptions(c, c).groups(options.groups()).eps(kVAENormEps)));
    }
    bind();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    resnet_blocks = detail::typed_items<ResnetBlock2D>(resnets);
    attention = attentions.is_empty() ? Attention(nullptr)
                                      : detail::typed_items<Attention>(attentions).at(0);
  }

  /// [B, C, H, W] -> [B, C, H, W].
  torch::Tensor forward(torch::Tensor h) {
    h = resnet_blocks[0](h);
    if (!attention.is_empty()) h = attention(h);  // [B, C, H, W], attention over H·W
    return resnet_blocks[1](h);
  }

  /// The options it was built with.
  UNetMidBlock2DOptions options;
  /// The attention (absent when add_attention is false).
  torch::nn::ModuleList attentions{nullptr};
  /// The two resnets.
  torch::nn::ModuleList resnets{nullptr};
  /// Typed holders of `resnets`.
  std::vector<ResnetBlock2D> resnet_blocks;
  /// Typed holder of `attentions.0` (empty without).
  Attention attention{nullptr};
};

/// Holder of `UNetMidBlock2DImpl`.
TORCH_MODULE(UNetMidBlock2D);

// ---- Encoder / Decoder -------------------------------------------------------------------------

/// diffusers' VAE `Encoder`: image [B, in, H, W] -> moments [B, 2·latent, H/f, W/f].
class VAEEncoderImpl : public detail::BoundCloneable<VAEEncoderImpl> {
 public:
  /// Builds the encoder from the VAE's configuration.
  explicit VAEEncoderImpl(VAEConfig config) : config(std::move(config)) { reset(); }

  /// Registers conv_in, down_blocks, mid_block, conv_norm_out, conv_out.
  void reset() override {
    const auto& c = config;
    const auto& ch = c.block_out_channels;
    const size_t n = ch.size();
    conv_in = register_module(
        "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, ch[0], 3).padding(1)));
    down_blocks = register_module("down_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < n; ++i) {
      down_blocks->push_back(DownEncoderBlock2D(VAEBlockOptions(i == 0 ? ch[0] : ch[i - 1], ch[i])
                                                    .num_layers(c.layers_per_block)
                                                    .groups(c.norm_num_groups)
                                                    .add_sampler(i + 1 < n)));
    }
    mid_block = register_module(
        "mid_block", UNetMidBlock2D(UNetMidBlock2DOptions(ch[n - 1])
                                        .groups(c.norm_num_groups)
                                        .add_attention(c.mid_block_add_attention)));
    conv_norm_out = register_module(
        "conv_norm_out", torch::nn::GroupNorm(
                             torch::nn::GroupNormOptions(c.norm_num_groups, ch[n - 1]).eps(kVAENormEps)));
    conv_out = register_module(
        "conv_out",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(ch[n - 1], 2 * c.latent_channels, 3).padding(1)));
    bind();
  }

  /// Re-reads the typed holders of `down_blocks` (see `detail::BoundCloneable`).
  void bind() { downs = detail::typed_items<DownEncoderBlock2D>(down_blocks); }

  /// [B, in, H, W] -> [B, 2·latent, H/f, W/f] (mean and logvar, before quant_conv).
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = conv_in(x);
    for (auto& block : downs) h = block(h);
    h = mid_block(h);
    return conv_out(torch::silu(conv_norm_out(h)));
  }

  /// The VAE configuration.
  VAEConfig config;
  /// Input conv.
  torch::nn::Conv2d conv_in{nullptr};
  /// Encoder levels.
  torch::nn::ModuleList down_blocks{nullptr};
  /// Middle block.
  UNetMidBlock2D mid_block{nullptr};
  /// Output GroupNorm.
  torch::nn::GroupNorm conv_norm_out{nullptr};
  /// Output conv (to 2·latent channels).
  torch::nn::Conv2d conv_out{nullptr};
  /// Typed holders of `down_blocks`.
  std::vector<DownEncoderBlock2D> downs;
};

/// Holder of `VAEEncoderImpl`.
TORCH_MODULE(VAEEncoder);

/// diffusers' VAE `Decoder`: latent [B, latent, h, w] -> image [B, out, h·f, w·f].
class VAEDecoderImpl : public detail::BoundCloneable<VAEDecoderImpl> {
 public:
  /// Builds the decoder from the VAE's configuration.
  explicit VAEDecoderImpl(VAEConfig config) : config(std::move(config)) { reset(); }

  /// Registers conv_in, up_blocks, mid_block, conv_norm_out, conv_out (diffusers' order).
  void reset() override {
    const auto& c = config;
    const auto& ch = c.block_out_channels;
    const size_t n = ch.size();
    conv_in = register_module(
        "conv_in",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(c.latent_channels, ch[n - 1], 3).padding(1)));
    up_blocks = register_module("up_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < n; ++i) {
      const size_t level = n - 1 - i;
      up_blocks->push_back(UpDecoderBlock2D(VAEBlockOptions(ch[i == 0 ? n - 1 : level + 1], ch[level])
                                                .num_layers(c.layers_per_block + 1)
                                                .groups(c.norm_num_groups)
                                                .add_sampler(i + 1 < n)));
    }
    mid_block = register_module(
        "mid_block", UNetMidBlock2D(UNetMidBlock2DOptions(ch[n - 1])
                                        .groups(c.norm_num_groups)
                                        .add_attention(c.mid_block_add_attention)));
    conv_norm_out = register_module(
        "conv_norm_out",
        torch::nn::GroupNorm(torch::nn::GroupNormOptions(c.norm_num_groups, ch[0]).eps(kVAENormEps)));
    conv_out = register_module(
        "conv_out",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(ch[0], c.out_channels, 3).padding(1)));
    bind();
  }

  /// Re-reads the typed holders of `up_blocks` (see `detail::BoundCloneable`).
  void bind() { ups = detail::typed_items<UpDecoderBlock2D>(up_blocks); }

  /// [B, latent, h, w] -> [B, out, h·f, w·f].
  torch::Tensor forward(const torch::Tensor& z) {
    auto h = mid_block(conv_in(z));
    for (auto& block : ups) h = block(h);
    return conv_out(torch::silu(conv_norm_out(h)));
  }

  /// The VAE configuration.
  VAEConfig config;
  /// Input conv.
  torch::nn::Conv2d conv_in{nullptr};
  /// Decoder levels (deepest first).
  torch::nn::ModuleList up_blocks{nullptr};
  /// Middle block.
  UNetMidBlock2D mid_block{nullptr};
  /// Output GroupNorm.
  torch::nn::GroupNorm conv_norm_out{nullptr};
  /// Output conv.
  torch::nn::Conv2d conv_out{nullptr};
  /// Typed holders of `up_blocks`.
  std::vector<UpDecoderBlock2D> ups;
};

/// Holder of `VAEDecoderImpl`.
TORCH_MODULE(VAEDecoder);

// ---- AutoencoderKL -----------------------------------------------------------------------------

/// The encoder's posterior, a diagonal Gaussian (diffusers' `DiagonalGaussianDistribution`).
struct LatentDistribution {
  /// Mean [B, latent, h, w] (also the mode).
  torch::Tensor mean;
  /// Log-variance [B, latent, h, w], clamped to [-30, 20].
  torch::Tensor logvar;
};

/// diffusers' `AutoencoderKL`: `encode` (image -> posterior over latents) and `decode`.
class AutoencoderKLImpl : public torch::nn::Cloneable<AutoencoderKLImpl> {
 public:
  /// Builds the VAE (random init) from `config`.
  explicit AutoencoderKLImpl(VAEConfig config) : config(std::move(config)) { reset(); }

  /// Registers encoder, decoder, quant_conv, post_quant_conv (diffusers' order).
  void reset() override {
    config.validate();
    const int64_t latent = config.latent_channels;
    encoder = register_module("encoder", VAEEncoder(config));
    decoder = register_module("decoder", VAEDecoder(config));
    if (config.use_quant_conv) {
      quant_conv = register_module(
          "quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * latent, 2 * latent, 1)));
    }
    if (config.use_post_quant_conv) {
      post_quant_conv = register_module(
          "post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(latent, latent, 1)));
    }
  }

  /// Encodes images [B, in_channels, H, W] (values in [-1, 1]) to the latent posterior,
  /// mean and logvar [B, latent_channels, H/f, W/f] with f = 2^(levels-1) (8 for SD).
  LatentDistribution encode(const torch::Tensor& images) {
    TORCH_CHECK(images.dim() == 4 && images.size(1) == config.in_channels,
                "AutoencoderKL::encode: expected images [B, ", config.in_channels,
                ", H, W], got shape ", images.sizes());
    auto moments = encoder(images);
    if (!quant_conv.is_empty()) moments = quant_conv(moments);
    auto parts = moments.chunk(2, 1);  // [B, 2·latent, h, w] -> 2 × [B, latent, h, w]
    return {parts[0], parts[1].clamp(-30.0, 20.0)};
  }

  /// A draw from the posterior with the given standard-normal `noise` (same shape as `mean`):
  /// `mean + exp(logvar / 2) · noise`.
  static torch::Tensor sample(const torch::Tensor& mean, const torch::Tensor& logvar,
                              const torch::Tensor& noise) {
    TORCH_CHECK(noise.sizes() == mean.sizes() && logvar.sizes() == mean.sizes(),
                "AutoencoderKL::sample: mean ", mean.sizes(), ", logvar ", logvar.sizes(),
                " and noise ", noise.sizes(), " must have the same shape");
    return mean + torch::exp(0.5 * logvar) * noise;
  }

  /// A draw from the posterior with noise from `generator` (the default generator if none).
  static torch::Tensor sample(const torch::Tensor& mean, const torch::Tensor& logvar,
                              torch::optional<torch::Generator> generator = torch::nullopt) {
    return sample(mean, logvar, torch::randn(mean.sizes(), generator, mean.options()));
  }

  /// Decodes latents [B, latent_channels, h, w] (unscaled) to images [B, out_channels, h·f, w·f].
  torch::Tensor decode(const torch::Tensor& latents) {
    TORCH_CHECK(latents.dim() == 4 && latents.size(1) == config.latent_channels,
                "AutoencoderKL::decode: expected latents [B, ", config.latent_channels,
                ", h, w], got shape ", latents.sizes());
    return decoder(post_quant_conv.is_empty() ? latents : post_quant_conv(latents));
  }

  /// Reconstruction through the posterior mean: `decode(encode(images).mean)`.
  torch::Tensor forward(const torch::Tensor& images) { return decode(encode(images).mean); }

  /// Prints `sd::AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::AutoencoderKL(block_out_channels=" << torch::IntArrayRef(config.block_out_channels)
           << ", latent_channels=" << config.latent_channels << ")";
  }

  /// The configuration it was built with.
  VAEConfig config;
  /// Image -> moments.
  VAEEncoder encoder{nullptr};
  /// Latent -> image.
  VAEDecoder decoder{nullptr};
  /// 1×1 conv on the moments (absent when use_quant_conv is false).
  torch::nn::Conv2d quant_conv{nullptr};
  /// 1×1 conv on the latent (absent when use_post_quant_conv is false).
  torch::nn::Conv2d post_quant_conv{nullptr};
};

/// Holder of `AutoencoderKLImpl`.
TORCH_MODULE(AutoencoderKL);

/// Short name of the `AutoencoderKL` holder.
using VAE = AutoencoderKL;

}  // namespace sd
