#pragma once
/// @file compat.hpp
/// @brief The few places where LibTorch 1.13 and 2.x differ: fused attention, autocast, and
/// the dtypes only 2.x has.
///
/// Everything version-dependent lives here so the rest of the library reads the same on both.

#include <torch/torch.h>
#include <torch/version.h>
#include <ATen/ExpandUtils.h>
#include <ATen/autocast_mode.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

/// True on LibTorch 2.x and later.
#define SCEDIT_TORCH_2 (TORCH_VERSION_MAJOR >= 2)
/// True on LibTorch `major.minor` and later.
#define SCEDIT_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

/// `c10::Allocator::allocate` lost its `const` in LibTorch 2.3 (which also added `copy_data`):
/// write `DataPtr allocate(size_t) SCEDIT_ALLOCATOR_ALLOCATE_CONST override`.
#if SCEDIT_TORCH_AT_LEAST(2, 3)
#define SCEDIT_ALLOCATOR_ALLOCATE_CONST
#else
#define SCEDIT_ALLOCATOR_ALLOCATE_CONST const
#endif

namespace scedit {
namespace compat {

namespace detail {

/// `softmax(q·kᵀ / √D + mask)` (the upper triangle masked when `is_causal`): [B, h, Lq, Lk].
/// The scale multiplies q: one pass over [B, h, Lq, D] rather than over the scores, forward and
/// backward.
inline torch::Tensor attention_probabilities(const torch::Tensor& q, const torch::Tensor& k,
                                             const torch::Tensor& attn_mask, bool is_causal) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q * scale, k.transpose(-2, -1));  // [B, h, Lq, Lk]
  if (is_causal) {
    auto causal = torch::ones({q.size(-2), k.size(-2)}, q.options().dtype(torch::kBool)).triu(1);
    scores = scores.masked_fill(causal, -std::numeric_limits<double>::infinity());
  }
  if (attn_mask.defined()) scores = scores + attn_mask;
  return scores.softmax(-1);
}

/// Attention that keeps only q, k, v and its output for the backward pass and recomputes the
/// probabilities there, as the fused kernels of LibTorch 2.x do: on 1.13 the textbook form would
/// otherwise keep a [B, h, Lq, Lk] tensor per attention, most of a UNet's training memory.
struct RecomputedAttention : public torch::autograd::Function<RecomputedAttention> {
  /// q [B, h, Lq, D], k [B, h, Lk, D], v [B, h, Lk, Dv] -> [B, h, Lq, Dv].
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q,
                               const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& attn_mask, bool is_causal);
  /// dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)), dQ = dS·K / √D, dK = dSᵀ·Q / √D (the scale on
  /// dQ and dK, not on dS: the smaller tensors).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads);
};

}  // namespace detail

/// On LibTorch 1.13, attention whose [B, h, Lq, Lk] probabilities would take more bytes than this
/// recomputes them in the backward pass instead of keeping them.
constexpr int64_t kRecomputeAttentionAbove = int64_t{8} << 20;

/// Scaled dot-product attention over [B, heads, L, D] tensors.
///
/// On LibTorch 2.x this is the fused kernel (flash / memory-efficient where the device allows);
/// on 1.13 it is the exact textbook computation `softmax(q·kᵀ / √D + mask) · v`, which, when
/// gradients are wanted and the probabilities are larger than `kRecomputeAttentionAbove`,
/// recomputes them in the backward pass instead of keeping them (`detail::RecomputedAttention`).
/// `attn_mask` is additive (float, no gradient) and broadcastable to [B, heads, Lq, Lk];
/// `is_causal` masks the upper triangle. Both together are not allowed (as in PyTorch).
inline torch::Tensor scaled_dot_product_attention(const torch::Tensor& q, const torch::Tensor& k,
                                                  const torch::Tensor& v,
                                                  const torch::Tensor& attn_mask = {},
                                                  bool is_causal = false) {
  TORCH_CHECK(!(attn_mask.defined() && is_causal),
              "scaled_dot_product_attention: pass either attn_mask or is_causal, not both");
#if SCEDIT_TORCH_2
  return at::scaled_dot_product_attention(
      q, k, v, attn_mask.defined() ? std::optional<at::Tensor>(attn_mask) : std::nullopt, 0.0,
      is_causal);
#else
  // Small probability tensors are cheaper kept than recomputed (the tiny model trains ~15% faster
  // keeping them); large ones are most of the training memory.
  const bool wants_grad = q.requires_grad() || k.requires_grad() || v.requires_grad();
  const int64_t probability_bytes = q.numel() / q.size(-1) * k.size(-2) * q.element_size();
  // Heads split off a [B, L, h·D] projection are strided views; 1.13's CPU matmuls, forward and
  // backward, run them about 20% slower than contiguous copies (bench/RESULTS.md, v0.10).
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  if (torch::GradMode::is_enabled() && wants_grad && probability_bytes > kRecomputeAttentionAbove) {
    return detail::RecomputedAttention::apply(
        qc, kc, vc, attn_mask.defined() ? c10::optional<torch::Tensor>(attn_mask) : c10::nullopt, is_causal);
  }
  return torch::matmul(detail::attention_probabilities(qc, kc, attn_mask, is_causal), vc);
#endif
}

