#pragma once
/// @file transformer.hpp
/// @brief The UNet's spatial transformer in diffusers' layout: `Transformer2DModel` of
/// `BasicTransformerBlock`s (self-attention, cross-attention, GEGLU feed-forward).
///
/// Reference: diffusers `models/transformers/transformer_2d.py` (continuous input, layer_norm),
/// `models/attention.py` (`BasicTransformerBlock`, `FeedForward`), `models/activations.py`
/// (`GEGLU`).

#include <scedit/checkpoint.hpp>
#include <sd/layers.hpp>
#include <sd/lean_ops.hpp>

#include <torch/torch.h>

#include <ostream>
#include <utility>
#include <vector>

namespace sd {

// ---- GEGLU / FeedForward -----------------------------------------------------------------------

/// Options of a `GEGLU`.
struct GEGLUOptions {
  /// Example: `GEGLUOptions(320, 1280)`.
  GEGLUOptions(int64_t dim_in, int64_t dim_out) : dim_in_(dim_in), dim_out_(dim_out) {}
  /// Input channels.
  TORCH_ARG(int64_t, dim_in);
  /// Output channels (the projection produces twice as many: value and gate).
  TORCH_ARG(int64_t, dim_out);
};

/// Gated GELU (Shazeer 2020): `a · GELU(g)` where `[a, g] = proj(x)`; exact (erf) GELU.
class GEGLUImpl : public torch::nn::Cloneable<GEGLUImpl> {
 public:
  /// Builds `proj`.
  explicit GEGLUImpl(GEGLUOptions options) : options(std::move(options)) { reset(); }

  /// Registers `proj` (dim_in -> 2·dim_out).
  void reset() override {
    proj = register_module("proj", torch::nn::Linear(options.dim_in(), 2 * options.dim_out()));
  }

  /// [..., dim_in] -> [..., dim_out].
  torch::Tensor forward(const torch::Tensor& x) {
    return geglu_gate(linear(proj, x), lean);  // [..., 2·dim_out] -> [..., dim_out]
  }

  /// Prints `sd::GEGLU(dim_in=320, dim_out=1280)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::GEGLU(dim_in=" << options.dim_in() << ", dim_out=" << options.dim_out() << ")";
  }

  /// The options it was built with.
  GEGLUOptions options;
  /// The joint value/gate projection.
  torch::nn::Linear proj{nullptr};
  /// Which gate variant forward uses (`lean.geglu`, `lean.fused_geglu`; see lean_ops.hpp).
  LeanActivations lean;
};

/// Holder of `GEGLUImpl`.
TORCH_MODULE(GEGLU);

/// Options of a `FeedForward`.
struct FeedForwardOptions {
  /// Example: `FeedForwardOptions(320)` (hidden width 4·320).
  explicit FeedForwardOptions(int64_t dim) : dim_(dim) {}
  /// Channels in and out.
  TORCH_ARG(int64_t, dim);
  /// Hidden width = mult · dim.
  TORCH_ARG(int64_t, mult) = 4;
};

/// diffusers' `FeedForward` with GEGLU: `net = [GEGLU, Dropout, Linear]`.
class FeedForwardImpl : public detail::BoundCloneable<FeedForwardImpl> {
 public:
  /// Builds `net`.
  explicit FeedForwardImpl(FeedForwardOptions options) : options(std::move(options)) { reset(); }

  /// Registers `net.0` (GEGLU), `net.1` (Dropout p = 0, for the layout) and `net.2` (Linear).
  void reset() override {
    const int64_t inner = options.mult() * options.dim();
    net = register_module("net", torch::nn::ModuleList());
    net->push_back(GEGLU(GEGLUOptions(options.dim(), inner)));
    net->push_back(torch::nn::Dropout(0.0));
    net->push_back(torch::nn::Linear(inner, options.dim()));
    bind();
  }

