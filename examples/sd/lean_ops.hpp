#pragma once
/// @file lean_ops.hpp
/// @brief Training-memory levers for the UNet's activations: GroupNorm + SiLU and GEGLU as
/// autograd functions that keep only their input and recompute the rest in the backward pass,
/// norms computed in the activation dtype under autocast, and the transformers' feed-forward
/// recomputed in the backward pass.
///
/// Why: with tuners on the skips, the decoder's saved activations are most of SCEdit's training
/// memory. Under CUDA autocast `group_norm` and `layer_norm` run in float32, so a GroupNorm →
/// SiLU pair on bf16 activations keeps a float32 copy of its input and a float32 normalised
/// tensor (8 bytes per element) besides the bf16 input it came from. The functions here keep the
/// bf16 input only (2 bytes, often shared with another op's saved input) and recompute the
/// cheap, memory-bound rest. The norm kernels accumulate in float32 whatever their input dtype.
///
/// In float32 every function here computes exactly what the plain ops compute (the same ATen
/// kernels, forward and backward); under bf16/fp16 autocast they differ only in rounding the
/// normalised tensor to the activation dtype. The fused CUDA variants (fused_ops.hpp) keep the
/// same tensors and do each pass's element-wise work in one kernel.

#include <scedit/compat.hpp>
#include <sd/fused_ops.hpp>

#include <torch/torch.h>

#include <array>

namespace sd {

/// Which of the lean variants a module's forward uses (all off: the plain ops).
struct LeanActivations {
  /// GroupNorm + SiLU fused in one autograd node that saves only its input.
  bool group_norm_silu = false;
  /// GEGLU's `a · GELU(g)` in one autograd node that saves only the projection.
  bool geglu = false;
  /// LayerNorm and the remaining GroupNorms in the activation dtype instead of autocast's float32.
  bool norms_in_activation_dtype = false;
  /// Each transformer's feed-forward keeps only its input and is recomputed in the backward pass
  /// (`scedit::checkpoint`): its [tokens, 8·dim] hidden activations are the largest a transformer
  /// keeps, and recomputing them costs two GEMMs and a GEGLU per block.
  bool recompute_feed_forward = false;
  /// GroupNorm + SiLU on the fused CUDA kernels (`fused::group_norm_silu`): what
  /// `group_norm_silu` keeps, in one pass forward and two backward. CUDA builds only.
  bool fused_norm_silu = false;
  /// GEGLU's gate on the fused CUDA kernels (`fused::geglu`): what `geglu` keeps, one pass each
  /// way. CUDA builds only.
  bool fused_geglu = false;
  /// The transformers' LayerNorms on the fused CUDA kernel (`fused::layer_norm`), in the
  /// activation dtype as `norms_in_activation_dtype`. CUDA builds only.
  bool fused_layer_norm = false;
};

namespace detail {

/// The norm's affine parameters in the dtype of `x` (no copy when they already match).
inline torch::Tensor affine_as(const torch::Tensor& parameter, const torch::Tensor& x) {
  return parameter.defined() ? parameter.to(x.scalar_type()) : parameter;
}

/// H·W·… of a [B, C, *spatial] tensor (1 for [B, C]).
inline int64_t spatial_size(const torch::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(2));
}

/// `silu(group_norm(x))` keeping only x, weight and bias for the backward pass.
struct GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
  /// x [B, C, *spatial] -> [B, C, *spatial], in x's dtype.
  /// (weight and bias are optionals: an undefined Tensor argument is not allowed here.)
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const c10::optional<torch::Tensor>& weight_or_none,
                               const c10::optional<torch::Tensor>& bias_or_none, int64_t groups,
                               double eps) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const auto weight = weight_or_none.value_or(torch::Tensor());
    const auto bias = bias_or_none.value_or(torch::Tensor());
    auto input = x.contiguous();
    auto normalized = std::get<0>(at::native_group_norm(input, affine_as(weight, input),
                                                        affine_as(bias, input), input.size(0),
                                                        input.size(1), spatial_size(input), groups, eps));
    ctx->save_for_backward({input, weight, bias});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    return torch::silu_(normalized);  // in place: the normalised tensor is not kept
  }

  /// Recomputes the normalised tensor, then SiLU's and GroupNorm's backward kernels.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto weight = affine_as(saved[1], input), bias = affine_as(saved[2], input);
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t n = input.size(0), c = input.size(1), hw = spatial_size(input);
    auto recomputed = at::native_group_norm(input, weight, bias, n, c, hw, groups, eps);
    auto grad_normalized = at::silu_backward(grads[0].contiguous(), std::get<0>(recomputed));
    const std::array<bool, 3> mask{ctx->needs_input_grad(0),
                                   saved[1].defined() && ctx->needs_input_grad(1),
                                   saved[2].defined() && ctx->needs_input_grad(2)};
    auto g = at::native_group_norm_backward(grad_normalized, input, std::get<1>(recomputed),
                                            std::get<2>(recomputed), weight, n, c, hw, groups, mask);
    auto to_parameter_dtype = [](const torch::Tensor& grad, const torch::Tensor& parameter) {
      return grad.defined() ? grad.to(parameter.scalar_type()) : grad;
    };
    return {std::get<0>(g), to_parameter_dtype(std::get<1>(g), saved[1]),
            to_parameter_dtype(std::get<2>(g), saved[2]), torch::Tensor(), torch::Tensor()};
  }
};

