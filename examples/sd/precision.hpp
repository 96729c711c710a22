#pragma once
/// @file precision.hpp
/// @brief How Stable Diffusion computes: everything in float32, or the frozen weights in bf16 or
/// fp16 with autocast. The one precision type of the examples, parsed once at the edge.

#include <torch/torch.h>

#include <string>

namespace sd {

/// How a model computes: everything float32, or frozen weights in bf16/fp16 under autocast
/// (trainable weights and optimizer state stay float32 when training).
enum class Precision {
  kFP32,  ///< float32 throughout (TF32 matmuls where the device allows them)
  kBF16,  ///< bfloat16 weights and autocast
  kFP16   ///< float16 weights and autocast (CUDA only)
};

/// Parses `fp32`, `bf16` or `fp16` (the `--precision` flag of every program).
inline Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::kFP32;
  if (name == "bf16") return Precision::kBF16;
  if (name == "fp16") return Precision::kFP16;
  TORCH_CHECK(false, "--precision must be fp32, bf16 or fp16, got '", name, "'");
}

/// The flag spelling of a precision.
inline std::string to_string(Precision precision) {
  switch (precision) {
    case Precision::kFP32: return "fp32";
    case Precision::kBF16: return "bf16";
    case Precision::kFP16: return "fp16";
  }
  return "?";
}

/// The dtype of the frozen weights and of autocast under `precision`.
inline torch::Dtype compute_dtype(Precision precision) {
  switch (precision) {
    case Precision::kBF16: return torch::kBFloat16;
    case Precision::kFP16: return torch::kFloat16;
    case Precision::kFP32: break;
  }
  return torch::kFloat32;
}

/// Refuses the precisions `device` cannot run: LibTorch's CPU kernels lack half-precision
/// convolutions.
inline void check_precision(Precision precision, const torch::Device& device) {
  TORCH_CHECK(precision != Precision::kFP16 || device.is_cuda(),
              "--precision fp16 needs a CUDA device (LibTorch's CPU kernels lack half-precision "
              "convolutions); use bf16 on the CPU");
}

}  // namespace sd
