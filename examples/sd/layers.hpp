#pragma once
/// @file layers.hpp
/// @brief Blocks shared by the UNet and the VAE, in diffusers' layout: `ResnetBlock2D`,
/// `Downsample2D`, `Upsample2D` and `Attention` (the multi-head attention of both the
/// transformer blocks and the VAE's mid block).
///
/// Reference: diffusers `models/resnet.py`, `models/downsampling.py`, `models/upsampling.py`,
/// `models/attention_processor.py` (`Attention` + `AttnProcessor2_0`). Registered names are
/// diffusers' state-dict names.

#include <sd/lean_ops.hpp>

#include <scedit/compat.hpp>

#include <torch/torch.h>

#include <memory>
#include <ostream>
#include <utility>
#include <vector>

namespace sd {

namespace detail {

/// Typed holders of the modules in `list`, for forward passes without look-ups or casts.
template <typename Holder>
std::vector<Holder> typed_items(const torch::nn::ModuleList& list) {
  std::vector<Holder> items;
  items.reserve(list->size());
  for (size_t i = 0; i < list->size(); ++i) {
    auto item = std::dynamic_pointer_cast<typename Holder::ContainedType>(list->ptr(i));
    TORCH_CHECK(item != nullptr, "sd: item ", i, " of a module list is a ", list->ptr(i)->name(),
                ", not the expected type");
    items.emplace_back(std::move(item));
  }
  return items;
}

/// `Cloneable` for modules that keep typed holders of the items of their `ModuleList`s.
///
/// `ModuleList::clone` replaces its items by new objects, so after `Cloneable::clone` such
/// holders would still point at the items `reset()` made. This re-binds them (`Derived::bind()`)
/// on the copy, which keeps `clone()` correct at every level of nesting.
template <typename Derived>
class BoundCloneable : public torch::nn::Cloneable<Derived> {
 public:
  using torch::nn::Cloneable<Derived>::Cloneable;

  /// Deep copy whose typed holders point into the copy's own module lists.
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device = torch::nullopt) const override {
    auto copy = torch::nn::Cloneable<Derived>::clone(device);
    dynamic_cast<Derived&>(*copy).bind();  // Module is a virtual base: dynamic_cast
    return copy;
  }
};

/// `x / factor`, skipped when the factor is 1 (every SD configuration).
inline torch::Tensor rescale(torch::Tensor x, double factor) {
  return factor == 1.0 ? x : x.div_(factor);
}

}  // namespace detail

// ---- ResnetBlock2D -----------------------------------------------------------------------------

/// Options of a `ResnetBlock2D`.
struct ResnetBlock2DOptions {
  /// Example: `ResnetBlock2DOptions(320, 640).temb_channels(1280).groups(32).eps(1e-5)`.
  ResnetBlock2DOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  /// Input channels.
  TORCH_ARG(int64_t, in_channels);
  /// Output channels (a 1×1 `conv_shortcut` maps the input when they differ).
  TORCH_ARG(int64_t, out_channels);
  /// Width of the time embedding; 0 = no `time_emb_proj` (the VAE).
  TORCH_ARG(int64_t, temb_channels) = 0;
  /// GroupNorm groups.
  TORCH_ARG(int64_t, groups) = 32;
  /// GroupNorm eps (1e-5 in the UNet, 1e-6 in the VAE).
  TORCH_ARG(double, eps) = 1e-6;
  /// The output is divided by this.
  TORCH_ARG(double, output_scale_factor) = 1.0;
};

