#pragma once
/// @file fused_ops.hpp
/// @brief GroupNorm + SiLU, GEGLU and LayerNorm on the fused CUDA kernels of
/// sd/kernels/fused_kernels.cuh, as autograd functions.
///
/// Why: the lean functions of lean_ops.hpp keep only their inputs but run the same ATen kernels
/// as the plain ops, one memory pass each, and recompute in the backward pass. These keep the
/// same tensors (the input; [N, G] statistics for the norm) and do the element-wise work of a
/// forward or a backward in one or two passes over the activation. LayerNorm is ATen's own
/// computation, in a kernel laid out for SD's short rows (one warp per row).
///
/// The kernels are compiled only where LibTorch has CUDA and CMake finds nvcc: there the build
/// defines SCEDIT_FUSED_KERNELS=1 and links `scedit_fused_kernels`. Elsewhere `available()` is
/// false and the functions here refuse with a message that says so. Both compute in x's dtype
/// (float32 arithmetic, one rounding) also under autocast, as `norm-dtype` does.

#ifndef SCEDIT_FUSED_KERNELS
#define SCEDIT_FUSED_KERNELS 0
#endif
// Defined to 1 only by tests/kernels_emulated.cpp, which compiles the kernels for the host under
// an emulation of CUDA's threads: there these functions run on CPU tensors.
#ifndef SCEDIT_FUSED_KERNELS_EMULATED
#define SCEDIT_FUSED_KERNELS_EMULATED 0
#endif

#include <scedit/compat.hpp>

#include <torch/torch.h>

#include <string>

#if SCEDIT_FUSED_KERNELS && !SCEDIT_FUSED_KERNELS_EMULATED
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#if SCEDIT_FUSED_KERNELS
#include <sd/kernels/fused_kernels.h>
#endif

namespace sd::fused {

/// Whether this build has the fused CUDA kernels.
constexpr bool available() { return SCEDIT_FUSED_KERNELS != 0; }

/// Where the kernels run: CUDA (the CPU only under the tests' emulation).
constexpr torch::DeviceType kernel_device_type() { return SCEDIT_FUSED_KERNELS_EMULATED ? torch::kCPU : torch::kCUDA; }

/// Whether tensors on `device` can use the fused kernels in this build.
inline bool usable(const torch::Device& device) { return available() && device.type() == kernel_device_type(); }

/// Fails, naming `what`, unless tensors on `device` can use the fused kernels.
inline void check_usable(const torch::Device& device, const std::string& what) {
  TORCH_CHECK(available(), what, ": this build has no fused CUDA kernels (they are built where ",
              "LibTorch has CUDA and CMake finds nvcc, unless -DSCEDIT_FUSED_KERNELS=OFF)");
  TORCH_CHECK(device.type() == kernel_device_type(), what, ": the fused kernels run on ",
              SCEDIT_FUSED_KERNELS_EMULATED ? "CPU (emulated)" : "CUDA", " tensors, not on ", device.str());
}

#if SCEDIT_FUSED_KERNELS
namespace detail {

#if SCEDIT_FUSED_KERNELS_EMULATED
/// Nothing to switch on the host.
struct DeviceGuard {
  explicit DeviceGuard(const torch::Device&) {}
};
inline cudaStream_t current_stream(const torch::Tensor&) { return nullptr; }
#else
/// Makes the tensor's GPU the current one while the kernels are enqueued.
using DeviceGuard = c10::cuda::CUDAGuard;
/// The stream the caller's work is ordered on (a CUDA graph's capture stream while capturing).
inline cudaStream_t current_stream(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}
#endif

/// The kernels' element type of `t`; fails, naming `op`, for any other dtype.
inline kernels::ElementType element_type(const torch::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return kernels::ElementType::kFloat32;
    case torch::kBFloat16: return kernels::ElementType::kBFloat16;
    case torch::kFloat16: return kernels::ElementType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": the fused kernels take float32, bfloat16 or float16 tensors, not ", t.scalar_type());
  }
}

/// A norm's affine parameter as contiguous float32 (undefined stays undefined).
inline torch::Tensor affine_float(const torch::Tensor& parameter) {
  return parameter.defined() ? parameter.to(torch::kFloat32).contiguous() : parameter;
}

