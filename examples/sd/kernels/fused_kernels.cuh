#pragma once
/// @file fused_kernels.cuh
/// @brief The fused CUDA kernels (GroupNorm + SiLU, GEGLU and LayerNorm, forward and backward, as
/// single memory passes) and the launchers that fused_kernels.h declares.
///
/// Why: in a batch-30 SD 1.5 training step on an H200 the element-wise work around the norms and
/// the feed-forwards' gates (group_norm, silu, gelu, mul and their backwards: ~40 ms of ~207 ms,
/// bench/RESULTS.md) reads and writes each activation several times; these kernels read it once
/// or twice. Statistics, sums and arithmetic are float32 for every element type; results are
/// rounded once, to the element type.
///
/// GroupNorm + SiLU, forward: per-row (n, c) moments, merged per group (n, g) (Chan et al.) into
/// mean and rstd, then y = silu(x·scale + shift) in one pass. Backward: per-row sums of dz and dz·x, where
/// dz = dy·silu'(z) is recomputed from x, folded per group into dx = scale·dz + a·x + b (the
/// coefficients PyTorch's own GroupNorm backward uses), then dx in one pass.
///
/// LayerNorm: one warp per row, moments then the normalised row, the second read from cache;
/// backward likewise, Σdx̂ and Σdx̂·x̂ then dx. Measured against ATen's (bench/RESULTS.md v0.6):
/// 1.4× at SD's 320-wide rows, even at 640, slower at 1280, where a warp walks its row in five
/// dependent rounds of loads; −4 ms per batch-30 step overall.
///
/// Vector loads of 16 bytes are used where the buffers are 16-byte aligned and a row's length
/// divides by the vector width; otherwise the same kernels run element by element.
///
/// Exactly two translation units include this file:
///  - fused_kernels.cu, which nvcc compiles into the `scedit_fused_kernels` library (and the
///    `fused_kernels_compile` test, with warnings as errors);
///  - tests/kernels_emulated.cpp, which runs the kernels on the CPU of a machine without a GPU.
///    It defines SD_KERNELS_HOST_EMULATION to the name of a header that emulates CUDA's execution
///    model on the host (tests/kernel_emulation.hpp: the `__global__`-style qualifiers as macros,
///    `threadIdx` and `blockIdx` as globals, `__syncthreads` and the warp shuffles as barriers
///    between coroutines, and `sd_kernels_emulation::run(kernel, blocks, threads, args...)`).
///    This file includes that header before any CUDA header, and `launch` calls its `run` instead
///    of the `<<<...>>>` launch: the only place where the two builds differ.
/// Everything but the launchers is in an unnamed namespace, private to the including translation
/// unit (the emulation test sets `narrow_index_limit` through it).

#if !defined(__CUDACC__) && !defined(SD_KERNELS_HOST_EMULATION)
#error "fused_kernels.cuh is CUDA: compile it with nvcc (fused_kernels.cu), or define SD_KERNELS_HOST_EMULATION to a host emulation header"
#endif

#ifdef SD_KERNELS_HOST_EMULATION
#include SD_KERNELS_HOST_EMULATION
#endif

#include "fused_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace sd::kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxRowThreads = 256;      // threads of a block that reduces one row
constexpr int kElementwiseThreads = 256;  // threads of a block of the element-wise kernels
constexpr int kGroupThreads = 128;       // threads of a block of the per-group kernels
constexpr int kLayerNormRows = 4;        // rows of a LayerNorm block, one warp each

// ---- element access -------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

/// VEC consecutive elements, read and written as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// ---- block reductions -----------------------------------------------------------------------

/// Count, mean and sum of squared deviations of a set of values (merged as Chan et al.).
struct Moments {
  float count, mean, m2;
};

struct MergeMoments {
  __device__ __forceinline__ Moments operator()(const Moments& a, const Moments& b) const {
    const float count = a.count + b.count;
    if (count == 0.f) return a;
    const float delta = b.mean - a.mean, b_share = b.count / count;
    return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
  }
};

/// The moments of one load's VEC values (exact two passes over registers), merged into `m`:
/// one division per load, not one per element as Welford's update, which would make the
/// statistics pass compute-bound.
template <typename T, int VEC>
__device__ __forceinline__ void accumulate(Moments& m, const Pack<T, VEC>& pack) {
  float values[VEC], sum = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) sum += values[k] = to_float(pack.v[k]);
  const float mean = sum * (1.f / VEC);
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) m2 += (values[k] - mean) * (values[k] - mean);
  m = MergeMoments{}(m, Moments{static_cast<float>(VEC), mean, m2});
}

