// Google Benchmark micro-benchmarks of the tuners at Stable Diffusion 1.5's skip shapes:
// SC-Tuner, the CSC-Tuner's per-skip edit, and LoRA on an attention projection, forward alone
// and forward + backward. Arguments: {channels, side} of the skip (batch 1); on the CPU the
// largest shapes take a while, so --benchmark_filter picks what to run.

#include <scedit/csctuner.hpp>
#include <scedit/lora.hpp>
#include <scedit/sctuner.hpp>

#include <benchmark/benchmark.h>
#include <torch/torch.h>

namespace {

torch::Device bench_device() {
  return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
}

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

/// SD 1.5 decoder skips: (320, 64), (640, 32), (1280, 16), (1280, 8) — channels and latent side.
void skip_shapes(benchmark::internal::Benchmark* b) {
  for (auto [c, side] : std::vector<std::pair<int64_t, int64_t>>{{320, 64}, {640, 32}, {1280, 16}, {1280, 8}}) {
    b->Args({c, side});
  }
}

void SCTunerForward(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const auto device = bench_device();
  scedit::SCTuner tuner(scedit::SCTunerOptions(state.range(0)));
  tuner->to(device);
  auto x = torch::randn({1, state.range(0), state.range(1), state.range(1)}, device);
  for (auto _ : state) {
    benchmark::DoNotOptimize(tuner(x));
    sync(device);
  }
}
BENCHMARK(SCTunerForward)->Apply(skip_shapes)->Unit(benchmark::kMillisecond);

void SCTunerForwardBackward(benchmark::State& state) {
  const auto device = bench_device();
  scedit::SCTuner tuner(scedit::SCTunerOptions(state.range(0)));
  tuner->to(device);
  auto x = torch::randn({1, state.range(0), state.range(1), state.range(1)}, device);
  for (auto _ : state) {
    tuner(x).sum().backward();
    sync(device);
  }
}
BENCHMARK(SCTunerForwardBackward)->Apply(skip_shapes)->Unit(benchmark::kMillisecond);

void CSCSkipEditForwardBackward(benchmark::State& state) {
  const auto device = bench_device();
  const int64_t c = state.range(0), side = state.range(1);
  scedit::CSCTuner csc(scedit::CSCTunerOptions({c}, {false}).hint_channels(16));
  csc->to(device);
  scedit::ConditionScope condition;
  condition.set(csc, torch::rand({1, 3, 8 * side, 8 * side}, device));
  auto s = torch::randn({1, c, side, side}, device);
  for (auto _ : state) {
    csc->delta(0, s).sum().backward(/*gradient=*/{}, /*retain_graph=*/true);
    sync(device);
  }
}
BENCHMARK(CSCSkipEditForwardBackward)->Apply(skip_shapes)->Unit(benchmark::kMillisecond);

void LoRALinearForwardBackward(benchmark::State& state) {
  const auto device = bench_device();
  const int64_t c = state.range(0), tokens = state.range(1) * state.range(1);
  scedit::LoRALinear layer(torch::nn::LinearOptions(c, c).bias(false), scedit::LoRAOptions(64));
  layer->to(device);
  auto x = torch::randn({1, tokens, c}, device);
  for (auto _ : state) {
    layer(x).sum().backward();
    sync(device);
  }
}
BENCHMARK(LoRALinearForwardBackward)->Apply(skip_shapes)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