  /// Re-reads the typed holders of `net` (see `detail::BoundCloneable`).
  void bind() {
    geglu = std::dynamic_pointer_cast<GEGLUImpl>(net->ptr(0));
    out = std::dynamic_pointer_cast<torch::nn::LinearImpl>(net->ptr(2));
    TORCH_CHECK(!geglu.is_empty() && !out.is_empty(), "FeedForward: unexpected net layout");
  }

  /// [..., dim] -> [..., dim].
  torch::Tensor forward(const torch::Tensor& x) { return linear(out, geglu(x)); }

  /// The options it was built with.
  FeedForwardOptions options;
  /// `net.0`, `net.1`, `net.2`.
  torch::nn::ModuleList net{nullptr};
  /// Typed holder of `net.0`.
  GEGLU geglu{nullptr};
  /// Typed holder of `net.2`.
  torch::nn::Linear out{nullptr};
};

/// Holder of `FeedForwardImpl`.
TORCH_MODULE(FeedForward);

// ---- BasicTransformerBlock ---------------------------------------------------------------------

/// Options of a `BasicTransformerBlock`.
struct BasicTransformerBlockOptions {
  /// Example: `BasicTransformerBlockOptions(320, 8, 40, 768)`.
  BasicTransformerBlockOptions(int64_t dim, int64_t heads, int64_t dim_head,
                               int64_t cross_attention_dim)
      : dim_(dim), heads_(heads), dim_head_(dim_head), cross_attention_dim_(cross_attention_dim) {}
  /// Channels of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Attention heads.
  TORCH_ARG(int64_t, heads);
  /// Channels per head.
  TORCH_ARG(int64_t, dim_head);
  /// Channels of the context (text embeddings).
  TORCH_ARG(int64_t, cross_attention_dim);
  /// attn1 attends to the context instead of the tokens.
  TORCH_ARG(bool, only_cross_attention) = false;
  /// LayerNorm eps.
  TORCH_ARG(double, norm_eps) = 1e-5;
};

/// diffusers' `BasicTransformerBlock` (layer_norm): self-attention, cross-attention and GEGLU
/// feed-forward, each pre-normed and residual.
class BasicTransformerBlockImpl : public torch::nn::Cloneable<BasicTransformerBlockImpl> {
 public:
  /// Builds the block.
  explicit BasicTransformerBlockImpl(BasicTransformerBlockOptions options)
      : options(std::move(options)) {
    reset();
  }