/// Σ dz and Σ dz·x of a row in the GroupNorm backward.
struct GradSums {
  float grad, grad_x;
};

struct AddGradSums {
  __device__ __forceinline__ GradSums operator()(const GradSums& a, const GradSums& b) const {
    return {a.grad + b.grad, a.grad_x + b.grad_x};
  }
};

/// `value` from `offset` lanes down, for a struct of floats.
template <typename T>
__device__ __forceinline__ T shuffle_down(T value, int offset) {
  static_assert(sizeof(T) % sizeof(float) == 0, "a struct of floats");
  auto* words = reinterpret_cast<float*>(&value);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / sizeof(float)); ++i) {
    words[i] = __shfl_down_sync(0xffffffffu, words[i], offset);
  }
  return value;
}

template <typename T, typename Combine>
__device__ __forceinline__ T warp_reduce(T value, Combine combine) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));
  return value;
}

/// The warp's reduction of `value`, in every lane (lane 0's, so that all lanes agree bit for bit).
template <typename T, typename Combine>
__device__ __forceinline__ T warp_all_reduce(T value, Combine combine) {
  value = warp_reduce(value, combine);
  auto* words = reinterpret_cast<float*>(&value);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / sizeof(float)); ++i) {
    words[i] = __shfl_sync(0xffffffffu, words[i], 0);
  }
  return value;
}

/// The whole block's reduction of `value`, valid in thread 0; `identity` pads the last warp's
/// unused lanes. blockDim.x is a multiple of 32; called once per kernel (one shared buffer).
template <typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T value, T identity, Combine combine) {
  __shared__ T partial[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  value = warp_reduce(value, combine);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp != 0) return identity;
  value = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : identity;
  return warp_reduce(value, combine);
}

// ---- GroupNorm + SiLU -----------------------------------------------------------------------

/// z = x·scale + shift takes an element of row (n, c) to the norm's affine output.
struct RowAffine {
  float scale, shift;
};

/// Rows are (n, c) = n·C + c; with C = G·channels_per_group, row / channels_per_group = n·G + g.
template <typename Index>
__device__ __forceinline__ RowAffine row_affine(Index row, const float* weight, const float* bias,
                                                const float* mean, const float* rstd, Index channels,
                                                Index channels_per_group) {
  const Index c = row % channels, group = row / channels_per_group;
  const float scale = rstd[group] * (weight != nullptr ? weight[c] : 1.f);
  return {scale, (bias != nullptr ? bias[c] : 0.f) - mean[group] * scale};
}

__device__ __forceinline__ float silu(float z) { return z / (1.f + expf(-z)); }

/// d silu(z) / dz = σ(z)·(1 + z·(1 − σ(z))).
__device__ __forceinline__ float silu_derivative(float z) {
  const float sigmoid = 1.f / (1.f + expf(-z));
  return sigmoid * (1.f + z * (1.f - sigmoid));
}

/// One block per row (n, c) of x [N·C, spatial]: its mean and sum of squared deviations.
template <typename T, int VEC>
__global__ void row_moments_kernel(const T* __restrict__ x, int64_t spatial, float* __restrict__ row_mean,
                                   float* __restrict__ row_m2) {
  const T* row = x + static_cast<int64_t>(blockIdx.x) * spatial;
  Moments m{0.f, 0.f, 0.f};
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < spatial; i += static_cast<int64_t>(blockDim.x) * VEC) {
    accumulate(m, load<T, VEC>(row + i));
  }
  m = block_reduce(m, Moments{0.f, 0.f, 0.f}, MergeMoments{});
  if (threadIdx.x == 0) {
    row_mean[blockIdx.x] = m.mean;
    row_m2[blockIdx.x] = m.m2;
  }
}

