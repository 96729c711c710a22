#pragma once
/// @file noise_prediction.hpp
/// @brief The noise prediction of one denoising step: one UNet call over [uncond; cond] (with
/// the ControlNets' residuals) and classifier-free guidance with rescale, as diffusers'
/// pipelines compute it (`predict_noise`); and the same for every step of a sampler's batch,
/// replayed from a CUDA graph where one applies (`NoisePrediction`).
///
/// Why a graph: at batch 1 a step's UNet call launches over a thousand small kernels, and the
/// CPU launching them is slower than the GPU running them; a replay launches them at once (the
/// training step ran 2.2–2.8× faster so at batch 1, bench/RESULTS.md v0.6). The DDIM update after it
/// reads ᾱ at the step's timestep on the host, so it stays outside the graph: a few element-wise
/// kernels a step.

#include <sd/controlnet.hpp>
#include <sd/cuda_graph.hpp>
#include <sd/scheduler.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/unet.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace sd {

/// A ControlNet as one step of the sampler runs it: the model, its condition image float
/// [1, 3, H, W] in [0, 1] in the model's dtype and device, its strength.
struct ControlInput {
  ControlNetModel model{nullptr};  ///< The ControlNet.
  torch::Tensor image;             ///< Its condition, [1, 3, H, W] in [0, 1].
  double scale = 1.0;              ///< Its conditioning scale.
};

namespace detail {

/// A denoising batch's text and added conditioning as the UNet reads it: [uncond; cond]
/// ([2B, …]) with guidance, cond alone ([B, …]) without, in the UNet's dtype.
struct StepConditioning {
  torch::Tensor context;      ///< [2B or B, 77, D]
  UNetAddedConditions added;  ///< SDXL's pooled text and size ids; empty otherwise
  bool guided = false;        ///< whether the batch holds both halves of guidance
};

/// Joins a batch's conditioning (see `predict_noise` for the arguments).
inline StepConditioning join_conditioning(torch::Dtype dtype, const torch::Tensor& cond, const torch::Tensor& uncond,
                                          const UNetAddedConditions& added_cond,
                                          const UNetAddedConditions& added_uncond) {
  StepConditioning out;
  out.guided = uncond.defined();
  const auto join = [&](const torch::Tensor& u, const torch::Tensor& c) {
    return (out.guided ? torch::cat({u, c}) : c).to(dtype);  // [2B or B, …]
  };
  out.context = join(uncond, cond);
  if (added_cond.defined()) {
    TORCH_CHECK(!out.guided || added_uncond.defined(), "predict_noise: guidance on a UNet with added "
                "conditioning needs the unconditional half's (added_uncond)");
    out.added = {join(added_uncond.text_embeds, added_cond.text_embeds),
                 join(added_uncond.time_ids, added_cond.time_ids)};
  }
  return out;
}

/// The guided noise prediction for `latents` [B, C, h, w] at `timestep` ([1], on the host or the
/// UNet's device), in the latents' dtype.
inline torch::Tensor guided_noise(UNet& unet, const torch::Tensor& latents, const torch::Tensor& timestep,
                                  const StepConditioning& conditioning, double guidance_scale,
                                  double guidance_rescale, const std::vector<ControlInput>& controls) {
  const auto dtype = first_parameter(*unet, "UNet").scalar_type();
  const auto input = (conditioning.guided ? torch::cat({latents, latents}) : latents).to(dtype);
  const auto& added = conditioning.added;
  UNetResiduals residuals;
  for (const auto& control : controls) {
    const auto control_dtype = first_parameter(*control.model, "ControlNet").scalar_type();
    const UNetAddedConditions control_added =
        added.defined() ? UNetAddedConditions{added.text_embeds.to(control_dtype), added.time_ids}
                        : UNetAddedConditions{};
    auto r = control.model.ptr()->forward(input.to(control_dtype), timestep,
                                          conditioning.context.to(control_dtype), control_added,
                                          control.image.expand({input.size(0), -1, -1, -1}),
                                          control.scale);
    if (residuals.down.empty()) {
      residuals = std::move(r);
      continue;
    }
    for (size_t i = 0; i < residuals.down.size(); ++i) residuals.down[i] = residuals.down[i] + r.down[i];
    residuals.mid = residuals.mid + r.mid;
  }
  for (auto& r : residuals.down) r = r.to(dtype);
  if (residuals.mid.defined()) residuals.mid = residuals.mid.to(dtype);
  const auto eps = unet(input, timestep, conditioning.context, added, residuals).to(latents.scalar_type());
  if (!conditioning.guided) return eps;
  const auto halves = eps.chunk(2);
  return classifier_free_guidance(halves[0], halves[1], guidance_scale, guidance_rescale);
}

}  // namespace detail

/// The noise prediction of one step. With `uncond` defined: one UNet call over the batch
/// [uncond; cond] ([2B, …]) and classifier-free guidance with rescale; without: the
/// conditional prediction alone. `latents` [B, C, h, w], `cond` / `uncond` [B, 77, D]; the
/// result is in the latents' dtype. Each ControlNet of `controls` sees the same batch and its
/// image for every row (both halves of guidance); their residuals add up. An SDXL UNet also
/// reads `added_cond` and, with guidance, `added_uncond` (`added_conditions`, [B, …] each), and
/// so do its ControlNets.
inline torch::Tensor predict_noise(UNet& unet, const torch::Tensor& latents, int64_t t,
                                   const torch::Tensor& cond, const torch::Tensor& uncond,
                                   double guidance_scale, double guidance_rescale,
                                   const std::vector<ControlInput>& controls = {},
                                   const UNetAddedConditions& added_cond = {},
                                   const UNetAddedConditions& added_uncond = {}) {
  const auto dtype = detail::first_parameter(*unet, "UNet").scalar_type();
  return detail::guided_noise(unet, latents, torch::full({1}, t, torch::kInt64),
                              detail::join_conditioning(dtype, cond, uncond, added_cond, added_uncond),
                              guidance_scale, guidance_rescale, controls);
}