/// `t` as an optional argument of an autograd function (which takes no undefined tensors).
inline c10::optional<torch::Tensor> optional_of(const torch::Tensor& t) {
  return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}

/// The float32 data of `t`, or null for an undefined tensor (no affine parameter).
inline const float* data_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

/// Saves what a norm's backward needs (x, the float32 affine parameters, the statistics) and the
/// dtype its affine gradients take: that of `weight`, else `bias`.
inline void save_norm(torch::autograd::AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                      const torch::Tensor& bias, const torch::Tensor& weight_f, const torch::Tensor& bias_f,
                      const torch::Tensor& mean, const torch::Tensor& rstd) {
  ctx->save_for_backward({input, weight_f, bias_f, mean, rstd});
  const auto& affine = weight.defined() ? weight : bias;
  if (affine.defined()) ctx->saved_data["affine_dtype"] = static_cast<int64_t>(affine.scalar_type());
}

/// The dtype `save_norm` recorded for the affine gradients.
inline torch::ScalarType affine_dtype(torch::autograd::AutogradContext* ctx) {
  return static_cast<torch::ScalarType>(ctx->saved_data["affine_dtype"].toInt());
}

/// The kernels' view of a GroupNorm of `groups` groups over x [N, C, *spatial].
inline kernels::GroupNormShape norm_shape(const torch::Tensor& x, int64_t groups) {
  return {x.size(0), x.size(1), c10::multiply_integers(x.sizes().slice(2)), groups};
}

/// `silu(group_norm(x))` saving x, the affine parameters as float32 (converted once, for both
/// passes) and the [N, G] mean and rstd.
struct GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
  /// x [N, C, *spatial] -> [N, C, *spatial], in x's dtype.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const c10::optional<torch::Tensor>& weight_or_none,
                               const c10::optional<torch::Tensor>& bias_or_none, int64_t groups, double eps) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const DeviceGuard on_device(x.device());
    const auto weight = weight_or_none.value_or(torch::Tensor()), bias = bias_or_none.value_or(torch::Tensor());
    const auto input = x.contiguous();
    const auto shape = norm_shape(input, groups);
    const auto stats = input.options().dtype(torch::kFloat32);
    auto mean = torch::empty({shape.batch, groups}, stats), rstd = torch::empty({shape.batch, groups}, stats);
    auto workspace = torch::empty({2 * shape.batch * shape.channels}, stats);
    auto y = torch::empty_like(input, at::MemoryFormat::Contiguous);
    const auto weight_f = affine_float(weight), bias_f = affine_float(bias);
    kernels::group_norm_silu_forward(element_type(input, "group_norm_silu"), input.data_ptr(), data_or_null(weight_f),
                                     data_or_null(bias_f), shape, static_cast<float>(eps), y.data_ptr(),
                                     mean.data_ptr<float>(), rstd.data_ptr<float>(), workspace.data_ptr<float>(),
                                     current_stream(input));
    save_norm(ctx, input, weight, bias, weight_f, bias_f, mean, rstd);
    ctx->saved_data["groups"] = groups;
    return y;
  }

  /// dx from the fused backward kernels; the affine gradients from their per-row sums.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const auto saved = ctx->get_saved_variables();
    const auto &input = saved[0], &weight_f = saved[1], &bias_f = saved[2], &mean = saved[3], &rstd = saved[4];
    const DeviceGuard on_device(input.device());
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const auto shape = norm_shape(input, groups);
    const auto grad_y = grads[0].to(input.scalar_type()).contiguous();
    const auto stats = input.options().dtype(torch::kFloat32);
    auto row_sums = torch::empty({2, shape.batch, shape.channels}, stats);  // Σ dz, Σ dz·x per (n, c)
    auto workspace = torch::empty({2 * shape.batch * groups}, stats);
    auto grad_x = torch::empty_like(input, at::MemoryFormat::Contiguous);
    kernels::group_norm_silu_backward(element_type(input, "group_norm_silu"), grad_y.data_ptr(), input.data_ptr(),
                                      data_or_null(weight_f), data_or_null(bias_f), mean.data_ptr<float>(),
                                      rstd.data_ptr<float>(), shape, grad_x.data_ptr(), row_sums[0].data_ptr<float>(),
                                      row_sums[1].data_ptr<float>(), workspace.data_ptr<float>(),
                                      current_stream(input));
    torch::Tensor grad_weight, grad_bias;
    if (weight_f.defined() && ctx->needs_input_grad(1)) {
      // Σ_n Σ_hw dz·x̂ = Σ_n rstd·(Σ dz·x − mean·Σ dz), the group's statistics per channel: [N, C].
      const int64_t per_group = shape.channels / groups;
      auto per_channel = [&](const torch::Tensor& stat) {
        return stat.unsqueeze(2).expand({shape.batch, groups, per_group}).reshape({shape.batch, shape.channels});
      };
      const auto per_row = (row_sums[1] - per_channel(mean) * row_sums[0]) * per_channel(rstd);
      grad_weight = per_row.sum(0).to(affine_dtype(ctx));
    }
    if (bias_f.defined() && ctx->needs_input_grad(2)) grad_bias = row_sums[0].sum(0).to(affine_dtype(ctx));
    return {grad_x, grad_weight, grad_bias, torch::Tensor(), torch::Tensor()};
  }
};

