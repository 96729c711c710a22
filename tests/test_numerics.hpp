#pragma once
// How the tests compare tensors: the relative error in float64, what a fused kernel's result
// may differ from float64 by, and the float64 references' inputs.

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

/// `t` in float64, detached, as a leaf that records its gradient: the reference side of a
/// comparison (undefined stays undefined).
inline torch::Tensor float64_leaf(const torch::Tensor& t) {
  return t.defined() ? t.detach().to(torch::kFloat64).requires_grad_(true) : t;
}

/// Draws a norm's affine parameters around weight 1 and bias 0, so that both matter in a test.
template <typename NormImpl>
void randomize_affine(NormImpl& norm) {
  torch::NoGradGuard no_grad;
  norm.weight.normal_(1.0, 0.5);
  norm.bias.normal_(0.0, 0.5);
}

}  // namespace scedit_test