/// One thread per group (n, g): its rows' moments merged into mean and 1/sqrt(variance + eps)
/// (the biased variance, as torch.group_norm).
__global__ void group_stats_kernel(const float* __restrict__ row_mean, const float* __restrict__ row_m2,
                                   int64_t spatial, int64_t channels_per_group, int64_t num_groups, float eps,
                                   float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group >= num_groups) return;
  Moments m{0.f, 0.f, 0.f};
  for (int64_t k = 0; k < channels_per_group; ++k) {
    const int64_t row = group * channels_per_group + k;
    m = MergeMoments{}(m, Moments{static_cast<float>(spatial), row_mean[row], row_m2[row]});
  }
  mean[group] = m.mean;
  rstd[group] = rsqrtf(fmaxf(m.m2 / m.count, 0.f) + eps);
}

/// y = silu(x·scale + shift), VEC elements per thread (never across a row); Index is the type of
/// the element indices and of the divisions that find an element's row and group.
template <typename T, int VEC, typename Index>
__global__ void norm_silu_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                 const float* __restrict__ bias, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, Index spatial, Index channels,
                                 Index channels_per_group, Index total, T* __restrict__ y) {
  const Index i = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= total) return;
  const RowAffine affine = row_affine(i / spatial, weight, bias, mean, rstd, channels, channels_per_group);
  const auto in = load<T, VEC>(x + i);
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(silu(to_float(in.v[k]) * affine.scale + affine.shift));
  store(y + i, out);
}

/// One block per row (n, c): Σ dz and Σ dz·x with dz = dy·silu'(z) recomputed from x.
template <typename T, int VEC>
__global__ void norm_silu_grad_sums_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                           const float* __restrict__ weight, const float* __restrict__ bias,
                                           const float* __restrict__ mean, const float* __restrict__ rstd,
                                           int64_t spatial, int64_t channels, int64_t channels_per_group,
                                           float* __restrict__ row_grad_sum, float* __restrict__ row_grad_x_sum) {
  const int64_t row = blockIdx.x, offset = row * spatial;
  const RowAffine affine = row_affine<uint32_t>(blockIdx.x, weight, bias, mean, rstd, channels, channels_per_group);
  GradSums sums{0.f, 0.f};
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < spatial; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto dy = load<T, VEC>(grad_y + offset + i);
    const auto in = load<T, VEC>(x + offset + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float value = to_float(in.v[k]);
      const float dz = to_float(dy.v[k]) * silu_derivative(value * affine.scale + affine.shift);
      sums.grad += dz;
      sums.grad_x += dz * value;
    }
  }
  sums = block_reduce(sums, GradSums{0.f, 0.f}, AddGradSums{});
  if (threadIdx.x == 0) {
    row_grad_sum[row] = sums.grad;
    row_grad_x_sum[row] = sums.grad_x;
  }
}

/// One thread per group (n, g): dx = scale·dz + x_coefficient·x + constant, where with
/// dx̂ = dz·weight, x̂ = (x − mean)·rstd and M elements per group
/// dx = rstd·(dx̂ − Σdx̂/M − x̂·Σ(dx̂·x̂)/M).
__global__ void group_grad_coefficients_kernel(const float* __restrict__ row_grad_sum,
                                               const float* __restrict__ row_grad_x_sum,
                                               const float* __restrict__ weight, const float* __restrict__ mean,
                                               const float* __restrict__ rstd, int64_t spatial, int64_t channels,
                                               int64_t channels_per_group, int64_t num_groups,
                                               float* __restrict__ x_coefficient, float* __restrict__ constant) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group >= num_groups) return;
  const int64_t first_channel = group % (channels / channels_per_group) * channels_per_group;
  float sum_dxhat = 0.f, sum_dxhat_x = 0.f;
  for (int64_t k = 0; k < channels_per_group; ++k) {
    const float w = weight != nullptr ? weight[first_channel + k] : 1.f;
    sum_dxhat += w * row_grad_sum[group * channels_per_group + k];
    sum_dxhat_x += w * row_grad_x_sum[group * channels_per_group + k];
  }
  const float r = rstd[group], mu = mean[group];
  const float count = static_cast<float>(channels_per_group * spatial);
  const float sum_dxhat_xhat = r * (sum_dxhat_x - mu * sum_dxhat);
  const float a = -r * r * sum_dxhat_xhat / count;
  x_coefficient[group] = a;
  constant[group] = -a * mu - r * sum_dxhat / count;
}

