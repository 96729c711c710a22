// Google Benchmark micro-benchmarks of GroupNorm + SiLU, GEGLU and LayerNorm, forward + backward
// in bf16 at Stable Diffusion 1.5's training shapes (batch 30, the batch of the targets), in their
// forms: the plain ops (norms in bf16, as `--lean norm-dtype`), the lean autograd nodes
// (`norm-silu`, `geglu`: ATen kernels, input kept, the rest recomputed; LayerNorm has none) and
// the fused CUDA kernels (`fused-norm-silu`, `fused-geglu`, `fused-layer-norm`). CUDA only; the
// fused rows need a build with the kernels. Gradients by torch::autograd::grad, so that nothing
// accumulates between iterations. Arguments: {variant (0 plain, 1 lean, 2 fused), channels,
// side}. Items are elements of the activation (norms) or of the gate (GEGLU) per second.

#include <sd/lean_ops.hpp>

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBatch = 30;

/// Skips the benchmark (saying why) unless `variant` can run here.
bool runnable(benchmark::State& state, int64_t variant) {
  if (!torch::cuda::is_available()) {
    state.SkipWithError("needs a CUDA device");
    return false;
  }
  if (variant == 2 && !sd::fused::available()) {
    state.SkipWithError("this build has no fused CUDA kernels");
    return false;
  }
  return true;
}

/// `variants` at SD 1.5's block shapes (channels, latent side): the norms over the resnets' and
/// the transformers' activations; the feed-forward gate of 4·channels over side² tokens.
void add_sd_shapes(benchmark::internal::Benchmark* b, std::initializer_list<int64_t> variants) {
  b->ArgNames({"variant", "channels", "side"});
  for (int64_t variant : variants) {
    for (auto [c, side] : std::vector<std::pair<int64_t, int64_t>>{{320, 64}, {640, 32}, {1280, 16}, {1280, 8}}) {
      b->Args({variant, c, side});
    }
  }
}
void plain_lean_and_fused(benchmark::internal::Benchmark* b) { add_sd_shapes(b, {0, 1, 2}); }
void plain_and_fused(benchmark::internal::Benchmark* b) { add_sd_shapes(b, {0, 2}); }

/// The levers of `variant`: 0 the plain ops (norms in bf16), 1 the lean nodes, 2 the fused kernels.
sd::LeanActivations levers(int64_t variant) {
  sd::LeanActivations lean;
  lean.norms_in_activation_dtype = variant == 0;
  lean.group_norm_silu = lean.geglu = variant == 1;
  lean.fused_norm_silu = lean.fused_geglu = lean.fused_layer_norm = variant == 2;
  return lean;
}

/// Times `op(input)` forward and backward (to `input`, with `grad` from above), counting `items`
/// per iteration.
template <typename Op>
void time_forward_backward(benchmark::State& state, const torch::Tensor& input, const torch::Tensor& grad,
                           int64_t items, Op op) {
  for (auto _ : state) {
    benchmark::DoNotOptimize(torch::autograd::grad({op(input)}, {input}, {grad}));
    torch::cuda::synchronize();
  }
  state.SetItemsProcessed(state.iterations() * items);
}

/// bf16 on the GPU, with or without gradients.
torch::TensorOptions gpu_bf16() { return torch::TensorOptions(torch::kCUDA).dtype(torch::kBFloat16); }

void GroupNormSiLUForwardBackward(benchmark::State& state) {
  const int64_t variant = state.range(0), c = state.range(1), side = state.range(2);
  if (!runnable(state, variant)) return;
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(32, c).eps(1e-5));
  norm->to(torch::kCUDA, torch::kBFloat16);
  for (auto& p : norm->parameters()) p.requires_grad_(false);  // frozen, as in SCEdit training
  const auto x = torch::randn({kBatch, c, side, side}, gpu_bf16()).requires_grad_(true);
  time_forward_backward(state, x, torch::randn_like(x), x.numel(),
                        [&, lean = levers(variant)](const torch::Tensor& in) { return sd::norm_silu(in, *norm, lean); });
}
BENCHMARK(GroupNormSiLUForwardBackward)->Apply(plain_lean_and_fused)->Unit(benchmark::kMillisecond)->UseRealTime();

void GEGLUForwardBackward(benchmark::State& state) {
  const int64_t variant = state.range(0), c = state.range(1), side = state.range(2);
  if (!runnable(state, variant)) return;
  const auto projected = torch::randn({kBatch, side * side, 2 * 4 * c}, gpu_bf16()).requires_grad_(true);
  const auto grad = torch::randn({kBatch, side * side, 4 * c}, gpu_bf16());
  time_forward_backward(state, projected, grad, grad.numel(),
                        [lean = levers(variant)](const torch::Tensor& in) { return sd::geglu_gate(in, lean); });
}
BENCHMARK(GEGLUForwardBackward)->Apply(plain_lean_and_fused)->Unit(benchmark::kMillisecond)->UseRealTime();

void LayerNormForwardBackward(benchmark::State& state) {
  const int64_t variant = state.range(0), c = state.range(1), side = state.range(2);
  if (!runnable(state, variant)) return;
  torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({c}).eps(1e-5));
  norm->to(torch::kCUDA, torch::kBFloat16);
  for (auto& p : norm->parameters()) p.requires_grad_(false);
  const auto x = torch::randn({kBatch, side * side, c}, gpu_bf16()).requires_grad_(true);
  time_forward_backward(state, x, torch::randn_like(x), x.numel(),
                        [&, lean = levers(variant)](const torch::Tensor& in) { return sd::layer_norm(in, *norm, lean); });
}
BENCHMARK(LayerNormForwardBackward)->Apply(plain_and_fused)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
