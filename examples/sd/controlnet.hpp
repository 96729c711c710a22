#pragma once
/// @file controlnet.hpp
/// @brief diffusers' `ControlNetModel` for SD 1.x / 2.x / XL: a trainable copy of the UNet's
/// encoder and middle block (with SDXL's "text_time" added embedding) that reads a condition
/// image and returns residuals for the UNet's skips and middle output (`sd::UNetResiduals`,
/// taken by `UNet2DConditionModel::forward`).
///
/// The encoder blocks are built as the UNet builds its own (`detail::unet_down_block_options`),
/// so a ControlNet and its UNet cannot drift apart; the state-dict keys and shapes are
/// diffusers'. Configuration: `controlnet_config.hpp`; weights, from a UNet or from files:
/// `controlnet_weights.hpp`.
///
/// Example:
/// @code
/// auto controlnet = sd::controlnet_from_unet(unet);  // encoder copied, zero convolutions zero
/// auto residuals = controlnet(latents, t, text, condition);  // condition [B, 3, 8H, 8W] in [0, 1]
/// auto eps = unet(latents, t, text, residuals);
/// auto xl_residuals = xl_controlnet(latents, t, text, added, condition);  // SDXL: + added
/// @endcode

#include <sd/config.hpp>
#include <sd/controlnet_config.hpp>
#include <sd/layers.hpp>
#include <sd/lean_ops.hpp>
#include <sd/unet.hpp>
#include <sd/unet_blocks.hpp>

#include <scedit/checkpoint.hpp>

#include <torch/torch.h>

#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// Options of a `ControlNetConditioningEmbedding`.
struct ControlNetConditioningEmbeddingOptions {
  /// Example: `ControlNetConditioningEmbeddingOptions(320).block_out_channels({16, 32, 96, 256})`.
  explicit ControlNetConditioningEmbeddingOptions(int64_t conditioning_embedding_channels)
      : conditioning_embedding_channels_(conditioning_embedding_channels) {}
  /// Output channels: the UNet's block_out_channels[0].
  TORCH_ARG(int64_t, conditioning_embedding_channels);
  /// Widths of the convolutions; each step to the next width halves the resolution.
  TORCH_ARG(std::vector<int64_t>, block_out_channels) = std::vector<int64_t>{16, 32, 96, 256};
  /// Channels of the condition image.
  TORCH_ARG(int64_t, conditioning_channels) = 3;
};

