#pragma once
/// @file foreach_adamw.hpp
/// @brief `torch::optim::AdamW`'s step with multi-tensor ("foreach") kernels.
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
      auto& slot = state[compat::optimizer_state_key(p)];
      if (!slot) {  // first step: the state AdamW::step would create
        auto fresh = std::make_unique<torch::optim::AdamWParamState>();
        fresh->step(0);
        fresh->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        fresh->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        slot = std::move(fresh);
      }
      auto& s = static_cast<torch::optim::AdamWParamState&>(*slot);
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

}  // namespace scedit
