#pragma once
/// @file foreach_adamw.hpp
/// @brief `torch::optim::AdamW`'s step with multi-tensor ("foreach") kernels, and a capturable
/// form of it (step count and learning rate on the device) for CUDA graphs.
///
/// LibTorch's AdamW updates one parameter at a time: about ten kernels per tensor, so the 48
/// tensors of SD 1.5's SC-Tuners cost ~500 kernel launches per step, which shows at small batch
/// sizes. `foreach_adamw_step` does the same arithmetic, in the same order, on all of them at once
/// with ATen's `_foreach_*` ops (one launch per op on CUDA), and keeps its state in the optimizer
/// itself, so checkpoints (`torch::save(optimizer)`) and `optimizer.step()` work as before.
///
/// Example:
/// @code
/// torch::optim::AdamW optimizer(scedit::tuner_parameters(*unet), torch::optim::AdamWOptions(1e-4));
/// loss.backward();
/// scedit::foreach_adamw_step(optimizer);  // instead of optimizer.step()
/// @endcode

#include <scedit/compat.hpp>

#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <vector>

namespace scedit {

namespace detail {

/// `p`'s state in `optimizer`, made as `AdamW::step` makes it on a first step where missing.
inline torch::optim::AdamWParamState& adamw_state(torch::optim::AdamW& optimizer, const torch::Tensor& p) {
  auto& slot = optimizer.state()[compat::optimizer_state_key(p)];
  if (!slot) {
    auto fresh = std::make_unique<torch::optim::AdamWParamState>();
    fresh->step(0);
    fresh->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    fresh->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    slot = std::move(fresh);
  }
  return static_cast<torch::optim::AdamWParamState&>(*slot);
}

}  // namespace detail

/// One AdamW step over every parameter of `optimizer` that has a gradient, with the result of
/// `optimizer.step()` (bitwise on the CPU). Falls back to `optimizer.step()` where the
/// multi-tensor form does not apply: amsgrad, sparse gradients, or parameters of one group at
/// different step counts (some skipped an earlier step). Returns whether the multi-tensor path ran.
inline bool foreach_adamw_step(torch::optim::AdamW& optimizer) {
  torch::NoGradGuard no_grad;
  auto& state = optimizer.state();
  // Check every group before changing anything, so a fallback never runs on a half-made step.
  for (auto& group : optimizer.param_groups()) {
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
    int64_t step = -1;
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto it = state.find(compat::optimizer_state_key(p));
      const int64_t s = it == state.end() ? 0 : static_cast<torch::optim::AdamWParamState&>(*it->second).step();
      if (options.amsgrad() || p.grad().is_sparse() || (step >= 0 && s != step)) {
        optimizer.step();
        return false;
      }
      step = s;
    }
  }
  for (auto& group : optimizer.param_groups()) {
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
    int64_t step = 0;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& s = detail::adamw_state(optimizer, p);
      s.step(s.step() + 1);
      step = s.step();
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s.exp_avg());
      exp_avg_sqs.push_back(s.exp_avg_sq());
    }
    if (params.empty()) continue;
    const double beta1 = std::get<0>(options.betas()), beta2 = std::get<1>(options.betas());
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    if (options.weight_decay() != 0) at::_foreach_mul_(params, 1 - options.lr() * options.weight_decay());
    at::_foreach_mul_(exp_avgs, beta1);
    at::_foreach_add_(exp_avgs, grads, 1 - beta1);
    at::_foreach_mul_(exp_avg_sqs, beta2);
    at::_foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2);
    auto denoms = at::_foreach_sqrt(exp_avg_sqs);  // √v̂ + ε, as AdamW::step computes it
    at::_foreach_div_(denoms, std::sqrt(bias_correction2));
    at::_foreach_add_(denoms, options.eps());
    at::_foreach_addcdiv_(params, exp_avgs, denoms, -options.lr() / bias_correction1);
  }
  return true;
}

/// AdamW whose step count and learning rate live in tensors on the parameters' device, so a step
/// reads nothing on the host: the form CUDA graph capture needs. `AdamW::step` computes its bias
/// corrections on the host from an integer step count, and a captured graph would replay them
/// frozen; here they are computed by kernels from the device step count at replay time.
///
/// The moments stay in `optimizer`'s state (created here where missing), so checkpoints keep
/// working: call `sync()` before saving, which writes the device step count back into the
/// state. Construct it after loading a checkpoint into `optimizer` (it reads the step count and
/// holds the state's tensors). The arithmetic is `AdamW::step`'s; in float32 the results agree
/// to a few ulp (the bias corrections are rounded on the device instead of the host).
///
/// Example (one graph-safe training step):
/// @code
/// scedit::CapturableAdamW adamw(optimizer);
/// adamw.set_lr(schedule(step));  // outside the graph: a fill of the device tensor
/// loss.backward();
/// adamw.clip_grad_norm(1.0);     // optional, on the device too
/// adamw.step();
/// @endcode
class CapturableAdamW {
 public:
  /// Takes `optimizer`'s parameter groups as they are now. Refuses amsgrad, and a group whose
  /// parameters are at different step counts.
  explicit CapturableAdamW(torch::optim::AdamW& optimizer) : optimizer_(optimizer) {
    torch::NoGradGuard no_grad;
    for (auto& group : optimizer_.param_groups()) {
      const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
      TORCH_CHECK(!options.amsgrad(), "CapturableAdamW: amsgrad is not supported");
      if (group.params().empty()) continue;
      Group g;
      g.beta1 = std::get<0>(options.betas());
      g.beta2 = std::get<1>(options.betas());
      g.eps = options.eps();
      g.weight_decay = options.weight_decay();
      int64_t step = -1;
      for (const auto& p : group.params()) {
        auto& s = detail::adamw_state(optimizer_, p);
        TORCH_CHECK(step < 0 || s.step() == step, "CapturableAdamW: the parameters of one group are at "
                    "different step counts (", step, " and ", s.step(), "); it keeps one per group");
        TORCH_CHECK(p.device() == group.params().front().device() &&
                        p.scalar_type() == group.params().front().scalar_type(),
                    "CapturableAdamW: the parameters of one group must share a device and a dtype");
        step = s.step();
        g.params.push_back(p);
        g.exp_avgs.push_back(s.exp_avg());
        g.exp_avg_sqs.push_back(s.exp_avg_sq());
      }
      const auto scalar = torch::TensorOptions().dtype(torch::kFloat64).device(g.params.front().device());
      g.step = torch::full({}, static_cast<double>(step), scalar);
      g.lr = torch::full({}, options.lr(), scalar);
      groups_.push_back(std::move(g));
    }
  }