/// diffusers' `ControlNetConditioningEmbedding`: 3×3 convolutions with SiLU between them that
/// bring a condition image to the latent's size and conv_in's width. `conv_out` starts at zero,
/// so a fresh embedding adds nothing to conv_in's output.
class ControlNetConditioningEmbeddingImpl
    : public detail::BoundCloneable<ControlNetConditioningEmbeddingImpl> {
 public:
  /// Builds the convolutions.
  explicit ControlNetConditioningEmbeddingImpl(ControlNetConditioningEmbeddingOptions options)
      : options(std::move(options)) {
    reset();
  }

  /// Registers conv_in, blocks (per step: a width-keeping conv, then a stride-2 one) and conv_out.
  void reset() override {
    const auto& widths = options.block_out_channels();
    TORCH_CHECK(!widths.empty(), "ControlNetConditioningEmbedding: block_out_channels is empty");
    auto conv = [](int64_t in, int64_t out, int64_t stride) {
      return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1));
    };
    conv_in = register_module("conv_in", conv(options.conditioning_channels(), widths[0], 1));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (size_t i = 0; i + 1 < widths.size(); ++i) {
      blocks->push_back(conv(widths[i], widths[i], 1));
      blocks->push_back(conv(widths[i], widths[i + 1], 2));
    }
    conv_out = register_module("conv_out",
                               conv(widths.back(), options.conditioning_embedding_channels(), 1));
    bind();
    reset_parameters();
  }

  /// Sets conv_out to zero (diffusers' `zero_module`); the others keep LibTorch's default init.
  void reset_parameters() {
    torch::NoGradGuard no_grad;
    for (auto& p : conv_out->parameters()) p.zero_();
  }

  /// Re-reads the typed holders of `blocks` (see `detail::BoundCloneable`).
  void bind() { convs = detail::typed_items<torch::nn::Conv2d>(blocks); }

  /// condition [B, conditioning_channels, f·H, f·W] -> [B, conditioning_embedding_channels, H, W]
  /// (f = 2^(len(block_out_channels) - 1)).
  torch::Tensor forward(const torch::Tensor& condition) {
    auto h = torch::silu(conv_in(condition));
    for (auto& conv : convs) h = torch::silu(conv(h));
    return conv_out(h);
  }

  /// Prints `sd::ControlNetConditioningEmbedding(conditioning_embedding_channels=320,
  /// block_out_channels=[16, 32, 96, 256])` (and conditioning_channels when not 3).
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::ControlNetConditioningEmbedding(conditioning_embedding_channels="
           << options.conditioning_embedding_channels()
           << ", block_out_channels=" << torch::IntArrayRef(options.block_out_channels());
    if (options.conditioning_channels() != 3) {
      stream << ", conditioning_channels=" << options.conditioning_channels();
    }
    stream << ")";
  }

  /// The options it was built with.
  ControlNetConditioningEmbeddingOptions options;
  /// First conv: condition channels -> block_out_channels[0].
  torch::nn::Conv2d conv_in{nullptr};
  /// The convolutions between conv_in and conv_out.
  torch::nn::ModuleList blocks{nullptr};
  /// Last conv, zero-initialised: -> conditioning_embedding_channels.
  torch::nn::Conv2d conv_out{nullptr};
  /// Typed holders of `blocks`.
  std::vector<torch::nn::Conv2d> convs;
};

/// Holder of `ControlNetConditioningEmbeddingImpl`.
TORCH_MODULE(ControlNetConditioningEmbedding);

/// diffusers' `ControlNetModel` (guess_mode false): the UNet's conv_in, time embedding (with
/// SDXL's `add_embedding` for a "text_time" UNet), encoder and middle block, a condition embedding
/// added to conv_in's output, and one zero-initialised 1×1 convolution per encoder feature and for
/// the middle output, whose outputs are the residuals.
class ControlNetModelImpl : public detail::BoundCloneable<ControlNetModelImpl> {
 public:
  /// Builds the model (random init, zero convolutions zero) from `config`.
  explicit ControlNetModelImpl(ControlNetConfig config) : config(std::move(config)) { reset(); }

