#pragma once
/// @file optim.hpp
/// @brief The optimiser of every training program: AdamW with SCEdit's reference settings by
/// default, and its learning-rate schedules.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace common {

/// AdamW and its schedule; the defaults are SCEdit's reference recipe (docs/ARCHITECTURE.md).
struct OptimOptions {
  double lr = 1e-4;              ///< peak learning rate
  double beta1 = 0.9;            ///< AdamW β1
  double beta2 = 0.999;          ///< AdamW β2
  double eps = 1e-8;             ///< AdamW ε
  double weight_decay = 1e-2;    ///< AdamW decoupled weight decay
  std::string schedule = "constant";  ///< constant | warmup | cosine
  int64_t warmup_steps = 0;      ///< linear warm-up steps (warmup, cosine)
  double max_grad_norm = 0;      ///< clip the gradient norm to this; 0 = no clipping
  bool foreach = true;           ///< multi-tensor AdamW kernels (scedit/foreach_adamw.hpp), same result
};

/// Checks the optimiser's flags, each message naming its flag and the accepted range.
inline void check_optim_options(const OptimOptions& o) {
  TORCH_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number, got ", o.lr);
  TORCH_CHECK(o.beta1 >= 0 && o.beta1 < 1, "--adam-beta1 must be in [0, 1), got ", o.beta1);
  TORCH_CHECK(o.beta2 >= 0 && o.beta2 < 1, "--adam-beta2 must be in [0, 1), got ", o.beta2);
  TORCH_CHECK(std::isfinite(o.eps) && o.eps > 0, "--adam-eps must be a positive number, got ", o.eps);
  TORCH_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0,
              "--weight-decay must be a number ≥ 0, got ", o.weight_decay);
  TORCH_CHECK(o.schedule == "constant" || o.schedule == "warmup" || o.schedule == "cosine",
              "--lr-schedule must be constant, warmup or cosine, got '", o.schedule, "'");
  TORCH_CHECK(o.warmup_steps >= 0, "--warmup-steps must not be negative, got ", o.warmup_steps);
  TORCH_CHECK(o.warmup_steps == 0 || o.schedule != "constant", "--warmup-steps ", o.warmup_steps,
              " does nothing with --lr-schedule constant: give --lr-schedule warmup or cosine");
  TORCH_CHECK(std::isfinite(o.max_grad_norm) && o.max_grad_norm >= 0,
              "--max-grad-norm must be a number ≥ 0 (0: no clipping), got ", o.max_grad_norm);
}

/// The learning rate at optimizer step `step` (0-based) of `total` (options checked by
/// `check_optim_options`).
inline double learning_rate(const OptimOptions& o, int64_t step, int64_t total) {
  if (o.schedule == "constant") return o.lr;
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.schedule == "warmup") return o.lr;
  // Cosine decay to zero after the warm-up (diffusers' get_cosine_schedule_with_warmup).
  const double progress = static_cast<double>(step - o.warmup_steps) /
                          static_cast<double>(std::max<int64_t>(1, total - o.warmup_steps));
  return o.lr * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

}  // namespace common