  /// Sets every group's learning rate (a fill of a device tensor: call it outside a captured graph,
  /// before replaying it). Also sets the optimizer's options, for checkpoints.
  void set_lr(double lr) { set_lr(std::vector<double>(optimizer_.param_groups().size(), lr)); }

  /// Sets the learning rate of each of the optimizer's groups, in order, as `set_lr(double)`.
  void set_lr(const std::vector<double>& lrs) {
    auto& groups = optimizer_.param_groups();
    TORCH_CHECK(lrs.size() == groups.size(), "CapturableAdamW::set_lr: ", lrs.size(),
                " learning rates for ", groups.size(), " parameter groups");
    size_t held = 0;  // groups_ skips empty groups
    for (size_t i = 0; i < groups.size(); ++i) {
      static_cast<torch::optim::AdamWOptions&>(groups[i].options()).lr(lrs[i]);
      if (!groups[i].params().empty()) groups_[held++].lr.fill_(lrs[i]);
    }
  }

  /// Scales the gradients so that their joint 2-norm is at most `max_norm`, as
  /// `torch::nn::utils::clip_grad_norm_` does, without reading the norm on the host.
  /// Returns the norm before clipping (0-dim, on the device).
  torch::Tensor clip_grad_norm(double max_norm) {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> grads, norms;
    for (const auto& g : groups_) {
      for (const auto& p : g.params) {
        grads.push_back(gradient_of(p));
        norms.push_back(grads.back().norm());
      }
    }
    auto total = torch::stack(norms).norm();
    auto factor = (max_norm / (total + 1e-6)).clamp_max(1.0);  // clip_grad_norm_'s coefficient
    compat::foreach_mul_(grads, factor.to(grads.front().scalar_type()));
    return total;
  }

  /// One AdamW step over every parameter (each must have a gradient).
  void step() {
    torch::NoGradGuard no_grad;
    for (auto& g : groups_) {
      std::vector<torch::Tensor> grads;
      for (const auto& p : g.params) grads.push_back(gradient_of(p));
      const auto dtype = g.params.front().scalar_type();
      g.step.add_(1);
      // [] float64 scalars on the device: the bias corrections of this step.
      auto bias_correction1 = 1 - torch::pow(g.beta1, g.step);
      auto bias_correction2 = 1 - torch::pow(g.beta2, g.step);
      if (g.weight_decay != 0) compat::foreach_mul_(g.params, (1 - g.lr * g.weight_decay).to(dtype));
      at::_foreach_mul_(g.exp_avgs, g.beta1);
      at::_foreach_add_(g.exp_avgs, grads, 1 - g.beta1);
      at::_foreach_mul_(g.exp_avg_sqs, g.beta2);
      at::_foreach_addcmul_(g.exp_avg_sqs, grads, grads, 1 - g.beta2);
      auto denoms = at::_foreach_sqrt(g.exp_avg_sqs);  // √v / √(1 − β2^t) + ε
      compat::foreach_mul_(denoms, bias_correction2.rsqrt().to(dtype));
      at::_foreach_add_(denoms, g.eps);
      auto updates = at::_foreach_div(g.exp_avgs, denoms);
      compat::foreach_mul_(updates, (-g.lr / bias_correction1).to(dtype));
      at::_foreach_add_(g.params, updates);
    }
  }

  /// Writes the device step counts into `optimizer`'s state (reads them on the host): call it
  /// before saving the optimizer.
  void sync() {
    for (const auto& g : groups_) {
      const auto step = static_cast<int64_t>(g.step.item<double>());
      for (const auto& p : g.params) detail::adamw_state(optimizer_, p).step(step);
    }
  }

 private:
  struct Group {
    std::vector<torch::Tensor> params, exp_avgs, exp_avg_sqs;
    torch::Tensor step, lr;  // [] float64 on the parameters' device
    double beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  };

  static const torch::Tensor& gradient_of(const torch::Tensor& p) {
    TORCH_CHECK(p.grad().defined(), "CapturableAdamW: a parameter of shape ", p.sizes(),
                " has no gradient; every parameter needs one at every step");
    return p.grad();
  }

  torch::optim::AdamW& optimizer_;
  std::vector<Group> groups_;
};

}  // namespace scedit