  /// Registers norm1, attn1, norm2, attn2, norm3, ff.
  void reset() override {
    const auto& o = options;
    auto layer_norm = [&] {
      return torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.dim()}).eps(o.norm_eps()));
    };
    norm1 = register_module("norm1", layer_norm());
    attn1 = register_module(
        "attn1", Attention(AttentionOptions(o.dim(), o.heads(), o.dim_head())
                               .cross_attention_dim(o.only_cross_attention()
                                                        ? o.cross_attention_dim()
                                                        : 0)));
    norm2 = register_module("norm2", layer_norm());
    attn2 = register_module("attn2", Attention(AttentionOptions(o.dim(), o.heads(), o.dim_head())
                                                   .cross_attention_dim(o.cross_attention_dim())));
    norm3 = register_module("norm3", layer_norm());
    ff = register_module("ff", FeedForward(FeedForwardOptions(o.dim())));
  }

  /// x [B, L, dim], context [B, Lc, cross_attention_dim] -> [B, L, dim].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) {
    // Each residual add goes in place into the sub-layer's fresh output (not saved by autograd).
    auto h = attn1(normed(norm1, x), options.only_cross_attention() ? context : torch::Tensor());
    h.add_(x);
    auto h2 = attn2(normed(norm2, h), context);
    h2.add_(h);
    auto h3 = feed_forward(normed(norm3, h2));
    h3.add_(h2);
    return h3;
  }

  /// Prints `sd::BasicTransformerBlock(dim=320, heads=8, dim_head=40, cross_attention_dim=768)`.
  void pretty_print(std::ostream& stream) const override {
    const auto& o = options;
    stream << "sd::BasicTransformerBlock(dim=" << o.dim() << ", heads=" << o.heads()
           << ", dim_head=" << o.dim_head() << ", cross_attention_dim=" << o.cross_attention_dim();
    if (o.only_cross_attention()) stream << ", only_cross_attention=true";
    stream << ")";
  }

  /// The options it was built with.
  BasicTransformerBlockOptions options;
  /// LayerNorm before the self-attention.
  torch::nn::LayerNorm norm1{nullptr};
  /// Self-attention (cross-attention when only_cross_attention).
  Attention attn1{nullptr};
  /// LayerNorm before the cross-attention.
  torch::nn::LayerNorm norm2{nullptr};
  /// Cross-attention to the context.
  Attention attn2{nullptr};
  /// LayerNorm before the feed-forward.
  torch::nn::LayerNorm norm3{nullptr};
  /// GEGLU feed-forward.
  FeedForward ff{nullptr};
  /// Which LayerNorm variant forward uses (`norms_in_activation_dtype`, `fused_layer_norm`) and
  /// whether `ff` is recomputed in the backward pass (`recompute_feed_forward`); see lean_ops.hpp.
  LeanActivations lean;

 private:
  torch::Tensor normed(torch::nn::LayerNorm& norm, const torch::Tensor& x) { return layer_norm(x, *norm, lean); }

  // x [B, L, dim] -> [B, L, dim]; without a graph being recorded there is nothing to recompute.
  torch::Tensor feed_forward(const torch::Tensor& x) {
    if (!lean.recompute_feed_forward || !torch::GradMode::is_enabled()) return ff(x);
    return scedit::checkpoint([ff = ff](const std::vector<torch::Tensor>& in) mutable { return ff(in[0]); },
                              {x});
  }
};

/// Holder of `BasicTransformerBlockImpl`.
TORCH_MODULE(BasicTransformerBlock);

// ---- Transformer2DModel ------------------------------------------------------------------------

/// Options of a `Transformer2DModel`.
struct Transformer2DModelOptions {
  /// Example: `Transformer2DModelOptions(320, 8, 768).norm_num_groups(32)`.
  Transformer2DModelOptions(int64_t channels, int64_t heads, int64_t cross_attention_dim)
      : channels_(channels), heads_(heads), cross_attention_dim_(cross_attention_dim) {}
  /// Channels of the feature map (in and out; the inner width equals it).
  TORCH_ARG(int64_t, channels);
  /// Attention heads (channels per head = channels / heads).
  TORCH_ARG(int64_t, heads);
  /// Channels of the context.
  TORCH_ARG(int64_t, cross_attention_dim);
  /// Transformer blocks.
  TORCH_ARG(int64_t, num_layers) = 1;
  /// Groups of the input GroupNorm (eps 1e-6).
  TORCH_ARG(int64_t, norm_num_groups) = 32;
  /// proj_in / proj_out as Linear (SD 2.x) instead of 1×1 convs (SD 1.x).
  TORCH_ARG(bool, use_linear_projection) = false;
  /// attn1 attends to the context too.
  TORCH_ARG(bool, only_cross_attention) = false;
};

/// diffusers' `Transformer2DModel` on continuous input: GroupNorm, proj_in, transformer blocks
/// over the H·W tokens, proj_out, plus the input.
class Transformer2DModelImpl : public detail::BoundCloneable<Transformer2DModelImpl> {
 public:
  /// Builds the model.
  explicit Transformer2DModelImpl(Transformer2DModelOptions options)
      : options(std::move(options)) {
    reset();
  }