  /// Registers conv_in, time_embedding, add_embedding ("text_time" only),
  /// controlnet_cond_embedding, down_blocks, controlnet_down_blocks, controlnet_mid_block and
  /// mid_block (diffusers' order).
  void reset() override {
    config.validate();
    const auto& c = config.unet;
    const auto& ch = c.block_out_channels;
    conv_in = register_module(
        "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, ch[0], 3).padding(1)));
    time_embedding = register_module(
        "time_embedding", TimestepEmbedding(TimestepEmbeddingOptions(ch[0], c.time_embed_dim())));
    if (c.has_text_time()) {  // as the UNet's: diffusers' ControlNetModel takes the same keys
      add_embedding = register_module(
          "add_embedding", TimestepEmbedding(TimestepEmbeddingOptions(
                               c.projection_class_embeddings_input_dim, c.time_embed_dim())));
    }
    controlnet_cond_embedding =
        register_module("controlnet_cond_embedding",
                        ControlNetConditioningEmbedding(
                            ControlNetConditioningEmbeddingOptions(ch[0])
                                .block_out_channels(config.conditioning_embedding_out_channels)
                                .conditioning_channels(config.conditioning_channels)));
    down_blocks = register_module("down_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < c.num_blocks(); ++i) {
      down_blocks->push_back(DownBlock2D(detail::unet_down_block_options(c, i)));
    }
    auto zero_conv = [](int64_t channels) {
      return torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, channels, 1));
    };
    controlnet_down_blocks = register_module("controlnet_down_blocks", torch::nn::ModuleList());
    for (int64_t channels : config.residual_channels()) {
      controlnet_down_blocks->push_back(zero_conv(channels));
    }
    controlnet_mid_block = register_module("controlnet_mid_block", zero_conv(ch.back()));
    mid_block =
        register_module("mid_block", UNetMidBlock2DCrossAttn(detail::unet_mid_block_options(c)));
    bind();
    reset_parameters();
  }

  /// Sets the zero convolutions and the condition embedding's conv_out to zero (diffusers'
  /// `zero_module`), so that a fresh ControlNet adds nothing to its UNet.
  void reset_parameters() {
    torch::NoGradGuard no_grad;
    for (auto& p : controlnet_down_blocks->parameters()) p.zero_();
    for (auto& p : controlnet_mid_block->parameters()) p.zero_();
    controlnet_cond_embedding->reset_parameters();
  }

  /// Re-reads the typed holders of the module lists (see `detail::BoundCloneable`).
  void bind() {
    downs = detail::typed_items<DownBlock2D>(down_blocks);
    zero_convs = detail::typed_items<torch::nn::Conv2d>(controlnet_down_blocks);
  }

  /// The residuals for a UNet: sample [B, in_channels, H, W], timestep [B], [1] or a scalar,
  /// encoder_hidden_states [B, L, cross_attention_dim], controlnet_cond [B, 3, 8H, 8W] in [0, 1]
  /// (factor: `config.conditioning_factor()`) -> one down residual per skip of the UNet, shaped
  /// like it, in encoder order (12 for SD), and the middle one, each multiplied by
  /// `conditioning_scale`. A "text_time" ControlNet (SDXL's) needs the overload with
  /// `UNetAddedConditions`.
  UNetResiduals forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states,
                        const torch::Tensor& controlnet_cond, double conditioning_scale = 1.0) {
    return forward(sample, timestep, encoder_hidden_states, UNetAddedConditions{}, controlnet_cond,
                   conditioning_scale);
  }

  /// As above, with SDXL's added conditioning, as its UNet takes it: `added.text_embeds`
  /// [B, text_embeds_dim] and `added.time_ids` [B, 6] for a "text_time" ControlNet.
  UNetResiduals forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states,
                        const UNetAddedConditions& added, const torch::Tensor& controlnet_cond,
                        double conditioning_scale = 1.0) {
    check_sample(sample);
    TORCH_CHECK(
        timestep.dim() <= 1 && (timestep.numel() == 1 || timestep.numel() == sample.size(0)),
        "ControlNetModel: expected timestep [", sample.size(0), "], [1] or a scalar, got shape ",
        timestep.sizes());
    return forward_with_time_features(sample, time_features(timestep, sample),
                                      encoder_hidden_states, added, controlnet_cond,
                                      conditioning_scale);
  }

  /// The sinusoidal timestep features [B, block_out_channels[0]] (float32), exactly as the UNet
  /// computes them: a sampler can compute them once for both models.
  torch::Tensor time_features(const torch::Tensor& timestep, const torch::Tensor& sample) const {
    return detail::timestep_features(config.unet, timestep, sample);
  }

  /// `forward` from given timestep features [B, block_out_channels[0]] (any float dtype; cast to
  /// the sample's, as diffusers casts its float32 ones).
  UNetResiduals forward_with_time_features(const torch::Tensor& sample,
                                           const torch::Tensor& features,
                                           const torch::Tensor& encoder_hidden_states,
                                           const torch::Tensor& controlnet_cond,
                                           double conditioning_scale = 1.0) {
    return forward_with_time_features(sample, features, encoder_hidden_states,
                                      UNetAddedConditions{}, controlnet_cond, conditioning_scale);
  }

  /// As above, with SDXL's added conditioning (see the `forward` that takes it).
  UNetResiduals forward_with_time_features(const torch::Tensor& sample,
                                           const torch::Tensor& features,
                                           const torch::Tensor& encoder_hidden_states,
                                           const UNetAddedConditions& added,
                                           const torch::Tensor& controlnet_cond,
                                           double conditioning_scale = 1.0) {
    check_inputs(sample, encoder_hidden_states, controlnet_cond);
    check_added(sample, added);
    const int64_t c0 = config.unet.block_out_channels[0];
    TORCH_CHECK(features.dim() == 2 && features.size(0) == sample.size(0) && features.size(1) == c0,
                "ControlNetModel: expected timestep features [", sample.size(0), ", ", c0,
                "], got shape ", features.sizes());
    auto emb = time_embedding(features.to(sample.scalar_type()));  // [B, C0] -> [B, 4·C0]
    if (config.unet.has_text_time()) {
      // [B, D + 6·addition_time_embed_dim] -> [B, 4·C0], as the UNet adds it
      emb = emb + add_embedding(detail::text_time_input(config.unet, added, sample.scalar_type()));
    }
    const auto& context = encoder_hidden_states;

    auto input = sample;
    auto condition = controlnet_cond.to(sample.device(), sample.scalar_type());
    if (config.controlnet_conditioning_channel_order == "bgr") condition = condition.flip({1});
    if (channels_last) {
      input = input.contiguous(torch::MemoryFormat::ChannelsLast);
      condition = condition.contiguous(torch::MemoryFormat::ChannelsLast);
    }
    // [B, C0, H, W] + ([B, 3, 8H, 8W] -> [B, C0, H, W])
    auto h = conv_in(input) + controlnet_cond_embedding(condition);
    std::vector<torch::Tensor> encoder_features{h};
    encoder_features.reserve(zero_convs.size());
    for (auto& block : downs) h = run_down_block(block, h, emb, context, encoder_features);
    if (gradient_checkpointing) {
      auto mid = mid_block;
      h = scedit::checkpoint(
          [mid](const std::vector<torch::Tensor>& in) mutable { return mid(in[0], in[1], in[2]); },
          {h, emb, context});
    } else {
      h = mid_block(h, emb, context);
    }

    auto scaled = [&](torch::Tensor x) {
      return conditioning_scale == 1.0 ? x : x * conditioning_scale;
    };
    UNetResiduals residuals;
    residuals.down.reserve(zero_convs.size());
    for (size_t i = 0; i < zero_convs.size(); ++i) {
      residuals.down.push_back(scaled(zero_convs[i](encoder_features[i])));
    }
    residuals.mid = scaled(controlnet_mid_block(h));
    return residuals;
  }

  /// Recompute each encoder resnet (+ transformer) and the middle block in the backward pass
  /// instead of keeping their activations (diffusers' `enable_gradient_checkpointing`): the
  /// whole ControlNet trains, so its encoder's activations are its training memory.
  void set_gradient_checkpointing(bool enabled) { gradient_checkpointing = enabled; }

  /// Chooses the lean activation variants (lean_ops.hpp) in every block, as the UNet's.
  void set_lean_activations(const LeanActivations& options) {
    detail::set_block_lean_activations(*this, options);
  }

  /// Keeps the convolution weights and the inputs channels-last (NHWC), or back; as the UNet's.
  void set_channels_last(bool enabled) {
    detail::set_conv_weights_channels_last(*this, enabled);
    channels_last = enabled;
  }

  /// Prints `sd::ControlNetModel(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
  /// cross_attention_dim=768, conditioning_embedding_out_channels=[16, 32, 96, 256])` (and the
  /// added conditioning, channel order and conditioning channels where SDXL's, not rgb, not 3).
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::ControlNetModel(block_out_channels="
           << torch::IntArrayRef(config.unet.block_out_channels)
           << ", layers_per_block=" << config.unet.layers_per_block
           << ", cross_attention_dim=" << config.unet.cross_attention_dim
           << ", conditioning_embedding_out_channels="
           << torch::IntArrayRef(config.conditioning_embedding_out_channels);
    if (config.unet.has_text_time()) stream << ", addition_embed_type=text_time";
    if (config.conditioning_channels != 3) {
      stream << ", conditioning_channels=" << config.conditioning_channels;
    }
    if (config.controlnet_conditioning_channel_order != "rgb") {
      stream << ", controlnet_conditioning_channel_order="
             << config.controlnet_conditioning_channel_order;
    }
    stream << ")";
  }

  /// The configuration it was built with.
  ControlNetConfig config;
  /// Input conv (the UNet's).
  torch::nn::Conv2d conv_in{nullptr};
  /// Time embedding MLP (the UNet's; time_proj has no parameters).
  TimestepEmbedding time_embedding{nullptr};
  /// SDXL's added-conditioning MLP (the UNet's; "text_time" only, else empty).
  TimestepEmbedding add_embedding{nullptr};
  /// Condition image -> a feature added to conv_in's output.
  ControlNetConditioningEmbedding controlnet_cond_embedding{nullptr};
  /// Encoder levels (the UNet's).
  torch::nn::ModuleList down_blocks{nullptr};
  /// One zero-initialised 1×1 conv per encoder feature, in encoder order.
  torch::nn::ModuleList controlnet_down_blocks{nullptr};
  /// Zero-initialised 1×1 conv on the middle block's output.
  torch::nn::Conv2d controlnet_mid_block{nullptr};
  /// Middle block (the UNet's).
  UNetMidBlock2DCrossAttn mid_block{nullptr};
  /// Typed holders of `down_blocks`.
  std::vector<DownBlock2D> downs;
  /// Typed holders of `controlnet_down_blocks`.
  std::vector<torch::nn::Conv2d> zero_convs;
  /// Whether the encoder recomputes its activations in the backward pass.
  bool gradient_checkpointing = false;
  /// Whether the inputs are laid out channels-last (see `set_channels_last`).
  bool channels_last = false;

 private:
  /// `block(h, ...)`, appending its features; with gradient checkpointing each resnet
  /// (+ transformer) is recomputed in the backward pass (DownBlock2D's loop, one layer at a time).
  torch::Tensor run_down_block(DownBlock2D& block, torch::Tensor h, const torch::Tensor& emb,
                               const torch::Tensor& context, std::vector<torch::Tensor>& features) {
    if (!gradient_checkpointing) return block(h, emb, context, features);
    for (size_t i = 0; i < block->resnet_blocks.size(); ++i) {
      auto resnet = block->resnet_blocks[i];
      auto transformer =
          block->transformers.empty() ? Transformer2DModel(nullptr) : block->transformers[i];
      h = scedit::checkpoint(
          [resnet, transformer](const std::vector<torch::Tensor>& in) mutable {
            auto x = resnet(in[0], in[1]);
            return transformer.is_empty() ? x : transformer(x, in[2]);
          },
          transformer.is_empty() ? std::vector<torch::Tensor>{h, emb}
                                 : std::vector<torch::Tensor>{h, emb, context});
      features.push_back(h);
    }
    if (!block->downsampler.is_empty()) {
      h = block->downsampler(h);
      features.push_back(h);
    }
    return h;
  }

  /// Checks the sample's shape: [B, in_channels, H, W] with positive H and W (any size: this
  /// encoder rounds odd sides up at each downsampler as the UNet's does, so each residual keeps
  /// the shape of its skip).
  void check_sample(const torch::Tensor& sample) const {
    const auto& c = config.unet;
    TORCH_CHECK(sample.dim() == 4 && sample.size(1) == c.in_channels,
                "ControlNetModel: expected sample [B, ", c.in_channels, ", H, W], got shape ",
                sample.sizes());
    TORCH_CHECK(sample.size(2) > 0 && sample.size(3) > 0,
                "ControlNetModel: sample height and width must be positive, got shape ",
                sample.sizes());
  }

  /// Checks the added conditioning against the configuration, as the UNet does: required by a
  /// "text_time" ControlNet, refused by any other.
  void check_added(const torch::Tensor& sample, const UNetAddedConditions& added) const {
    const auto& c = config.unet;
    const int64_t b = sample.size(0);
    if (!c.has_text_time()) {
      TORCH_CHECK(!added.defined(), "ControlNetModel: added conditions (text_embeds, time_ids) "
                  "were given, but this ControlNet has no addition_embed_type");
      return;
    }
    TORCH_CHECK(added.text_embeds.defined() && added.time_ids.defined() &&
                    added.text_embeds.dim() == 2 && added.text_embeds.size(0) == b &&
                    added.text_embeds.size(1) == c.text_embeds_dim() &&
                    added.time_ids.dim() == 2 && added.time_ids.size(0) == b &&
                    added.time_ids.size(1) == UNetConfig::kTextTimeIds,
                "ControlNetModel: this ControlNet (addition_embed_type text_time) needs "
                "UNetAddedConditions: text_embeds [", b, ", ", c.text_embeds_dim(), "] and time_ids [",
                b, ", ", UNetConfig::kTextTimeIds, "], got ",
                added.text_embeds.defined() ? added.text_embeds.sizes() : torch::IntArrayRef{}, " and ",
                added.time_ids.defined() ? added.time_ids.sizes() : torch::IntArrayRef{});
  }

  /// Checks the inputs' shapes against each other and the configuration.
  void check_inputs(const torch::Tensor& sample, const torch::Tensor& context,
                    const torch::Tensor& cond) const {
    check_sample(sample);
    const int64_t b = sample.size(0), f = config.conditioning_factor();
    TORCH_CHECK(context.dim() == 3 && context.size(0) == b &&
                    context.size(2) == config.unet.cross_attention_dim,
                "ControlNetModel: expected encoder_hidden_states [", b, ", L, ",
                config.unet.cross_attention_dim, "], got shape ", context.sizes());
    const std::vector<int64_t> expected{b, config.conditioning_channels, f * sample.size(2),
                                        f * sample.size(3)};
    TORCH_CHECK(cond.sizes() == torch::IntArrayRef(expected),
                "ControlNetModel: expected controlnet_cond ", torch::IntArrayRef(expected),
                " (the condition image is ", f, "× the latent size, which is ", sample.sizes(),
                "), got shape ", cond.sizes());
  }
};