/// dx = scale·dz + x_coefficient·x + constant, dz recomputed, VEC elements per thread.
template <typename T, int VEC, typename Index>
__global__ void norm_silu_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                          const float* __restrict__ weight, const float* __restrict__ bias,
                                          const float* __restrict__ mean, const float* __restrict__ rstd,
                                          const float* __restrict__ x_coefficient,
                                          const float* __restrict__ constant, Index spatial, Index channels,
                                          Index channels_per_group, Index total, T* __restrict__ grad_x) {
  const Index i = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= total) return;
  const Index row = i / spatial, group = row / channels_per_group;
  const RowAffine affine = row_affine(row, weight, bias, mean, rstd, channels, channels_per_group);
  const float a = x_coefficient[group], b = constant[group];
  const auto dy = load<T, VEC>(grad_y + i);
  const auto in = load<T, VEC>(x + i);
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float value = to_float(in.v[k]);
    const float dz = to_float(dy.v[k]) * silu_derivative(value * affine.scale + affine.shift);
    out.v[k] = from_float<T>(affine.scale * dz + a * value + b);
  }
  store(grad_x + i, out);
}

// ---- GEGLU ----------------------------------------------------------------------------------

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrtTwoPi = 0.39894228040143267794f;

/// Φ(g), the standard normal CDF: gelu(g) = g·Φ(g), gelu'(g) = Φ(g) + g·φ(g).
__device__ __forceinline__ float normal_cdf(float g) { return 0.5f * (1.f + erff(g * kSqrtHalf)); }

/// out[row, d] = a·gelu(g) with a = projected[row, d], g = projected[row, dim + d].
template <typename T, int VEC, typename Index>
__global__ void geglu_kernel(const T* __restrict__ projected, Index dim, Index total, T* __restrict__ out) {
  const Index i = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= total) return;
  const Index row = i / dim, d = i - row * dim;
  const T* value = projected + row * 2 * dim + d;
  const auto a = load<T, VEC>(value);
  const auto g = load<T, VEC>(value + dim);
  Pack<T, VEC> result;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float gate = to_float(g.v[k]);
    result.v[k] = from_float<T>(to_float(a.v[k]) * gate * normal_cdf(gate));
  }
  store(out + i, result);
}

/// grad_projected[row] = [grad·gelu(g), grad·a·gelu'(g)].
template <typename T, int VEC, typename Index>
__global__ void geglu_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ projected,
                                      Index dim, Index total, T* __restrict__ grad_projected) {
  const Index i = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= total) return;
  const Index row = i / dim, d = i - row * dim, offset = row * 2 * dim + d;
  const auto grad = load<T, VEC>(grad_out + i);
  const auto a = load<T, VEC>(projected + offset);
  const auto g = load<T, VEC>(projected + offset + dim);
  Pack<T, VEC> grad_a, grad_g;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float gate = to_float(g.v[k]), dy = to_float(grad.v[k]);
    const float cdf = normal_cdf(gate), pdf = expf(-0.5f * gate * gate) * kInvSqrtTwoPi;
    grad_a.v[k] = from_float<T>(dy * gate * cdf);
    grad_g.v[k] = from_float<T>(dy * to_float(a.v[k]) * (cdf + gate * pdf));
  }
  store(grad_projected + offset, grad_a);
  store(grad_projected + offset + dim, grad_g);
}

// ---- LayerNorm ------------------------------------------------------------------------------

/// One warp per row of x [rows, dim]: mean and 1/sqrt(variance + eps), then
/// y = (x − mean)·rstd·weight + bias, reading the row again (from cache).
template <typename T, int VEC>
__global__ void layer_norm_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                  const float* __restrict__ bias, int64_t rows, int64_t dim, float eps,
                                  T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLayerNormRows + threadIdx.x / kWarp;
  if (row >= rows) return;  // the whole warp: its shuffles are never half-attended
  const int lane = threadIdx.x % kWarp;
  const T* in = x + row * dim;
  Moments m{0.f, 0.f, 0.f};
  for (int64_t i = lane * VEC; i < dim; i += kWarp * VEC) accumulate(m, load<T, VEC>(in + i));
  m = warp_all_reduce(m, MergeMoments{});
  const float row_rstd = rsqrtf(fmaxf(m.m2 / m.count, 0.f) + eps);
  if (lane == 0) {
    mean[row] = m.mean;
    rstd[row] = row_rstd;
  }
  T* out = y + row * dim;
  for (int64_t i = lane * VEC; i < dim; i += kWarp * VEC) {
    const auto values = load<T, VEC>(in + i);
    Pack<T, VEC> result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float normalized = (to_float(values.v[k]) - m.mean) * row_rstd;
      result.v[k] = from_float<T>(normalized * (weight != nullptr ? weight[i + k] : 1.f) +
                                  (bias != nullptr ? bias[i + k] : 0.f));
    }
    store(out + i, result);
  }
}

