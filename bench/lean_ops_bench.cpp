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

void GroupNormSiLUForwardBackward(benchmark::State& state) {
  const int64_t variant = state.range(0), c = state.range(1), side = state.range(2);
  if (!runnable(state, variant)) return;
  const torch::Device gpu(torch::kCUDA);
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(32, c).eps(1e-5));
  norm->to(gpu, torch::kBFloat16);
  for (auto& p : norm->parameters()) p.requires_grad_(false);  // frozen, as in SCEdit training
  sd::LeanActivations lean;
  lean.norms_in_activation_dtype = variant == 0;
  lean.group_norm_silu = variant == 1;
  lean.fused_norm_silu = variant == 2;
  const auto options = torch::TensorOptions(gpu).dtype(torch::kBFloat16);
  const auto x = torch::randn({kBatch, c, side, side}, options).requires_grad_(true);
  const auto grad = torch::randn_like(x);
  for (auto _ : state) {
    benchmark::DoNotOptimize(torch::autograd::grad({sd::norm_silu(x, *norm, lean)}, {x}, {grad}));
    torch::cuda::synchronize();
  }
  state.SetItemsProcessed(state.iterations() * x.numel());
}
BENCHMARK(GroupNormSiLUForwardBackward)->Apply(plain_lean_and_fused)->Unit(benchmark::kMillisecond)->UseRealTime();

void GEGLUForwardBackward(benchmark::State& state) {
  const int64_t variant = state.range(0), c = state.range(1), side = state.range(2);
  if (!runnable(state, variant)) return;
  const torch::Device gpu(torch::kCUDA);
  sd::LeanActivations lean;
  lean.geglu = variant == 1;
  lean.fused_geglu = variant == 2;
  const auto options = torch::TensorOptions(gpu).dtype(torch::kBFloat16);
  const auto projected = torch::randn({kBatch, side * side, 2 * 4 * c}, options).requires_grad_(true);
  const auto grad = torch::randn({kBatch, side * side, 4 * c}, options);
  for (auto _ : state) {
    benchmark::DoNotOptimize(torch::autograd::grad({sd::geglu_gate(projected, lean)}, {projected}, {grad}));
    torch::cuda::synchronize();
  }
  state.SetItemsProcessed(state.iterations() * grad.numel());
}
BENCHMARK(GEGLUForwardBackward)->Apply(plain_lean_and_fused)->Unit(benchmark::kMillisecond)->UseRealTime();

void LayerNormForwardBackward(benchmark::State& state) {
  const int64_t variant = state.range(0), c = state.range(1), side = state.range(2);
  if (!runnable(state, variant)) return;
  const torch::Device gpu(torch::kCUDA);
  torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({c}).eps(1e-5));
  norm->to(gpu, torch::kBFloat16);
  for (auto& p : norm->parameters()) p.requires_grad_(false);
  sd::LeanActivations lean;
  lean.norms_in_activation_dtype = variant == 0;
  lean.fused_layer_norm = variant == 2;
  const auto options = torch::TensorOptions(gpu).dtype(torch::kBFloat16);
  const auto x = torch::randn({kBatch, side * side, c}, options).requires_grad_(true);
  const auto grad = torch::randn_like(x);
  for (auto _ : state) {
    benchmark::DoNotOptimize(torch::autograd::grad({sd::layer_norm(x, *norm, lean)}, {x}, {grad}));
    torch::cuda::synchronize();
  }
  state.SetItemsProcessed(state.iterations() * x.numel());
}
BENCHMARK(LayerNormForwardBackward)->Apply(plain_and_fused)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