/// `a · gelu(g)` for `[a, g] = projected.chunk(2, -1)`, saving only `projected`.
struct GEGLUFunction : public torch::autograd::Function<GEGLUFunction> {
  /// projected [..., 2·D] -> [..., D].
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& projected) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const DeviceGuard on_device(projected.device());
    const auto input = projected.contiguous();
    const int64_t dim = input.size(-1) / 2, rows = input.numel() / std::max<int64_t>(2 * dim, 1);
    auto out_sizes = input.sizes().vec();
    out_sizes.back() = dim;
    auto out = torch::empty(out_sizes, input.options());
    kernels::geglu_forward(element_type(input, "geglu"), input.data_ptr(), rows, dim, out.data_ptr(),
                           current_stream(input));
    ctx->save_for_backward({input});
    return out;
  }

  /// [grad · gelu(g), grad · a · gelu'(g)] in one [..., 2·D] gradient.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto input = ctx->get_saved_variables()[0];
    const DeviceGuard on_device(input.device());
    const int64_t dim = input.size(-1) / 2, rows = input.numel() / std::max<int64_t>(2 * dim, 1);
    const auto grad_out = grads[0].to(input.scalar_type()).contiguous();
    auto grad_projected = torch::empty_like(input, at::MemoryFormat::Contiguous);
    kernels::geglu_backward(element_type(input, "geglu"), grad_out.data_ptr(), input.data_ptr(), rows, dim,
                            grad_projected.data_ptr(), current_stream(input));
    return {grad_projected};
  }
};