/// One warp per row: dx = rstd·(dx̂ − Σdx̂/dim − x̂·Σ(dx̂·x̂)/dim) with dx̂ = dy·weight and
/// x̂ = (x − mean)·rstd, the sums first, then dx reading the row again.
template <typename T, int VEC>
__global__ void layer_norm_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                           const float* __restrict__ weight, const float* __restrict__ mean,
                                           const float* __restrict__ rstd, int64_t rows, int64_t dim,
                                           T* __restrict__ grad_x) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLayerNormRows + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t offset = row * dim;
  const float mu = mean[row], r = rstd[row];
  GradSums sums{0.f, 0.f};  // Σ dx̂, Σ dx̂·x̂
  for (int64_t i = lane * VEC; i < dim; i += kWarp * VEC) {
    const auto dy = load<T, VEC>(grad_y + offset + i);
    const auto in = load<T, VEC>(x + offset + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dxhat = to_float(dy.v[k]) * (weight != nullptr ? weight[i + k] : 1.f);
      sums.grad += dxhat;
      sums.grad_x += dxhat * (to_float(in.v[k]) - mu) * r;
    }
  }
  sums = warp_all_reduce(sums, AddGradSums{});
  const float mean_dxhat = sums.grad / static_cast<float>(dim);
  const float mean_dxhat_xhat = sums.grad_x / static_cast<float>(dim);
  for (int64_t i = lane * VEC; i < dim; i += kWarp * VEC) {
    const auto dy = load<T, VEC>(grad_y + offset + i);
    const auto in = load<T, VEC>(x + offset + i);
    Pack<T, VEC> result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dxhat = to_float(dy.v[k]) * (weight != nullptr ? weight[i + k] : 1.f);
      const float xhat = (to_float(in.v[k]) - mu) * r;
      result.v[k] = from_float<T>(r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
    }
    store(grad_x + offset + i, result);
  }
}

// ---- launching ------------------------------------------------------------------------------

/// Enqueues `kernel` on `stream` as `blocks` × `threads`, throwing (naming it) if the launch fails.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), unsigned int blocks, int threads, cudaStream_t stream,
            Args... args) {
#ifdef SD_KERNELS_HOST_EMULATION
  (void)name, (void)stream;
  sd_kernels_emulation::run(kernel, blocks, threads, static_cast<Params>(args)...);
#else
  kernel<<<blocks, threads, 0, stream>>>(static_cast<Params>(args)...);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("sd::kernels: ") + name + " failed to launch: " + cudaGetErrorString(error));
  }
#endif
}

/// Blocks of `threads` covering `work` items.
unsigned int blocks_for(int64_t work, int threads, const char* kernel) {
  const int64_t blocks = (work + threads - 1) / threads;
  if (blocks > INT_MAX) throw std::invalid_argument(std::string("sd::kernels: ") + kernel + ": too many elements");
  return static_cast<unsigned int>(blocks);
}

/// Threads for a block reducing a row of `vectors` loads: a power of two in [32, kMaxRowThreads].
int row_threads(int64_t vectors) {
  int threads = kWarp;
  while (threads < kMaxRowThreads && threads < vectors) threads *= 2;
  return threads;
}

template <typename T>
struct Tag {
  using type = T;
};

/// Below this many elements the element-wise kernels index in 32 bits: a 64-bit division is
/// several times dearer on a GPU, and each thread divides two or three times. (Tests lower it to
/// reach the 64-bit kernels with small tensors.)
int64_t narrow_index_limit = int64_t{1} << 31;