/// diffusers' `ResnetBlock2D` (pre-norm, SiLU, "default" time embedding):
/// `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
class ResnetBlock2DImpl : public torch::nn::Cloneable<ResnetBlock2DImpl> {
 public:
  /// Builds the block.
  explicit ResnetBlock2DImpl(ResnetBlock2DOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers norm1, conv1, time_emb_proj, norm2, conv2 and conv_shortcut as applicable.
  void reset() override {
    const auto& o = options;
    TORCH_CHECK(o.in_channels() > 0 && o.out_channels() > 0 && o.groups() > 0 &&
                    o.in_channels() % o.groups() == 0 && o.out_channels() % o.groups() == 0,
                "ResnetBlock2D: channels ", o.in_channels(), " -> ", o.out_channels(),
                " must be positive multiples of groups = ", o.groups());
    norm1 = register_module(
        "norm1", torch::nn::GroupNorm(
                     torch::nn::GroupNormOptions(o.groups(), o.in_channels()).eps(o.eps())));
    conv1 = register_module(
        "conv1", torch::nn::Conv2d(
                     torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), 3).padding(1)));
    if (o.temb_channels() > 0) {
      time_emb_proj = register_module(
          "time_emb_proj", torch::nn::Linear(o.temb_channels(), o.out_channels()));
    }
    norm2 = register_module(
        "norm2", torch::nn::GroupNorm(
                     torch::nn::GroupNormOptions(o.groups(), o.out_channels()).eps(o.eps())));
    conv2 = register_module(
        "conv2", torch::nn::Conv2d(
                     torch::nn::Conv2dOptions(o.out_channels(), o.out_channels(), 3).padding(1)));
    if (o.in_channels() != o.out_channels()) {
      conv_shortcut = register_module(
          "conv_shortcut",
          torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), 1)));
    }
  }

  /// [B, C_in, H, W] (+ temb [B, T]) -> [B, C_out, H, W].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb = {}) {
    auto h = conv1(norm_silu(x, *norm1, lean));
    if (!time_emb_proj.is_empty()) {
      TORCH_CHECK(temb.defined(), "ResnetBlock2D: this block needs a time embedding");
      // [B, T] -> [B, C_out, 1, 1]; in place on conv1's fresh output (not saved by autograd).
      h.add_(time_emb_proj(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1));
    }
    h = conv2(norm_silu(h, *norm2, lean));
    h.add_(conv_shortcut.is_empty() ? x : conv_shortcut(x));  // conv2's fresh output
    return detail::rescale(h, options.output_scale_factor());
  }

  /// Prints `sd::ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=128, groups=8,
  /// eps=1e-05)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::ResnetBlock2D(in_channels=" << options.in_channels()
           << ", out_channels=" << options.out_channels();
    if (options.temb_channels() > 0) stream << ", temb_channels=" << options.temb_channels();
    stream << ", groups=" << options.groups() << ", eps=" << options.eps();
    if (options.output_scale_factor() != 1.0) {
      stream << ", output_scale_factor=" << options.output_scale_factor();
    }
    stream << ")";
  }

  /// The options the block was built with.
  ResnetBlock2DOptions options;
  /// GroupNorm over the input.
  torch::nn::GroupNorm norm1{nullptr};
  /// First 3×3 conv.
  torch::nn::Conv2d conv1{nullptr};
  /// Time-embedding projection (absent in the VAE).
  torch::nn::Linear time_emb_proj{nullptr};
  /// GroupNorm before the second conv.
  torch::nn::GroupNorm norm2{nullptr};
  /// Second 3×3 conv.
  torch::nn::Conv2d conv2{nullptr};
  /// 1×1 conv on the shortcut when the channel count changes.
  torch::nn::Conv2d conv_shortcut{nullptr};
  /// Which lean activation variants forward uses (training memory; see lean_ops.hpp).
  LeanActivations lean;
};

/// Holder of `ResnetBlock2DImpl`.
TORCH_MODULE(ResnetBlock2D);

// ---- Downsample2D / Upsample2D -----------------------------------------------------------------

/// Options of a `Downsample2D`.
struct Downsample2DOptions {
  /// Example: `Downsample2DOptions(320).padding(0)` (the VAE's asymmetric padding).
  explicit Downsample2DOptions(int64_t channels) : channels_(channels) {}
  /// Channels in and out.
  TORCH_ARG(int64_t, channels);
  /// Conv padding 1 (UNet), or 0 with an explicit (0, 1, 0, 1) zero pad first (VAE).
  TORCH_ARG(int64_t, padding) = 1;
};