/// `predict_noise` for every step of a sampler's batches, with the guidance settings and
/// ControlNets of one call. Where a CUDA graph applies (`CudaGraph::available` on the UNet's
/// device, and asked for), the first step of each new batch shape runs eagerly (lazy
/// initialisation), the second is recorded, and the rest are replays: the same kernels on the
/// same inputs, so the same predictions. Elsewhere every step is `predict_noise`.
///
/// The UNet's weights, its tuners' conditions (`scedit::ConditionScope`) and the ControlNets'
/// images must stay as they are while this object lives: a graph reads them where they were.
///
/// Example:
/// @code
/// sd::NoisePrediction predict(pipe.unet, 7.5, 0.5, /*controls=*/{}, /*cuda_graph=*/true);
/// predict.set_batch(text, uncond);
/// for (int64_t t : timesteps) latents = scheduler.step(predict(latents, t), t, latents);
/// @endcode
class NoisePrediction {
 public:
  /// Predicts through `unet` with guidance `guidance_scale` (and rescale `guidance_rescale`) and
  /// `controls`; replays from a CUDA graph where one applies if `cuda_graph`.
  NoisePrediction(UNet unet, double guidance_scale, double guidance_rescale, std::vector<ControlInput> controls,
                  bool cuda_graph)
      : unet_(std::move(unet)),
        guidance_scale_(guidance_scale),
        guidance_rescale_(guidance_rescale),
        controls_(std::move(controls)),
        device_(detail::first_parameter(*unet_, "UNet").device()),
        dtype_(detail::first_parameter(*unet_, "UNet").scalar_type()),
        capture_(cuda_graph && CudaGraph::available(device_)) {}

  /// The text of the next steps: `cond` [B, 77, D]; `uncond` likewise with guidance, undefined
  /// without; SDXL's `added_cond` and `added_uncond` (see `predict_noise`).
  void set_batch(const torch::Tensor& cond, const torch::Tensor& uncond,
                 const UNetAddedConditions& added_cond = {}, const UNetAddedConditions& added_uncond = {}) {
    auto joined = detail::join_conditioning(dtype_, cond, uncond, added_cond, added_uncond);
    if (graph_ && same_shapes(joined, conditioning_)) {  // the graph reads them where they are
      conditioning_.context.copy_(joined.context);
      if (joined.added.defined()) {
        conditioning_.added.text_embeds.copy_(joined.added.text_embeds);
        conditioning_.added.time_ids.copy_(joined.added.time_ids);
      }
      return;
    }
    conditioning_ = std::move(joined);
    graph_.reset();  // new shapes: warm up and record anew
  }

  /// The noise prediction for `latents` [B, C, h, w] at timestep `t`, in the latents' dtype.
  /// From a graph, the next call rewrites the tensor it returns.
  torch::Tensor operator()(const torch::Tensor& latents, int64_t t) {
    TORCH_CHECK(conditioning_.context.defined(), "NoisePrediction: no batch set (set_batch)");
    if (!capture_) {
      return detail::guided_noise(unet_, latents, torch::full({1}, t, torch::kInt64), conditioning_,
                                  guidance_scale_, guidance_rescale_, controls_);
    }
    if (graph_ && (latents_.sizes() != latents.sizes() || latents_.scalar_type() != latents.scalar_type())) {
      graph_.reset();
    }
    if (!graph_) {  // the first step of a batch shape: eager, on the stream the capture will use
      latents_ = latents.clone();
      timestep_ = torch::full({1}, t, torch::TensorOptions().dtype(torch::kInt64).device(device_));
      graph_.emplace(device_);
      torch::Tensor eps;
      graph_->warm_up([&] { eps = predict(); });
      return eps;
    }
    latents_.copy_(latents);
    timestep_.fill_(t);  // a kernel with t as its argument: no copy from the host
    if (graph_->captured()) {
      graph_->replay();
    } else {
      graph_->capture([&] { eps_ = predict(); });
    }
    return eps_;
  }

  /// Whether steps are replayed from a CUDA graph.
  bool captures() const { return capture_; }

 private:
  torch::Tensor predict() {
    return detail::guided_noise(unet_, latents_, timestep_, conditioning_, guidance_scale_, guidance_rescale_,
                                controls_);
  }

  static bool same_shapes(const detail::StepConditioning& a, const detail::StepConditioning& b) {
    const auto same = [](const torch::Tensor& x, const torch::Tensor& y) {
      return x.defined() == y.defined() && (!x.defined() || x.sizes() == y.sizes());
    };
    return a.guided == b.guided && same(a.context, b.context) && same(a.added.text_embeds, b.added.text_embeds) &&
           same(a.added.time_ids, b.added.time_ids);
  }

  UNet unet_;
  double guidance_scale_, guidance_rescale_;
  std::vector<ControlInput> controls_;
  torch::Device device_;
  torch::Dtype dtype_;
  bool capture_;
  detail::StepConditioning conditioning_;  // the graph's inputs, with latents_ and timestep_
  torch::Tensor latents_, timestep_;
  torch::Tensor eps_;                      // the graph's output
  std::optional<CudaGraph> graph_;         // for the current shapes; empty until the first step
};

}  // namespace sd
