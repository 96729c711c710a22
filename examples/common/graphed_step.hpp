#pragma once
/// @file graphed_step.hpp
/// @brief A whole training step (forward, backward, clip, AdamW) recorded once as a CUDA graph
/// (sd/cuda_graph.hpp) and replayed: at small batch sizes a step is bound by the CPU launching
/// thousands of small kernels, and a replay launches them all at once.
///
/// What makes the step capturable: the batch (latents, text, SDXL's added conditioning,
/// conditions) and the micro-step's noise and timesteps — drawn exactly as `TrainStep` draws them,
/// outside the graph — are copied into fixed ("static") tensors the graph reads; AdamW keeps its
/// step count and learning rate on the device (`scedit::CapturableAdamW`); gradient clipping
/// reads no norm on the host; the gradients are allocated by the captured backward pass itself.
/// So a graphed run trains on the eager run's draws, and resumes as exactly. fp16 (whose loss
/// scaling reads the gradients on the host) and gradient accumulation are not captured
/// (`choose_cuda_graph` says where a graph applies).
///
/// On the CPU, and on builds of LibTorch without CUDA, the same step runs uncaptured, which is
/// how the tests check its arithmetic against `TrainStep`.

#include <common/train_step.hpp>
#include <sd/cuda_graph.hpp>
#include <scedit/foreach_adamw.hpp>

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>

namespace common {

/// Whether a run trains through `GraphedTrainStep` (`choose_cuda_graph`), and why not.
struct CudaGraphChoice {
  bool graphed = false;  ///< steps go through GraphedTrainStep: captured and replayed on CUDA
  std::string why_not;   ///< when not: what rules it out, for the run's log
};

namespace detail {
/// Why an fp16 step is never captured.
inline constexpr const char* kFp16NotCaptured =
    "fp16's loss scaling reads the gradients on the host every step; use bf16 or fp32";
}  // namespace detail

/// Where a captured step applies: a CUDA device and a build with CUDA graphs, bf16 or fp32 (fp16's
/// loss scaling reads the gradients on the host every step), one micro-batch per step and one
/// process (the captured step holds no all-reduce). `mode` is the `--cuda-graph` flag: `auto`
/// captures wherever that holds (a replay launches a step's thousands of kernels at once:
/// 2.2–2.8× the eager step's images/s at batch 1, +1% at batch 30, bench/RESULTS.md v0.4–v0.6);
/// `on` throws naming what rules it out, but on the CPU runs the same step uncaptured (which checks
/// its arithmetic); `off` never captures.
inline CudaGraphChoice choose_cuda_graph(const std::string& mode, const torch::Device& device,
                                         sd::Precision precision, int64_t grad_accum, int64_t world_size) {
  TORCH_CHECK(mode == "auto" || mode == "on" || mode == "off", "--cuda-graph must be auto, on or off, got '",
              mode, "'");
  if (mode == "off") return {false, "--cuda-graph off"};
  std::string why_not;
  if (precision == sd::Precision::kFP16) {
    why_not = detail::kFp16NotCaptured;
  } else if (grad_accum != 1) {
    why_not = "a captured step holds one micro-batch, not --grad-accum " + std::to_string(grad_accum);
  } else if (world_size != 1) {
    why_not = "the captured step has no all-reduce, and this run has " + std::to_string(world_size) +
              " processes";
  } else if (device.is_cpu()) {
    if (mode == "on") return {true, ""};
    why_not = "not a CUDA device";
  } else if (!sd::CudaGraph::available(device)) {
    why_not = device.is_cuda() ? "this build has no CUDA graphs" : "not a CUDA device";
  }
  TORCH_CHECK(mode == "auto" || why_not.empty(), "--cuda-graph on: ", why_not);
  return {why_not.empty(), why_not};
}

/// One optimizer step per call, captured as a CUDA graph after `eager_steps` uncaptured ones.
///
/// Example:
/// @code
/// common::GraphedTrainStep graphed(step);
/// for (int64_t i = 0; i < steps; ++i) {
///   auto generator = common::step_generator(seed, i);
///   auto loss = graphed.run(batch, common::learning_rate(options, i, steps), generator);
///   if (i % 10 == 0) std::cout << loss.item<double>() << "\n";  // waits for the GPU
/// }
/// graphed.sync_optimizer_state();  // before saving step.optimizer()
/// @endcode
class GraphedTrainStep {
 public:
  /// Trains through `step` (its UNet, tuners and optimizer, whose state must already hold any
  /// checkpoint to resume from). The first `eager_steps` calls run uncaptured: lazy initialisation
  /// (library handles, the optimizer's state, cached ᾱ on the device) must not happen during a
  /// capture. `capture` false never captures (the same step, eagerly: for comparisons).
  explicit GraphedTrainStep(TrainStep& step, int64_t eager_steps = 2, bool capture = true)
      : step_(step),
        adamw_(step.optimizer()),
        eager_steps_(eager_steps),
        capture_(capture && sd::CudaGraph::available(step.device())) {
    TORCH_CHECK(step.precision() != sd::Precision::kFP16, "GraphedTrainStep: ", detail::kFp16NotCaptured);
    TORCH_CHECK(eager_steps >= 1, "GraphedTrainStep: eager_steps must be at least 1, got ", eager_steps);
#if !defined(SCEDIT_WITH_CUDA)
    TORCH_CHECK(!step.device().is_cuda(), "GraphedTrainStep: this build of LibTorch has no CUDA");
#endif
  }