/// `a · gelu(g)` for `[a, g] = projected.chunk(2, -1)`, keeping only `projected`.
struct GEGLUFunction : public torch::autograd::Function<GEGLUFunction> {
  /// projected [..., 2·D] -> [..., D].
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& projected) {
    auto parts = projected.chunk(2, -1);
    ctx->save_for_backward({projected});
    return parts[0] * torch::gelu(parts[1]);
  }

  /// d/da = grad · gelu(g); d/dg = gelu'(g) · grad · a; written into one [..., 2·D] gradient.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto projected = ctx->get_saved_variables()[0];
    const auto parts = projected.chunk(2, -1);
    const auto& grad = grads[0];
    auto grad_projected = torch::empty_like(projected, at::MemoryFormat::Contiguous);
    auto grad_parts = grad_projected.chunk(2, -1);
    torch::mul_out(grad_parts[0], grad, torch::gelu(parts[1]));
    grad_parts[1].copy_(at::gelu_backward(grad * parts[0], parts[1]));
    return {grad_projected};
  }
};

}  // namespace detail

/// `silu(norm(x))` for a GroupNorm `norm`, computed in x's dtype and keeping only x for the
/// backward pass (the normalised tensor is recomputed there). x [B, C, *spatial].
inline torch::Tensor group_norm_silu(const torch::Tensor& x, const torch::nn::GroupNormImpl& norm) {
  const auto& o = norm.options;
  TORCH_CHECK(x.dim() >= 2 && x.size(1) == o.num_channels(), "group_norm_silu: input ", x.sizes(),
              " does not have ", o.num_channels(), " channels in dim 1");
  auto optional = [](const torch::Tensor& t) {
    return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  return detail::GroupNormSiLUFunction::apply(x, optional(norm.weight), optional(norm.bias),
                                              o.num_groups(), o.eps());
}

/// GEGLU's gate on a projection [..., 2·D] -> [..., D], keeping only the projection for the
/// backward pass (GELU of the gate is recomputed there).
inline torch::Tensor geglu(const torch::Tensor& projected) {
  TORCH_CHECK(projected.dim() >= 1 && projected.size(-1) % 2 == 0,
              "geglu: the last dimension of ", projected.sizes(), " must be even");
  return detail::GEGLUFunction::apply(projected);
}

/// `norm(x)` for a GroupNorm in x's dtype, also under autocast (which would compute it in float32).
inline torch::Tensor group_norm_in_input_dtype(const torch::Tensor& x, const torch::nn::GroupNormImpl& norm) {
  scedit::compat::AutocastExcluded in_input_dtype;
  const auto& o = norm.options;
  return torch::group_norm(x, o.num_groups(), detail::affine_as(norm.weight, x),
                           detail::affine_as(norm.bias, x), o.eps());
}

/// `norm(x)` for a LayerNorm in x's dtype, also under autocast (which would compute it in float32).
inline torch::Tensor layer_norm_in_input_dtype(const torch::Tensor& x, const torch::nn::LayerNormImpl& norm) {
  scedit::compat::AutocastExcluded in_input_dtype;
  const auto& o = norm.options;
  return torch::layer_norm(x, o.normalized_shape(), detail::affine_as(norm.weight, x),
                           detail::affine_as(norm.bias, x), o.eps());
}

/// `norm(x)` for a GroupNorm without an activation after it, the way `lean` asks: in x's dtype,
/// or the plain op.
inline torch::Tensor group_norm(const torch::Tensor& x, torch::nn::GroupNormImpl& norm, const LeanActivations& lean) {
  return lean.norms_in_activation_dtype ? group_norm_in_input_dtype(x, norm) : norm.forward(x);
}

/// `norm(x)` for a LayerNorm, the way `lean` asks: the fused kernel, in x's dtype, or the plain op.
inline torch::Tensor layer_norm(const torch::Tensor& x, torch::nn::LayerNormImpl& norm, const LeanActivations& lean) {
  if (lean.fused_layer_norm) return fused::layer_norm(x, norm);
  if (lean.norms_in_activation_dtype) return layer_norm_in_input_dtype(x, norm);
  return norm.forward(x);
}

/// `silu(norm(x))` for a GroupNorm, the way `lean` asks: the fused kernels, one lean node
/// (`group_norm_silu`), the norm in x's dtype, or the plain ops.
inline torch::Tensor norm_silu(const torch::Tensor& x, torch::nn::GroupNormImpl& norm,
                               const LeanActivations& lean) {
  if (lean.fused_norm_silu) return fused::group_norm_silu(x, norm);
  if (lean.group_norm_silu) return group_norm_silu(x, norm);
  if (lean.norms_in_activation_dtype) return torch::silu(group_norm_in_input_dtype(x, norm));
  return torch::silu(norm.forward(x));
}

/// GEGLU's gate `a · gelu(g)` on a projection [..., 2·D] -> [..., D], the way `lean` asks: the
/// fused kernels, one lean node (`geglu`), or the plain ops.
inline torch::Tensor geglu_gate(const torch::Tensor& projected, const LeanActivations& lean) {
  if (lean.fused_geglu) return fused::geglu(projected);
  if (lean.geglu) return geglu(projected);
  auto parts = projected.chunk(2, -1);  // -> 2 × [..., D]
  return parts[0] * torch::gelu(parts[1]);
}

}  // namespace sd