/// diffusers' `Downsample2D` with a conv: a 3×3 stride-2 conv halving H and W.
class Downsample2DImpl : public torch::nn::Cloneable<Downsample2DImpl> {
 public:
  /// Builds the conv.
  explicit Downsample2DImpl(Downsample2DOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers `conv`.
  void reset() override {
    TORCH_CHECK(options.padding() == 0 || options.padding() == 1,
                "Downsample2D: padding must be 0 or 1, got ", options.padding());
    conv = register_module(
        "conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(options.channels(), options.channels(), 3)
                                      .stride(2)
                                      .padding(options.padding())));
  }

  /// [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)] (padding 1) or [B, C, H/2, W/2] (padding 0).
  torch::Tensor forward(const torch::Tensor& x) {
    if (options.padding() == 0) {
      // Pad right and bottom only, as diffusers (and the original LDM) do.
      return conv(torch::constant_pad_nd(x, {0, 1, 0, 1}, 0));
    }
    return conv(x);
  }

  /// Prints `sd::Downsample2D(channels=320)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::Downsample2D(channels=" << options.channels();
    if (options.padding() != 1) stream << ", padding=" << options.padding();
    stream << ")";
  }

  /// The options it was built with.
  Downsample2DOptions options;
  /// The stride-2 conv.
  torch::nn::Conv2d conv{nullptr};
};

/// Holder of `Downsample2DImpl`.
TORCH_MODULE(Downsample2D);

/// Options of an `Upsample2D`.
struct Upsample2DOptions {
  /// Example: `Upsample2DOptions(1280)`.
  explicit Upsample2DOptions(int64_t channels) : channels_(channels) {}
  /// Channels in and out.
  TORCH_ARG(int64_t, channels);
};

/// diffusers' `Upsample2D` with a conv: nearest-neighbour ×2 (or to a given size), then 3×3 conv.
class Upsample2DImpl : public torch::nn::Cloneable<Upsample2DImpl> {
 public:
  /// Builds the conv.
  explicit Upsample2DImpl(Upsample2DOptions options) : options(std::move(options)) { reset(); }

  /// Registers `conv`.
  void reset() override {
    conv = register_module(
        "conv", torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(options.channels(), options.channels(), 3).padding(1)));
  }

  /// [B, C, H, W] -> [B, C, 2H, 2W], or [B, C, size[0], size[1]] when `output_size` is given
  /// (diffusers' forwarded `upsample_size`, which keeps odd sizes aligned with the skips).
  torch::Tensor forward(const torch::Tensor& x, torch::IntArrayRef output_size = {}) {
    std::vector<int64_t> size = output_size.empty()
                                    ? std::vector<int64_t>{2 * x.size(2), 2 * x.size(3)}
                                    : output_size.vec();
    TORCH_CHECK(size.size() == 2, "Upsample2D: output_size must be [H, W], got ", output_size);
    auto up = torch::nn::functional::interpolate(
        x, torch::nn::functional::InterpolateFuncOptions().size(size).mode(torch::kNearest));
    return conv(up);
  }

  /// Prints `sd::Upsample2D(channels=1280)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::Upsample2D(channels=" << options.channels() << ")";
  }

  /// The options it was built with.
  Upsample2DOptions options;
  /// The 3×3 conv after the upsampling.
  torch::nn::Conv2d conv{nullptr};
};

/// Holder of `Upsample2DImpl`.
TORCH_MODULE(Upsample2D);

// ---- Attention ---------------------------------------------------------------------------------

/// `x · weightᵀ + bias` for x [..., in] -> [..., out], with the bias added by the matrix product
/// itself (`addmm`'s epilogue) where LibTorch's `torch::nn::Linear` multiplies and then adds the
/// bias in a second pass over the output. The result is a fresh tensor, not a view, as
/// `torch::matmul`'s is: a residual added into it in place costs no extra copy in the backward
/// pass. Without a bias, or for a non-contiguous x, it is `torch::nn::functional::linear`.
inline torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (!bias.defined() || x.dim() < 2 || !x.is_contiguous()) {
    return torch::nn::functional::linear(x, weight, bias);
  }
  auto out = torch::addmm(bias, x.reshape({-1, x.size(-1)}), weight.t());  // [N, out]
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return at::_unsafe_view(out, sizes);  // [N, out] -> [..., out] (torch::matmul does the same)
}

