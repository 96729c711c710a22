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

/// The learning rate at optimizer step `step` (0-based) of `total`.
inline double learning_rate(const OptimOptions& o, int64_t step, int64_t total) {
  TORCH_CHECK(o.schedule == "constant" || o.schedule == "warmup" || o.schedule == "cosine",
              "--lr-schedule must be constant, warmup or cosine, got '", o.schedule, "'");
  if (o.schedule == "constant") return o.lr;
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.schedule == "warmup") return o.lr;
  // Cosine decay to zero after the warm-up (diffusers' get_cosine_schedule_with_warmup).
  const double progress = static_cast<double>(step - o.warmup_steps) /
                          static_cast<double>(std::max<int64_t>(1, total - o.warmup_steps));
  return o.lr * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

}  // namespace common
