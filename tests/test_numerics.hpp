#pragma once
// How the tests compare tensors: the relative error in float64, and what a fused kernel's result
// may differ from float64 by.

#include <torch/torch.h>

namespace scedit_test {

/// ||out - ref|| / ||ref||, in float64.
inline double rel_err(const torch::Tensor& out, const torch::Tensor& ref) {
  const auto o = out.to(torch::kFloat64), r = ref.to(torch::kFloat64);
  return (o - r).norm().item<double>() / r.norm().item<double>();
}

/// Tolerance of a fused kernel's result in `dtype` against float64 on the same rounded inputs:
/// float32 arithmetic, one rounding to the element type.
inline double fused_tolerance(torch::Dtype dtype) {
  return dtype == torch::kFloat32 ? 1e-5 : dtype == torch::kFloat16 ? 3e-3 : 2e-2;
}

}  // namespace scedit_test