/// `layer(x)` through `sd::linear` (the bias folded into the matrix product). x [..., in].
inline torch::Tensor linear(const torch::nn::Linear& layer, const torch::Tensor& x) {
  return linear(x, layer->weight, layer->bias);
}

namespace functional {

/// Multi-head attention on projected tensors: q [B, Lq, h·d], k and v [B, Lk, h·d] ->
/// [B, Lq, h·d], through the fused `compat::scaled_dot_product_attention`.
inline torch::Tensor multi_head_attention(const torch::Tensor& q, const torch::Tensor& k,
                                          const torch::Tensor& v, int64_t heads) {
  // [B, L, h·d] -> [B, h, L, d] (views; SDPA takes the strided layout as is)
  auto split = [heads](const torch::Tensor& t) {
    return t.reshape({t.size(0), t.size(1), heads, t.size(2) / heads}).transpose(1, 2);
  };
  auto out = scedit::compat::scaled_dot_product_attention(split(q), split(k), split(v));
  return out.transpose(1, 2).reshape({q.size(0), q.size(1), -1});  // [B, h, Lq, d] -> [B, Lq, h·d]
}

}  // namespace functional

/// Options of an `Attention`.
struct AttentionOptions {
  /// Example: `AttentionOptions(320, 8, 40).cross_attention_dim(768)` (a UNet cross-attention),
  /// `AttentionOptions(512, 1, 512).bias(true).norm_num_groups(32).residual_connection(true)`
  /// (the VAE's mid-block attention).
  AttentionOptions(int64_t query_dim, int64_t heads, int64_t dim_head)
      : query_dim_(query_dim), heads_(heads), dim_head_(dim_head) {}
  /// Channels of the queries (and of the output).
  TORCH_ARG(int64_t, query_dim);
  /// Number of heads.
  TORCH_ARG(int64_t, heads);
  /// Channels per head.
  TORCH_ARG(int64_t, dim_head);
  /// Channels of the context keys/values come from; 0 = self-attention (query_dim).
  TORCH_ARG(int64_t, cross_attention_dim) = 0;
  /// Biases on to_q / to_k / to_v (to_out.0 always has one).
  TORCH_ARG(bool, bias) = false;
  /// GroupNorm on the input before the projections; 0 = none.
  TORCH_ARG(int64_t, norm_num_groups) = 0;
  /// eps of that GroupNorm.
  TORCH_ARG(double, eps) = 1e-5;
  /// Adds the input to the output.
  TORCH_ARG(bool, residual_connection) = false;
};

/// diffusers' `Attention` with `AttnProcessor2_0`: `to_out(MHA(to_q(x), to_k(c), to_v(c)))`.
/// A 4-D input [B, C, H, W] is attended over its H·W positions and returned in that shape.
class AttentionImpl : public detail::BoundCloneable<AttentionImpl> {
 public:
  /// Builds the projections.
  explicit AttentionImpl(AttentionOptions options) : options(std::move(options)) { reset(); }

  /// Registers group_norm (if any), to_q, to_k, to_v and to_out (Linear, Dropout).
  void reset() override {
    const auto& o = options;
    TORCH_CHECK(o.query_dim() > 0 && o.heads() > 0 && o.dim_head() > 0,
                "Attention: query_dim, heads and dim_head must be positive, got ", o.query_dim(),
                ", ", o.heads(), ", ", o.dim_head());
    const int64_t inner = o.heads() * o.dim_head();
    const int64_t context = o.cross_attention_dim() > 0 ? o.cross_attention_dim() : o.query_dim();
    if (o.norm_num_groups() > 0) {
      group_norm = register_module(
          "group_norm",
          torch::nn::GroupNorm(
              torch::nn::GroupNormOptions(o.norm_num_groups(), o.query_dim()).eps(o.eps())));
    }
    to_q = register_module(
        "to_q", torch::nn::Linear(torch::nn::LinearOptions(o.query_dim(), inner).bias(o.bias())));
    to_k = register_module(
        "to_k", torch::nn::Linear(torch::nn::LinearOptions(context, inner).bias(o.bias())));
    to_v = register_module(
        "to_v", torch::nn::Linear(torch::nn::LinearOptions(context, inner).bias(o.bias())));
    to_out = register_module("to_out", torch::nn::ModuleList());
    to_out->push_back(torch::nn::Linear(inner, o.query_dim()));
    // Dropout p = 0 in every SD configuration: kept for diffusers' layout, not called.
    to_out->push_back(torch::nn::Dropout(0.0));
    bind();
  }