  /// One optimizer step on this micro-batch at learning rate `lr`, with the noise and timesteps
  /// that `TrainStep::forward_backward` would draw from `generator`; every call with the shapes
  /// of the first. Returns the loss, 0-dim float32 on the device; reading it waits for the GPU,
  /// and the next call overwrites it.
  torch::Tensor run(const TrainBatch& batch, double lr, torch::Generator& generator) {
    set_inputs(batch, step_.draw(batch.latents.sizes(), generator));
    adamw_.set_lr(step_.learning_rates(lr));
    ++calls_;
    if (!capture_) return body();
    if (!graph_) graph_.emplace(step_.device());
    if (calls_ <= eager_steps_) {
      torch::Tensor loss;
      graph_->warm_up([&] { loss = body(); });
      return loss;
    }
    if (!graph_->captured()) {
      graph_->capture([&] { loss_ = body(); });  // the replays rewrite loss_
    } else {
      graph_->replay();  // on the current stream, after the input copies above
    }
    return loss_;
  }

  /// Writes the device step count into the optimizer's state (a host read): before saving it.
  void sync_optimizer_state() { adamw_.sync(); }

  /// Whether steps after the eager ones are replayed from a CUDA graph.
  bool captures() const { return capture_; }

 private:
  // The step the graph records: reads only static_, the static draws and device tensors.
  // Returns the loss, 0-dim on the device.
  torch::Tensor body() {
    // No gradients when the backward pass starts: it allocates them, which during a capture puts
    // them in the graph's memory pool, where every replay rewrites them. (A handle: same parameter.)
    for (auto p : step_.parameters()) p.mutable_grad().reset();
    auto loss = step_.loss(static_, draws_.noise, draws_.timesteps);
    step_.backward(loss);
    step_.reduce_gradients();
    if (step_.options().max_grad_norm > 0) adamw_.clip_grad_norm(step_.options().max_grad_norm);
    adamw_.step();
    return loss.detach();
  }

  // Copies the batch and the draws into the tensors the graph reads (allocated on the first call).
  void set_inputs(const TrainBatch& batch, const StepDraws& draws) {
    auto all = [](const TrainBatch& b, const StepDraws& d) {
      std::vector<torch::Tensor> tensors{b.latents, b.text, d.noise, d.timesteps};
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
      draws_ = {fixed(draws.noise), fixed(draws.timesteps)};
      return;
    }
    const auto fixed = all(static_, draws_), given = all(batch, draws);
    bool same = fixed.size() == given.size();
    for (size_t i = 0; same && i < fixed.size(); ++i) same = fixed[i].sizes() == given[i].sizes();
    TORCH_CHECK(same, "--cuda-graph: every batch must have the shapes of the first (latents ",
                static_.latents.sizes(), ", text ", static_.text.sizes(), ", ",
                static_.conditions.size(), " conditions), got latents ", batch.latents.sizes(),
                ", text ", batch.text.sizes(), ", ", batch.conditions.size(),
                " conditions; drop the last partial batch, or train with --cuda-graph off");
    for (size_t i = 0; i < fixed.size(); ++i) fixed[i].copy_(given[i]);
  }

  TrainStep& step_;
  scedit::CapturableAdamW adamw_;
  int64_t eager_steps_;
  bool capture_;
  int64_t calls_ = 0;
  TrainBatch static_;
  StepDraws draws_;
  torch::Tensor loss_;
  std::optional<sd::CudaGraph> graph_;  // made at the first step: it touches CUDA
};

}  // namespace common