/// Calls `fn(Tag<T>{}, std::integral_constant<int, VEC>{}, Tag<Index>{})` with T the C++ type of
/// `type`; VEC = 16 / sizeof(T) where every pointer is 16-byte aligned and `run` (the elements a
/// vector must not cross) divides by it, else 1; Index uint32_t for `elements` (the largest
/// buffer's) under `narrow_index_limit`, else int64_t.
template <typename Fn>
void for_kernel_types(ElementType type, int64_t run, int64_t elements, std::initializer_list<const void*> pointers,
                      Fn&& fn) {
  auto with_width_and_index = [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWide = 16 / sizeof(T);
    bool wide = run % kWide == 0;
    for (const void* p : pointers) wide = wide && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
    auto with_index = [&](auto width) {
      if (elements < narrow_index_limit) {
        fn(tag, width, Tag<uint32_t>{});
      } else {
        fn(tag, width, Tag<int64_t>{});
      }
    };
    if (wide) {
      with_index(std::integral_constant<int, kWide>{});
    } else {
      with_index(std::integral_constant<int, 1>{});
    }
  };
  switch (type) {
    case ElementType::kFloat32: return with_width_and_index(Tag<float>{});
    case ElementType::kBFloat16: return with_width_and_index(Tag<__nv_bfloat16>{});
    case ElementType::kFloat16: return with_width_and_index(Tag<__half>{});
  }
  throw std::invalid_argument("sd::kernels: unknown element type");
}

/// A GroupNorm's sizes in rows (n, c), elements and groups (n, g), its shape checked.
struct NormSizes {
  int64_t rows, total, channels_per_group, num_groups;
};

/// Blocks of kLayerNormRows rows for a LayerNorm of `rows` rows of `dim` elements, checked.
unsigned int layer_norm_blocks(int64_t rows, int64_t dim) {
  if (rows < 0 || dim <= 0) {
    throw std::invalid_argument("sd::kernels: layer norm of " + std::to_string(rows) + " rows of " +
                                std::to_string(dim) + " elements");
  }
  return blocks_for(rows, kLayerNormRows, "layer_norm_kernel");
}

NormSizes norm_sizes(const GroupNormShape& s) {
  if (s.batch < 0 || s.channels <= 0 || s.spatial < 0 || s.groups <= 0 || s.channels % s.groups != 0) {
    throw std::invalid_argument("sd::kernels: group norm of " + std::to_string(s.channels) +
                                " channels in " + std::to_string(s.groups) + " groups");
  }
  if (s.batch * s.channels > INT_MAX) throw std::invalid_argument("sd::kernels: group norm: too many rows");
  return {s.batch * s.channels, s.batch * s.channels * s.spatial, s.channels / s.groups, s.batch * s.groups};
}

}  // namespace

void group_norm_silu_forward(ElementType type, const void* x, const float* weight, const float* bias,
                             const GroupNormShape& shape, float eps, void* y, float* mean, float* rstd,
                             float* workspace, cudaStream_t stream) {
  const NormSizes n = norm_sizes(shape);
  if (n.total == 0) return;
  float* row_mean = workspace;
  float* row_m2 = workspace + n.rows;
  for_kernel_types(type, shape.spatial, n.total, {x, y}, [&](auto tag, auto width, auto index) {
    using T = typename decltype(tag)::type;
    using Index = typename decltype(index)::type;
    constexpr int VEC = decltype(width)::value;
    launch("row_moments_kernel", row_moments_kernel<T, VEC>, static_cast<unsigned int>(n.rows),
           row_threads(shape.spatial / VEC), stream, x, shape.spatial, row_mean, row_m2);
    launch("group_stats_kernel", group_stats_kernel, blocks_for(n.num_groups, kGroupThreads, "group_stats_kernel"),
           kGroupThreads, stream, row_mean, row_m2, shape.spatial, n.channels_per_group, n.num_groups, eps, mean,
           rstd);
    launch("norm_silu_kernel", norm_silu_kernel<T, VEC, Index>,
           blocks_for(n.total / VEC, kElementwiseThreads, "norm_silu_kernel"), kElementwiseThreads, stream, x,
           weight, bias, mean, rstd, shape.spatial, shape.channels, n.channels_per_group, n.total, y);
  });
}

