#pragma once
/// @file unet.hpp
/// @brief Stable Diffusion 1.x / 2.x denoising UNet: diffusers' `UNet2DConditionModel`,
/// configuration-driven, with diffusers' state-dict keys and shapes, and its skip connections
/// marked as `scedit::SkipSite`s (scepter's `lsc_identity`) for SCEdit's tuners.
///
/// Reference: diffusers `models/unets/unet_2d_condition.py`, `models/embeddings.py`
/// (`get_timestep_embedding`, `TimestepEmbedding`).
///
/// Example:
/// @code
/// sd::UNet unet(sd::UNetConfig::sd15());
/// scedit::load_state_dict(*unet, scedit::safetensors::load("unet.safetensors"));
/// auto eps = unet(latents, t, text_embeddings);  // [B, 4, 64, 64], [B], [B, 77, 768]
/// @endcode

#include <sd/config.hpp>
#include <sd/layers.hpp>
#include <sd/lean_ops.hpp>
#include <sd/unet_blocks.hpp>

#include <scedit/sites.hpp>

#include <torch/torch.h>

#include <cmath>
#include <ostream>
#include <utility>
#include <vector>

namespace sd {

namespace functional {

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`: a float32 computation
/// whatever the model's dtype (the caller casts afterwards, as diffusers does; computing it in
/// float64 would not reproduce diffusers' float64 outputs).
///
/// The float32 values of exp, sin and cos are taken correctly rounded (evaluated in float64,
/// then rounded): the same on every platform and device. diffusers gets them from float32 libm
/// code (MKL, Sleef or CUDA, depending on the build), which agrees with these within one ulp.
/// timesteps [B] (any numeric dtype) -> [B, dim] float32.
inline torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim,
                                        bool flip_sin_to_cos, double downscale_freq_shift,
                                        double max_period = 10000.0) {
  const auto f32 = torch::kFloat32, f64 = torch::kFloat64;
  const int64_t half = dim / 2;
  auto exponent = torch::arange(half, timesteps.options().dtype(f32)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);  // float32, as diffusers
  auto freqs = exponent.to(f64).exp().to(f32);
  auto args = timesteps.to(f32).unsqueeze(1) * freqs.unsqueeze(0);  // [B] x [half] -> [B, half]
  auto sin = args.to(f64).sin().to(f32), cos = args.to(f64).cos().to(f32);
  auto emb = flip_sin_to_cos ? torch::cat({cos, sin}, -1) : torch::cat({sin, cos}, -1);  // [B, 2·half]
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1}, 0);
  return emb;
}

}  // namespace functional

/// Options of a `TimestepEmbedding`.
struct TimestepEmbeddingOptions {
  /// Example: `TimestepEmbeddingOptions(320, 1280)`.
  TimestepEmbeddingOptions(int64_t in_channels, int64_t time_embed_dim)
      : in_channels_(in_channels), time_embed_dim_(time_embed_dim) {}
  /// Width of the sinusoidal embedding.
  TORCH_ARG(int64_t, in_channels);
  /// Width of the time embedding.
  TORCH_ARG(int64_t, time_embed_dim);
};

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
class TimestepEmbeddingImpl : public torch::nn::Cloneable<TimestepEmbeddingImpl> {
 public:
  /// Builds the two linears.
  explicit TimestepEmbeddingImpl(TimestepEmbeddingOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers linear_1 and linear_2.
  void reset() override {
    linear_1 = register_module("linear_1",
                               torch::nn::Linear(options.in_channels(), options.time_embed_dim()));
    linear_2 = register_module(
        "linear_2", torch::nn::Linear(options.time_embed_dim(), options.time_embed_dim()));
  }

  /// [B, in_channels] -> [B, time_embed_dim].
  torch::Tensor forward(const torch::Tensor& x) { return linear_2(torch::silu(linear_1(x))); }

  /// The options it was built with.
  TimestepEmbeddingOptions options;
  /// First linear.
  torch::nn::Linear linear_1{nullptr};
  /// Second linear.
  torch::nn::Linear linear_2{nullptr};
};

/// Holder of `TimestepEmbeddingImpl`.
TORCH_MODULE(TimestepEmbedding);

/// diffusers' `UNet2DConditionModel` for SD 1.x / 2.x: predicts the noise (or v) of a latent.
///
/// The 12 skip connections of SD (conv_in, each resnet/transformer output and each downsampler of
/// the encoder) pass through `lsc_identity[i]`, one `scedit::SkipSite` per skip in decoder order
/// (i = 0 is the deepest skip, the last one the encoder produced). The sites are the identity
/// until tuners are attached, and have no parameters, so the state dict is diffusers'.
class UNet2DConditionModelImpl : public detail::BoundCloneable<UNet2DConditionModelImpl> {
 public:
  /// Builds the model (random init) from `config`; load weights with `scedit::load_state_dict`.
  explicit UNet2DConditionModelImpl(UNetConfig config) : config(std::move(config)) { reset(); }

  /// Registers conv_in, time_embedding, down_blocks, up_blocks, mid_block, conv_norm_out,
  /// conv_out (diffusers' order) and lsc_identity.
  void reset() override {
    const auto& c = config;
    c.validate();
    const size_t n = c.num_blocks();
    const auto& ch = c.block_out_channels;
    const int64_t temb = c.time_embed_dim();
    auto attention = [&](size_t block, bool has_attention) {
      return UNetAttentionOptions()
          .heads(has_attention ? c.heads(block) : 0)
          .cross_attention_dim(c.cross_attention_dim)
          .transformer_layers(c.transformer_layers(block))
          .use_linear_projection(c.use_linear_projection)
          .only_cross_attention(c.only_cross_attention);
    };

    conv_in = register_module(
        "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, ch[0], c.conv_in_kernel)
                                         .padding((c.conv_in_kernel - 1) / 2)));
    time_embedding =
        register_module("time_embedding", TimestepEmbedding(TimestepEmbeddingOptions(ch[0], temb)));

    down_blocks = register_module("down_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < n; ++i) {
      down_blocks->push_back(DownBlock2D(
          DownBlock2DOptions(i == 0 ? ch[0] : ch[i - 1], ch[i], temb)
              .num_layers(c.layers_per_block)
              .groups(c.norm_num_groups)
              .eps(c.norm_eps)
              .output_scale_factor(c.resnet_out_scale_factor)
              .add_downsample(i + 1 < n)
              .downsample_padding(c.downsample_padding)
              .attention(attention(i, c.down_block_types[i] == "CrossAttnDownBlock2D"))));
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
              .attention(attention(level, c.up_block_types[i] == "CrossAttnUpBlock2D"))));
    }

    mid_block = register_module(
        "mid_block", UNetMidBlock2DCrossAttn(UNetMidBlock2DCrossAttnOptions(ch[n - 1], temb)
                                                 .groups(c.norm_num_groups)
                                                 .eps(c.norm_eps)
                                                 .output_scale_factor(c.mid_block_scale_factor)
                                                 .attention(attention(n - 1, true))));
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

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    downs = detail::typed_items<DownBlock2D>(down_blocks);
    ups = detail::typed_items<UpBlock2D>(up_blocks);
    sites = detail::typed_items<scedit::SkipSite>(lsc_identity);
  }

  /// Predicts the noise: sample [B, in_channels, H, W] (H and W multiples of
  /// 2^(levels-1) = 8 for SD), timestep [B], [1] or a scalar (int or float),
  /// encoder_hidden_states [B, L, cross_attention_dim] -> [B, out_channels, H, W].
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states) {
    check_inputs(sample, timestep, encoder_hidden_states);
    const int64_t b = sample.size(0);
    const auto& context = encoder_hidden_states;

    // 1. Time: sinusoidal embedding in float32, then the sample's dtype (as diffusers).
    auto timesteps = timestep.reshape({-1}).to(sample.device()).expand({b});
    auto t_emb = functional::timestep_embedding(timesteps, config.block_out_channels[0],
                                                config.flip_sin_to_cos,
                                                static_cast<double>(config.freq_shift));
    auto emb = time_embedding(t_emb.to(sample.scalar_type()));  // [B, C0] -> [B, 4·C0]

    // 2. Encoder: every feature it keeps for the decoder goes onto the skip stack.
    auto input = config.center_input_sample ? 2.0 * sample - 1.0 : sample;
    if (channels_last) input = input.contiguous(torch::MemoryFormat::ChannelsLast);
    auto h = conv_in(input);
    std::vector<torch::Tensor> skips{h};
    skips.reserve(sites.size());
    for (auto& block : downs) h = block(h, emb, context, skips);

    // 3. Middle.
    h = mid_block(h, emb, context);

    // 4. Decoder: each up block pops its skips, deepest first, through their sites.
    size_t next_site = 0;
    for (auto& block : ups) h = block(h, emb, context, skips, sites, next_site);

    // 5. Output.
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
    for (auto& module : modules(/*include_self=*/false)) {
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

  /// Keeps the convolution weights and the input sample in channels-last memory order (NHWC)
  /// instead of NCHW, or back: a speed lever for tensor-core convolutions (it changes only the
  /// layout, not the values; the state dict reads the same). Call it after `to(device, dtype)`.
  void set_channels_last(bool enabled) {
    torch::NoGradGuard no_grad;
    const auto format = enabled ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
    for (auto& p : parameters()) {
      if (p.dim() == 4) p.set_data(p.contiguous(format));
    }
    channels_last = enabled;
  }

  /// The skip sites in decoder order (`lsc_identity[0]` = the deepest skip).
  std::vector<scedit::SkipSite> skip_sites() const { return sites; }

  /// Overall downsampling of the latent: 2^(levels - 1); H and W must be multiples of it.
  int64_t downsampling_factor() const { return int64_t{1} << (config.num_blocks() - 1); }

  /// Prints `sd::UNet2DConditionModel(block_out_channels=[320, 640, 1280, 1280], ...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::UNet2DConditionModel(block_out_channels="
           << torch::IntArrayRef(config.block_out_channels)
           << ", layers_per_block=" << config.layers_per_block
           << ", cross_attention_dim=" << config.cross_attention_dim << ")";
  }

  /// The configuration it was built with.
  UNetConfig config;
  /// Input conv.
  torch::nn::Conv2d conv_in{nullptr};
  /// Time embedding MLP (time_proj, the sinusoidal part, has no parameters).
  TimestepEmbedding time_embedding{nullptr};
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
                    const torch::Tensor& context) const {
    const int64_t factor = downsampling_factor();
    TORCH_CHECK(sample.dim() == 4 && sample.size(1) == config.in_channels,
                "UNet2DConditionModel: expected sample [B, ", config.in_channels,
                ", H, W], got shape ", sample.sizes());
    TORCH_CHECK(sample.size(2) % factor == 0 && sample.size(3) % factor == 0 &&
                    sample.size(2) > 0 && sample.size(3) > 0,
                "UNet2DConditionModel: sample height and width must be positive multiples of ",
                factor, ", got shape ", sample.sizes());
    TORCH_CHECK(context.dim() == 3 && context.size(0) == sample.size(0) &&
                    context.size(2) == config.cross_attention_dim,
                "UNet2DConditionModel: expected encoder_hidden_states [", sample.size(0), ", L, ",
                config.cross_attention_dim, "], got shape ", context.sizes());
    TORCH_CHECK(timestep.dim() <= 1 && (timestep.numel() == 1 || timestep.numel() == sample.size(0)),
                "UNet2DConditionModel: expected timestep [", sample.size(0),
                "], [1] or a scalar, got shape ", timestep.sizes());
  }
};

/// Holder of `UNet2DConditionModelImpl`.
TORCH_MODULE(UNet2DConditionModel);

/// Short name of the `UNet2DConditionModel` holder.
using UNet = UNet2DConditionModel;

}  // namespace sd
