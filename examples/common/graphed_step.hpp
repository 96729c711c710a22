#pragma once
/// @file graphed_step.hpp
/// @brief A whole training step (noise draw, forward, backward, clip, AdamW) recorded once as a
/// CUDA graph and replayed: at small batch sizes a step is bound by the CPU launching thousands
/// of small kernels, and a replay launches them all at once.
///
/// What makes the step capturable: noise and timesteps are drawn on the device from a generator
/// the graph advances on each replay; the batch (latents, text, SDXL's added conditioning, conditions) is copied into fixed
/// ("static") tensors the graph reads; AdamW keeps its step count and learning rate on the device
/// (`scedit::CapturableAdamW`); gradient clipping reads no norm on the host; the gradients are
/// allocated by the captured backward pass itself. fp16 (whose loss scaling reads the gradients
/// on the host) and gradient accumulation are not captured.
///
/// On the CPU, and on builds of LibTorch without CUDA, the same step runs uncaptured, which is
/// how the tests check its arithmetic against `TrainStep`.

#include <common/train_step.hpp>
#include <scedit/foreach_adamw.hpp>

#include <torch/torch.h>

#include <memory>
#include <mutex>
#include <optional>

/// 1 where steps can be captured: LibTorch with CUDA, unless built with -DSCEDIT_NO_CUDA_GRAPHS
/// (then a CUDA run takes the same step uncaptured).
#if defined(SCEDIT_WITH_CUDA) && !defined(SCEDIT_NO_CUDA_GRAPHS)
#define SCEDIT_CUDA_GRAPHS 1
#else
#define SCEDIT_CUDA_GRAPHS 0
#endif

#if SCEDIT_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace common {

/// One optimizer step per call, captured as a CUDA graph after `eager_steps` uncaptured ones.
///
/// Example:
/// @code
/// common::GraphedTrainStep graphed(step, seed);
/// for (int64_t i = 0; i < steps; ++i) {
///   auto loss = graphed.run(batch, common::learning_rate(options, i, steps));
///   if (i % 10 == 0) std::cout << loss.item<double>() << "\n";  // waits for the GPU
/// }
/// graphed.sync_optimizer_state();  // before saving step.optimizer()
/// @endcode
class GraphedTrainStep {
 public:
  /// Trains through `step` (its UNet, tuners and optimizer, whose state must already hold any
  /// checkpoint to resume from). Noise and timesteps come from the device's default generator,
  /// seeded here with `seed`. The first `eager_steps` calls run uncaptured: lazy initialisation
  /// (library handles, the optimizer's state, cached ᾱ on the device) must not happen during a
  /// capture. `capture` false never captures (the same step, eagerly: for comparisons).
  GraphedTrainStep(TrainStep& step, uint64_t seed, int64_t eager_steps = 2, bool capture = true)
      : step_(step),
        adamw_(step.optimizer()),
        eager_steps_(eager_steps),
        capture_(SCEDIT_CUDA_GRAPHS && capture && step.device().is_cuda()) {
    check_precision(step.precision());
    TORCH_CHECK(eager_steps >= 1, "GraphedTrainStep: eager_steps must be at least 1, got ", eager_steps);
#if !defined(SCEDIT_WITH_CUDA)
    TORCH_CHECK(!step.device().is_cuda(), "GraphedTrainStep: this build of LibTorch has no CUDA");
#endif
    if (step.device().is_cpu()) {
      generator_ = torch::make_generator<at::CPUGeneratorImpl>(seed);
    } else {
      generator_ = at::globalContext().defaultGenerator(step.device());
      std::lock_guard<std::mutex> lock(generator_.mutex());
      generator_.set_current_seed(seed);
    }
  }

  /// Refuses fp16, whose loss scaling reads the gradients on the host every step (programs call
  /// it before loading a model, to fail early).
  static void check_precision(sd::Precision precision) {
    TORCH_CHECK(precision != sd::Precision::kFP16, "--cuda-graph: fp16 is not supported (its loss "
                "scaling reads the gradients on the host every step); use bf16 or fp32");
  }