/// Holder of `ControlNetModelImpl`: `TORCH_MODULE`'s expansion, with a call operator per
/// `forward` overload (as `UNet2DConditionModel`'s holder).
class ControlNetModel : public torch::nn::ModuleHolder<ControlNetModelImpl> {
 public:
  using torch::nn::ModuleHolder<ControlNetModelImpl>::ModuleHolder;
  /// The Impl type.
  using Impl = ControlNetModelImpl;

  /// `forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)`.
  UNetResiduals operator()(const torch::Tensor& sample, const torch::Tensor& timestep,
                           const torch::Tensor& encoder_hidden_states,
                           const torch::Tensor& controlnet_cond, double conditioning_scale = 1.0) {
    return get()->forward(sample, timestep, encoder_hidden_states, controlnet_cond,
                          conditioning_scale);
  }

  /// `forward(sample, timestep, encoder_hidden_states, added, controlnet_cond,
  /// conditioning_scale)` (SDXL).
  UNetResiduals operator()(const torch::Tensor& sample, const torch::Tensor& timestep,
                           const torch::Tensor& encoder_hidden_states,
                           const UNetAddedConditions& added, const torch::Tensor& controlnet_cond,
                           double conditioning_scale = 1.0) {
    return get()->forward(sample, timestep, encoder_hidden_states, added, controlnet_cond,
                          conditioning_scale);
  }
};

/// Short name of the `ControlNetModel` holder.
using ControlNet = ControlNetModel;

}  // namespace sd