/// `layer_norm(x)` over its last `dim` elements, saving x, the affine parameters as float32 and
/// the per-row mean and rstd.
struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  /// x [..., *normalized_shape] -> the same shape, in x's dtype.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const c10::optional<torch::Tensor>& weight_or_none,
                               const c10::optional<torch::Tensor>& bias_or_none, int64_t dim, double eps) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const DeviceGuard on_device(x.device());
    const auto weight = weight_or_none.value_or(torch::Tensor()), bias = bias_or_none.value_or(torch::Tensor());
    const auto input = x.contiguous();
    const int64_t rows = input.numel() / dim;
    const auto stats = input.options().dtype(torch::kFloat32);
    auto mean = torch::empty({rows}, stats), rstd = torch::empty({rows}, stats);
    auto y = torch::empty_like(input, at::MemoryFormat::Contiguous);
    const auto weight_f = affine_float(weight), bias_f = affine_float(bias);
    kernels::layer_norm_forward(element_type(input, "layer_norm"), input.data_ptr(), data_or_null(weight_f),
                                data_or_null(bias_f), rows, dim, static_cast<float>(eps), y.data_ptr(),
                                mean.data_ptr<float>(), rstd.data_ptr<float>(), current_stream(input));
    save_norm(ctx, input, weight, bias, weight_f, bias_f, mean, rstd);
    ctx->saved_data["dim"] = dim;
    return y;
  }

  /// dx from the fused kernel; the affine gradients (frozen in SD training) with ATen ops.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    scedit::compat::AutocastExcluded in_input_dtype;
    const auto saved = ctx->get_saved_variables();
    const auto &input = saved[0], &weight_f = saved[1], &bias_f = saved[2], &mean = saved[3], &rstd = saved[4];
    const DeviceGuard on_device(input.device());
    const int64_t dim = ctx->saved_data["dim"].toInt(), rows = input.numel() / dim;
    const auto grad_y = grads[0].to(input.scalar_type()).contiguous();
    auto grad_x = torch::empty_like(input, at::MemoryFormat::Contiguous);
    kernels::layer_norm_backward(element_type(input, "layer_norm"), grad_y.data_ptr(), input.data_ptr(),
                                 data_or_null(weight_f), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, dim,
                                 grad_x.data_ptr(), current_stream(input));
    torch::Tensor grad_weight, grad_bias;
    const bool weight_grad = weight_f.defined() && ctx->needs_input_grad(1);
    const bool bias_grad = bias_f.defined() && ctx->needs_input_grad(2);
    if (weight_grad || bias_grad) {
      const auto dtype = affine_dtype(ctx);
      const auto dy = grad_y.reshape({rows, dim}).to(torch::kFloat32);  // [rows, dim]
      if (weight_grad) {
        const auto normalized = (input.reshape({rows, dim}).to(torch::kFloat32) - mean.unsqueeze(1)) * rstd.unsqueeze(1);
        grad_weight = (dy * normalized).sum(0).reshape(weight_f.sizes()).to(dtype);
      }
      if (bias_grad) grad_bias = dy.sum(0).reshape(bias_f.sizes()).to(dtype);
    }
    return {grad_x, grad_weight, grad_bias, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace detail
#endif

/// `silu(norm(x))` for a GroupNorm `norm` on the fused kernels (x [N, C, *spatial] on CUDA),
/// keeping x and [N, G] statistics for the backward pass.
inline torch::Tensor group_norm_silu(const torch::Tensor& x, const torch::nn::GroupNormImpl& norm) {
  check_usable(x.device(), "fused group_norm_silu");
  const auto& o = norm.options;
  TORCH_CHECK(x.dim() >= 2 && x.size(1) == o.num_channels(), "fused group_norm_silu: input ", x.sizes(),
              " does not have ", o.num_channels(), " channels in dim 1");
#if SCEDIT_FUSED_KERNELS
  return detail::GroupNormSiLUFunction::apply(x, detail::optional_of(norm.weight), detail::optional_of(norm.bias),
                                              o.num_groups(), o.eps());
#else
  return {};  // unreachable: check_usable threw
#endif
}

/// GEGLU's gate on a projection [..., 2·D] -> [..., D] on the fused kernels (CUDA), keeping
/// only the projection for the backward pass.
inline torch::Tensor geglu(const torch::Tensor& projected) {
  check_usable(projected.device(), "fused geglu");
  TORCH_CHECK(projected.dim() >= 1 && projected.size(-1) % 2 == 0, "fused geglu: the last dimension of ",
              projected.sizes(), " must be even");
#if SCEDIT_FUSED_KERNELS
  return detail::GEGLUFunction::apply(projected);
#else
  return {};  // unreachable: check_usable threw
#endif
}

/// `norm(x)` for a LayerNorm `norm` on the fused kernels (x [..., *normalized_shape] on CUDA),
/// keeping x and per-row statistics for the backward pass.
inline torch::Tensor layer_norm(const torch::Tensor& x, const torch::nn::LayerNormImpl& norm) {
  check_usable(x.device(), "fused layer_norm");
  const auto& o = norm.options;
  const auto& shape = o.normalized_shape();
  const auto rank = static_cast<int64_t>(shape.size());
  TORCH_CHECK(x.dim() >= rank && x.sizes().slice(x.dim() - rank).vec() == shape, "fused layer_norm: input ",
              x.sizes(), " does not end in the normalized shape ", c10::IntArrayRef(shape));
  TORCH_CHECK(c10::multiply_integers(shape) > 0, "fused layer_norm: empty normalized shape ", c10::IntArrayRef(shape));
#if SCEDIT_FUSED_KERNELS
  return detail::LayerNormFunction::apply(x, detail::optional_of(norm.weight), detail::optional_of(norm.bias),
                                          c10::multiply_integers(shape), o.eps());
#else
  return {};  // unreachable: check_usable threw
#endif
}

}  // namespace sd::fused