  /// Registers norm, proj_in, transformer_blocks, proj_out.
  void reset() override {
    const auto& o = options;
    TORCH_CHECK(o.heads() > 0 && o.channels() % o.heads() == 0, "Transformer2DModel: ",
                o.channels(), " channels do not split into ", o.heads(), " heads");
    const int64_t c = o.channels();
    norm = register_module(
        "norm", torch::nn::GroupNorm(torch::nn::GroupNormOptions(o.norm_num_groups(), c).eps(1e-6)));
    if (o.use_linear_projection()) {
      proj_in_linear = register_module("proj_in", torch::nn::Linear(c, c));
    } else {
      proj_in_conv = register_module("proj_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c, c, 1)));
    }
    transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < o.num_layers(); ++i) {
      transformer_blocks->push_back(BasicTransformerBlock(
          BasicTransformerBlockOptions(c, o.heads(), c / o.heads(), o.cross_attention_dim())
              .only_cross_attention(o.only_cross_attention())));
    }
    if (o.use_linear_projection()) {
      proj_out_linear = register_module("proj_out", torch::nn::Linear(c, c));
    } else {
      proj_out_conv =
          register_module("proj_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(c, c, 1)));
    }
    bind();
  }

  /// Re-reads the typed holders of `transformer_blocks` (see `detail::BoundCloneable`).
  void bind() { blocks = detail::typed_items<BasicTransformerBlock>(transformer_blocks); }

  /// x [B, C, H, W], context [B, Lc, cross_attention_dim] -> [B, C, H, W].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context) {
    const int64_t b = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
    auto normed = group_norm(x, *norm, lean);
    torch::Tensor h;
    if (options.use_linear_projection()) {
      h = linear(proj_in_linear, normed.permute({0, 2, 3, 1}).reshape({b, height * width, c}));
    } else {
      h = proj_in_conv(normed).permute({0, 2, 3, 1}).reshape({b, height * width, c});
    }  // [B, C, H, W] -> [B, H·W, C]
    for (auto& block : blocks) h = block(h, context);
    // proj_out as a matmul over the tokens (a 1×1 conv is the same product), then a strided view
    // back to [B, C, H, W]: the residual add writes the NCHW result without an extra copy.
    if (options.use_linear_projection()) {
      h = linear(proj_out_linear, h);
    } else {
      h = linear(h, proj_out_conv->weight.flatten(1), proj_out_conv->bias);
    }
    return x + h.view({b, height, width, c}).permute({0, 3, 1, 2});  // [B, H·W, C] -> [B, C, H, W]
  }

  /// Prints `sd::Transformer2DModel(channels=320, heads=8, cross_attention_dim=768)`.
  void pretty_print(std::ostream& stream) const override {
    const auto& o = options;
    stream << "sd::Transformer2DModel(channels=" << o.channels() << ", heads=" << o.heads()
           << ", cross_attention_dim=" << o.cross_attention_dim();
    if (o.num_layers() != 1) stream << ", num_layers=" << o.num_layers();
    if (o.norm_num_groups() != 32) stream << ", norm_num_groups=" << o.norm_num_groups();
    if (o.use_linear_projection()) stream << ", use_linear_projection=true";
    if (o.only_cross_attention()) stream << ", only_cross_attention=true";
    stream << ")";
  }

  /// The options it was built with.
  Transformer2DModelOptions options;
  /// GroupNorm over the input (eps 1e-6).
  torch::nn::GroupNorm norm{nullptr};
  /// `proj_in` as a 1×1 conv (SD 1.x) ...
  torch::nn::Conv2d proj_in_conv{nullptr};
  /// ... or as a Linear (SD 2.x).
  torch::nn::Linear proj_in_linear{nullptr};
  /// The transformer blocks.
  torch::nn::ModuleList transformer_blocks{nullptr};
  /// Typed holders of `transformer_blocks`.
  std::vector<BasicTransformerBlock> blocks;
  /// `proj_out` as a 1×1 conv (SD 1.x) ...
  torch::nn::Conv2d proj_out_conv{nullptr};
  /// ... or as a Linear (SD 2.x).
  torch::nn::Linear proj_out_linear{nullptr};
  /// Which variant the input GroupNorm uses (`norms_in_activation_dtype`; see lean_ops.hpp).
  LeanActivations lean;
};

/// Holder of `Transformer2DModelImpl`.
TORCH_MODULE(Transformer2DModel);

}  // namespace sd