/// Turns autocast on or off for one device type and returns the previous state.
inline bool set_autocast_enabled(torch::DeviceType device, bool enabled) {
#if SCEDIT_TORCH_2
  const bool previous = at::autocast::is_autocast_enabled(device);
  at::autocast::set_autocast_enabled(device, enabled);
#else
  bool previous;
  if (device == torch::kCUDA) {
    previous = at::autocast::is_enabled();
    at::autocast::set_enabled(enabled);
  } else {
    previous = at::autocast::is_cpu_enabled();
    at::autocast::set_cpu_enabled(enabled);
  }
#endif
  return previous;
}

/// Sets the dtype autocast uses on a device type (bf16 or fp16).
inline void set_autocast_dtype(torch::DeviceType device, torch::ScalarType dtype) {
#if SCEDIT_TORCH_2
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == torch::kCUDA) {
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

/// Whether autocast is on for a device type, and the dtype it computes in.
struct AutocastState {
  /// Autocast enabled on the device type.
  bool enabled = false;
  /// Its compute dtype (meaningful when enabled).
  torch::ScalarType dtype = torch::kFloat32;
};

/// The current autocast state of `device` (to restore it later, e.g. when recomputing).
inline AutocastState autocast_state(torch::DeviceType device) {
#if SCEDIT_TORCH_2
  return {at::autocast::is_autocast_enabled(device), at::autocast::get_autocast_dtype(device)};
#else
  if (device == torch::kCUDA) return {at::autocast::is_enabled(), at::autocast::get_autocast_gpu_dtype()};
  return {at::autocast::is_cpu_enabled(), at::autocast::get_autocast_cpu_dtype()};
#endif
}

/// RAII autocast region: on construction enables autocast for `device` with `dtype`
/// (a no-op when `dtype` is float32), restores the previous state on destruction.
class AutocastGuard {
 public:
  /// Enables autocast on `device` computing in `dtype` unless `dtype` is float32.
  AutocastGuard(torch::DeviceType device, torch::ScalarType dtype)
      : device_(device), active_(dtype != torch::kFloat32 && dtype != torch::kFloat64) {
    if (!active_) return;
    set_autocast_dtype(device_, dtype);
    previous_ = set_autocast_enabled(device_, true);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  ~AutocastGuard() {
    if (!active_) return;
    set_autocast_enabled(device_, previous_);
    at::autocast::clear_cache();
  }

 private:
  torch::DeviceType device_;
  bool active_;
  bool previous_ = false;
};

inline torch::Tensor detail::RecomputedAttention::forward(
    torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
    const torch::Tensor& v, const c10::optional<torch::Tensor>& attn_mask, bool is_causal) {
  // (The mask travels as an optional: an undefined Tensor argument is not allowed here.)
  const auto mask = attn_mask.value_or(torch::Tensor());
  auto out = torch::matmul(attention_probabilities(q, k, mask, is_causal), v);
  const auto autocast = autocast_state(q.device().type());
  ctx->save_for_backward({q, k, v, mask, out});
  ctx->saved_data["is_causal"] = is_causal;
  ctx->saved_data["autocast_dtype"] =
      static_cast<int64_t>(autocast.enabled ? autocast.dtype : torch::kFloat32);
  return out;
}

inline torch::autograd::variable_list detail::RecomputedAttention::backward(
    torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
  const auto saved = ctx->get_saved_variables();
  const auto &q = saved[0], &k = saved[1], &v = saved[2], &attn_mask = saved[3], &out = saved[4];
  // The forward's autocast state, so the recomputed probabilities are the forward's.
  AutocastGuard autocast(q.device().type(),
                         static_cast<torch::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
  const auto probs = attention_probabilities(q, k, attn_mask, ctx->saved_data["is_causal"].toBool());
  const auto& grad_out = grads[0];
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  torch::Tensor grad_q, grad_k, grad_v;
  if (ctx->needs_input_grad(2)) {
    grad_v = at::sum_to(torch::matmul(probs.transpose(-2, -1), grad_out), v.sizes());
  }
  if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
    auto grad_scores = torch::matmul(grad_out, v.transpose(-2, -1));  // dP, [B, h, Lq, Lk]
    grad_scores = probs * (grad_scores - (grad_out * out).sum(-1, /*keepdim=*/true));
    if (ctx->needs_input_grad(0)) grad_q = at::sum_to(torch::matmul(grad_scores, k) * scale, q.sizes());
    if (ctx->needs_input_grad(1)) {
      grad_k = at::sum_to(torch::matmul(grad_scores.transpose(-2, -1), q) * scale, k.sizes());
    }
  }
  return {grad_q, grad_k, grad_v, torch::Tensor(), torch::Tensor()};
}

/// The key of parameter `p` in `torch::optim::Optimizer::state()`: its TensorImpl's address, as
/// a string on LibTorch 1.13 and as the pointer on 2.x.
inline auto optimizer_state_key(const torch::Tensor& p) {
#if SCEDIT_TORCH_2
  return static_cast<void*>(p.unsafeGetTensorImpl());
#else
  return c10::guts::to_string(p.unsafeGetTensorImpl());
#endif
}

/// Restricts the fused kernels `scaled_dot_product_attention` may pick on CUDA to one kind:
/// `flash`, `efficient` (memory-efficient), `cudnn` or `math`; `auto` keeps LibTorch's choice.
/// A process-wide setting: call it once, before training. Choosing needs LibTorch 2.5 or newer
/// (1.13 has only the textbook computation); with one kind allowed, an input it cannot take is an
/// error rather than a silent fallback.
inline void set_attention_kernels(const std::string& kind) {
  TORCH_CHECK(kind == "auto" || kind == "flash" || kind == "efficient" || kind == "cudnn" || kind == "math",
              "attention kernels: '", kind, "' is not auto, flash, efficient, cudnn or math");
  if (kind == "auto") return;
#if SCEDIT_TORCH_AT_LEAST(2, 5)
  auto& context = at::globalContext();
  context.setSDPUseFlash(kind == "flash");
  context.setSDPUseMemEfficient(kind == "efficient");
  context.setSDPUseCuDNN(kind == "cudnn");
  context.setSDPUseMath(kind == "math");
#else
  TORCH_CHECK(false, "attention kernels '", kind, "': choosing them needs LibTorch 2.5 or newer, this is ",
              TORCH_VERSION);
#endif
}

/// `t *= factor` for every tensor of `tensors`, with `factor` a 0-dim tensor of their dtype on
/// their device: one multi-tensor kernel on LibTorch 2.x, one kernel per tensor on 1.13 (which
/// has no tensor-factor `_foreach_mul_`). Reads nothing on the host (CUDA-graph safe).
inline void foreach_mul_(at::TensorList tensors, const torch::Tensor& factor) {
  TORCH_CHECK(factor.dim() == 0, "foreach_mul_: the factor must be a 0-dim tensor, got ", factor.sizes());
#if SCEDIT_TORCH_AT_LEAST(2, 1)
  at::_foreach_mul_(tensors, factor);
#else
  for (const auto& t : tensors) t.mul_(factor);
#endif
}

/// A dtype LibTorch 2.x has and 1.13 lacks, by its Python name as a `torch.save` file names it
/// (`float8_e4m3fn`, `float8_e5m2` from 2.1; `uint16`, `uint32`, `uint64` from 2.3); nothing on
/// older versions or for any other name.
inline std::optional<torch::ScalarType> dtype_added_in_torch_2(const std::string& name) {
#if SCEDIT_TORCH_AT_LEAST(2, 1)
  if (name == "float8_e4m3fn") return c10::ScalarType::Float8_e4m3fn;
  if (name == "float8_e5m2") return c10::ScalarType::Float8_e5m2;
#endif
#if SCEDIT_TORCH_AT_LEAST(2, 3)
  if (name == "uint16") return c10::ScalarType::UInt16;
  if (name == "uint32") return c10::ScalarType::UInt32;
  if (name == "uint64") return c10::ScalarType::UInt64;
#endif
  (void)name;
  return std::nullopt;
}

/// RAII region where autocast does not apply: ops run in the dtypes of their inputs (for example
/// a norm kept in bf16 on bf16 activations, where CUDA autocast would compute it in float32).
/// The same dispatcher guard on LibTorch 1.13 and 2.x.
class AutocastExcluded {
 public:
  AutocastExcluded() = default;
  AutocastExcluded(const AutocastExcluded&) = delete;
  AutocastExcluded& operator=(const AutocastExcluded&) = delete;

 private:
  c10::impl::ExcludeDispatchKeyGuard guard_{c10::autocast_dispatch_keyset};
};

}  // namespace compat
}  // namespace scedit