void group_norm_silu_backward(ElementType type, const void* grad_y, const void* x, const float* weight,
                              const float* bias, const float* mean, const float* rstd,
                              const GroupNormShape& shape, void* grad_x, float* row_grad_sum,
                              float* row_grad_x_sum, float* workspace, cudaStream_t stream) {
  const NormSizes n = norm_sizes(shape);
  if (n.total == 0) return;
  float* x_coefficient = workspace;
  float* constant = workspace + n.num_groups;
  for_kernel_types(type, shape.spatial, n.total, {grad_y, x, grad_x}, [&](auto tag, auto width, auto index) {
    using T = typename decltype(tag)::type;
    using Index = typename decltype(index)::type;
    constexpr int VEC = decltype(width)::value;
    launch("norm_silu_grad_sums_kernel", norm_silu_grad_sums_kernel<T, VEC>, static_cast<unsigned int>(n.rows),
           row_threads(shape.spatial / VEC), stream, grad_y, x, weight, bias, mean, rstd, shape.spatial,
           shape.channels, n.channels_per_group, row_grad_sum, row_grad_x_sum);
    launch("group_grad_coefficients_kernel", group_grad_coefficients_kernel,
           blocks_for(n.num_groups, kGroupThreads, "group_grad_coefficients_kernel"), kGroupThreads, stream,
           row_grad_sum, row_grad_x_sum, weight, mean, rstd, shape.spatial, shape.channels, n.channels_per_group,
           n.num_groups, x_coefficient, constant);
    launch("norm_silu_backward_kernel", norm_silu_backward_kernel<T, VEC, Index>,
           blocks_for(n.total / VEC, kElementwiseThreads, "norm_silu_backward_kernel"), kElementwiseThreads, stream,
           grad_y, x, weight, bias, mean, rstd, x_coefficient, constant, shape.spatial, shape.channels,
           n.channels_per_group, n.total, grad_x);
  });
}

void geglu_forward(ElementType type, const void* projected, int64_t rows, int64_t dim, void* out,
                   cudaStream_t stream) {
  if (rows < 0 || dim < 0) throw std::invalid_argument("sd::kernels: geglu: negative size");
  const int64_t total = rows * dim;
  if (total == 0) return;
  // The projection, twice the output, is the largest buffer.
  for_kernel_types(type, dim, 2 * total, {projected, out}, [&](auto tag, auto width, auto index) {
    using T = typename decltype(tag)::type;
    using Index = typename decltype(index)::type;
    constexpr int VEC = decltype(width)::value;
    launch("geglu_kernel", geglu_kernel<T, VEC, Index>, blocks_for(total / VEC, kElementwiseThreads, "geglu_kernel"),
           kElementwiseThreads, stream, projected, dim, total, out);
  });
}

void geglu_backward(ElementType type, const void* grad_out, const void* projected, int64_t rows,
                    int64_t dim, void* grad_projected, cudaStream_t stream) {
  if (rows < 0 || dim < 0) throw std::invalid_argument("sd::kernels: geglu: negative size");
  const int64_t total = rows * dim;
  if (total == 0) return;
  for_kernel_types(type, dim, 2 * total, {grad_out, projected, grad_projected}, [&](auto tag, auto width, auto index) {
    using T = typename decltype(tag)::type;
    using Index = typename decltype(index)::type;
    constexpr int VEC = decltype(width)::value;
    launch("geglu_backward_kernel", geglu_backward_kernel<T, VEC, Index>,
           blocks_for(total / VEC, kElementwiseThreads, "geglu_backward_kernel"), kElementwiseThreads, stream,
           grad_out, projected, dim, total, grad_projected);
  });
}

void layer_norm_forward(ElementType type, const void* x, const float* weight, const float* bias, int64_t rows,
                        int64_t dim, float eps, void* y, float* mean, float* rstd, cudaStream_t stream) {
  const unsigned int blocks = layer_norm_blocks(rows, dim);
  if (rows == 0) return;
  for_kernel_types(type, dim, rows * dim, {x, y}, [&](auto tag, auto width, auto /*index: 64-bit row offsets*/) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = decltype(width)::value;
    launch("layer_norm_kernel", layer_norm_kernel<T, VEC>, blocks, kLayerNormRows * kWarp, stream, x, weight, bias,
           rows, dim, eps, y, mean, rstd);
  });
}

void layer_norm_backward(ElementType type, const void* grad_y, const void* x, const float* weight,
                         const float* mean, const float* rstd, int64_t rows, int64_t dim, void* grad_x,
                         cudaStream_t stream) {
  const unsigned int blocks = layer_norm_blocks(rows, dim);
  if (rows == 0) return;
  for_kernel_types(type, dim, rows * dim, {grad_y, x, grad_x}, [&](auto tag, auto width, auto /*index*/) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = decltype(width)::value;
    launch("layer_norm_backward_kernel", layer_norm_backward_kernel<T, VEC>, blocks, kLayerNormRows * kWarp, stream,
           grad_y, x, weight, mean, rstd, rows, dim, grad_x);
  });
}

}  // namespace sd::kernels
