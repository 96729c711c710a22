#pragma once
/// @file fused_kernels.h
/// @brief Launchers of the fused CUDA kernels (GroupNorm + SiLU, GEGLU, LayerNorm) on raw device
/// pointers.
///
/// Plain C++ with CUDA's runtime types only, no LibTorch: fused_kernels.cu is compiled by nvcc
/// on its own, and sd/fused_ops.hpp wraps these launchers in autograd functions. Every tensor
/// argument is a contiguous device buffer; element tensors are of one `ElementType`, statistics
/// and affine parameters float32. Each launcher enqueues its kernels on `stream` and throws
/// std::runtime_error naming the kernel when a launch fails.

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sd::kernels {

/// The element types the kernels are instantiated for (arithmetic is float32 for all).
enum class ElementType { kFloat32, kBFloat16, kFloat16 };

/// A GroupNorm over x [batch, channels, spatial], channels split into `groups` equal groups.
struct GroupNormShape {
  int64_t batch = 0;     ///< N
  int64_t channels = 0;  ///< C, a multiple of groups
  int64_t spatial = 0;   ///< H·W (the product of the dimensions after C)
  int64_t groups = 0;    ///< G
};

/// `y = silu(group_norm(x))` with float32 statistics. `weight` and `bias` [C] may be null (no
/// affine). Writes `mean` and `rstd` [N, G] for the backward pass; `workspace` holds 2·N·C floats.
void group_norm_silu_forward(ElementType type, const void* x, const float* weight, const float* bias,
                             const GroupNormShape& shape, float eps, void* y, float* mean, float* rstd,
                             float* workspace, cudaStream_t stream);

/// The gradient of `group_norm_silu_forward` from the forward's `mean` and `rstd`, recomputing
/// the normalised tensor. Writes `grad_x` (like x) and, per row (n, c), `row_grad_sum` = Σ dz and
/// `row_grad_x_sum` = Σ dz·x [N·C] where dz is the gradient at the norm's affine output: the weight
/// gradient is Σ_n rstd·(row_grad_x_sum − mean·row_grad_sum), the bias gradient Σ_n row_grad_sum.
/// `workspace` holds 2·N·G floats.
void group_norm_silu_backward(ElementType type, const void* grad_y, const void* x, const float* weight,
                              const float* bias, const float* mean, const float* rstd,
                              const GroupNormShape& shape, void* grad_x, float* row_grad_sum,
                              float* row_grad_x_sum, float* workspace, cudaStream_t stream);

/// GEGLU's gate: for each of `rows` rows of `projected` [rows, 2·dim] = [a, g],
/// `out` [rows, dim] = a · gelu(g) (exact, erf GELU).
void geglu_forward(ElementType type, const void* projected, int64_t rows, int64_t dim, void* out,
                   cudaStream_t stream);

/// GEGLU's gradient: `grad_projected` [rows, 2·dim] = [grad · gelu(g), grad · a · gelu'(g)].
void geglu_backward(ElementType type, const void* grad_out, const void* projected, int64_t rows,
                    int64_t dim, void* grad_projected, cudaStream_t stream);

/// `y = layer_norm(x)` over the last `dim` elements of each of `rows` rows, float32 statistics.
/// `weight` and `bias` [dim] may be null. Writes `mean` and `rstd` [rows] for the backward pass.
void layer_norm_forward(ElementType type, const void* x, const float* weight, const float* bias, int64_t rows,
                        int64_t dim, float eps, void* y, float* mean, float* rstd, cudaStream_t stream);

/// The input gradient of `layer_norm_forward` from its `mean` and `rstd` (the affine parameters'
/// gradients are left to the caller: Σ_rows dy·x̂ and Σ_rows dy).
void layer_norm_backward(ElementType type, const void* grad_y, const void* x, const float* weight,
                         const float* mean, const float* rstd, int64_t rows, int64_t dim, void* grad_x,
                         cudaStream_t stream);

}  // namespace sd::kernels