  /// Re-reads the typed holder of `to_out.0` (see `detail::BoundCloneable`).
  void bind() {
    out_proj = std::dynamic_pointer_cast<torch::nn::LinearImpl>(to_out->ptr(0));
    TORCH_CHECK(!out_proj.is_empty(), "Attention: to_out.0 is a ", to_out->ptr(0)->name(),
                ", not a Linear");
  }

  /// x [B, L, query_dim] (context [B, Lc, cross_attention_dim], or none for self-attention)
  /// -> [B, L, query_dim]; or x [B, C, H, W] -> [B, C, H, W].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {}) {
    if (x.dim() == 4) return forward_spatial(x);
    TORCH_CHECK(x.dim() == 3 && x.size(2) == options.query_dim(),
                "Attention: expected hidden states [B, L, ", options.query_dim(), "], got ",
                x.sizes());
    auto h = group_norm.is_empty() ? x : group_norm(x.transpose(1, 2)).transpose(1, 2);
    const torch::Tensor& kv = context.defined() ? context : h;
    auto out = linear(out_proj, functional::multi_head_attention(linear(to_q, h), linear(to_k, kv),
                                                                 linear(to_v, kv), options.heads()));
    if (options.residual_connection()) out.add_(x);  // to_out's fresh output
    return out;
  }

  /// Prints `sd::Attention(query_dim=320, heads=8, dim_head=40, cross_attention_dim=768)`.
  void pretty_print(std::ostream& stream) const override {
    const auto& o = options;
    stream << "sd::Attention(query_dim=" << o.query_dim() << ", heads=" << o.heads()
           << ", dim_head=" << o.dim_head();
    if (o.cross_attention_dim() > 0) stream << ", cross_attention_dim=" << o.cross_attention_dim();
    if (o.bias()) stream << ", bias=true";
    if (o.norm_num_groups() > 0) stream << ", norm_num_groups=" << o.norm_num_groups();
    if (o.residual_connection()) stream << ", residual_connection=true";
    stream << ")";
  }

  /// The options it was built with.
  AttentionOptions options;
  /// GroupNorm on the input (the VAE's mid block only).
  torch::nn::GroupNorm group_norm{nullptr};
  /// Query projection.
  torch::nn::Linear to_q{nullptr};
  /// Key projection.
  torch::nn::Linear to_k{nullptr};
  /// Value projection.
  torch::nn::Linear to_v{nullptr};
  /// Output projection and dropout (`to_out.0`, `to_out.1`).
  torch::nn::ModuleList to_out{nullptr};
  /// Typed holder of `to_out.0`.
  torch::nn::Linear out_proj{nullptr};

 private:
  // [B, C, H, W]: GroupNorm over the image (the same groups as over [B, C, H·W]), attention
  // over the H·W positions, then back to the image and the residual.
  torch::Tensor forward_spatial(const torch::Tensor& x) {
    TORCH_CHECK(x.size(1) == options.query_dim(), "Attention: expected [B, ",
                options.query_dim(), ", H, W], got ", x.sizes());
    const int64_t b = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
    auto h = group_norm.is_empty() ? x : group_norm(x);
    h = h.flatten(2).transpose(1, 2);  // [B, C, H, W] -> [B, H·W, C]
    auto out = linear(out_proj, functional::multi_head_attention(linear(to_q, h), linear(to_k, h),
                                                                 linear(to_v, h), options.heads()));
    out = out.transpose(1, 2).reshape({b, c, height, width});  // [B, H·W, C] -> [B, C, H, W]
    return options.residual_connection() ? out + x : out;
  }
};

/// Holder of `AttentionImpl`.
TORCH_MODULE(Attention);

}  // namespace sd