  /// One optimizer step on this micro-batch at learning rate `lr`, every call with the shapes of
  /// the first. Returns the loss, 0-dim float32 on the device; reading it waits for the GPU, and
  /// the next call overwrites it.
  torch::Tensor run(const TrainBatch& batch, double lr) {
    set_inputs(batch);
    adamw_.set_lr(step_.learning_rates(lr));
    ++calls_;
    if (!capture_) return body();
#if SCEDIT_CUDA_GRAPHS
    if (!graph_) {
      // Eager steps and the capture run on a side stream (a capture cannot use the default one).
      c10::cuda::device_synchronize();
      if (!side_stream_) side_stream_ = c10::cuda::getStreamFromPool(false, step_.device().index());
      c10::cuda::CUDAStreamGuard side(*side_stream_);
      if (calls_ <= eager_steps_) {
        auto loss = body();
        c10::cuda::device_synchronize();
        return loss;
      }
      graph_ = std::make_unique<at::cuda::CUDAGraph>();
      graph_->capture_begin();
      loss_ = body();  // the replays rewrite this tensor
      graph_->capture_end();
      c10::cuda::device_synchronize();
    }
    graph_->replay();  // on the current stream, after the input copies above
#endif
    return loss_;
  }

  /// Writes the device step count into the optimizer's state (a host read): before saving it.
  void sync_optimizer_state() { adamw_.sync(); }

  /// Whether steps after the eager ones are replayed from a CUDA graph.
  bool captures() const { return capture_; }

 private:
  // The step the graph records: reads only static_ (the batch) and device tensors.
  // Returns the loss, 0-dim on the device.
  torch::Tensor body() {
    // No gradients when the backward pass starts: it allocates them, which during a capture puts
    // them in the graph's memory pool, where every replay rewrites them. (A handle: same parameter.)
    for (auto p : step_.parameters()) p.mutable_grad().reset();
    const auto device = step_.device();
    auto noise = torch::randn(static_.latents.sizes(), generator_,
                              torch::TensorOptions().dtype(torch::kFloat32).device(device));
    auto t = torch::randint(0, step_.num_train_timesteps(), {static_.latents.size(0)}, generator_,
                            torch::TensorOptions().dtype(torch::kLong).device(device));
    auto loss = step_.loss(static_, noise, t);
    step_.backward(loss);
    step_.reduce_gradients();
    if (step_.options().max_grad_norm > 0) adamw_.clip_grad_norm(step_.options().max_grad_norm);
    adamw_.step();
    return loss.detach();
  }

  // Copies the batch into the tensors the graph reads (allocated on the first call).
  void set_inputs(const TrainBatch& batch) {
    auto all = [](const TrainBatch& b) {
      std::vector<torch::Tensor> tensors{b.latents, b.text};
      for (const auto& part : {b.added.text_embeds, b.added.time_ids}) {
        if (part.defined()) tensors.push_back(part);
      }
      tensors.insert(tensors.end(), b.conditions.begin(), b.conditions.end());
      return tensors;
    };
    if (!static_.latents.defined()) {
      auto fixed = [&](const torch::Tensor& x) { return x.defined() ? x.to(step_.device()).clone() : x; };
      static_.latents = fixed(batch.latents);
      static_.text = fixed(batch.text);
      static_.added = {fixed(batch.added.text_embeds), fixed(batch.added.time_ids)};
      for (const auto& c : batch.conditions) static_.conditions.push_back(fixed(c));
      return;
    }
    const auto fixed = all(static_), given = all(batch);
    bool same = fixed.size() == given.size();
    for (size_t i = 0; same && i < fixed.size(); ++i) same = fixed[i].sizes() == given[i].sizes();
    TORCH_CHECK(same, "--cuda-graph: every batch must have the shapes of the first (latents ",
                static_.latents.sizes(), ", text ", static_.text.sizes(), ", ",
                static_.conditions.size(), " conditions), got latents ", batch.latents.sizes(),
                ", text ", batch.text.sizes(), ", ", batch.conditions.size(),
                " conditions; drop the last partial batch or the flag");
    for (size_t i = 0; i < fixed.size(); ++i) fixed[i].copy_(given[i]);
  }

  TrainStep& step_;
  scedit::CapturableAdamW adamw_;
  int64_t eager_steps_;
  bool capture_;
  int64_t calls_ = 0;
  torch::Generator generator_;
  TrainBatch static_;
  torch::Tensor loss_;
#if SCEDIT_CUDA_GRAPHS
  // Made at the first capture: both touch CUDA, which a CPU run of a CUDA build must not need.
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  std::optional<c10::cuda::CUDAStream> side_stream_;
#endif
};

}  // namespace common
