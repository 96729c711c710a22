#pragma once
/// @file train_step.hpp
/// @brief One training step, shared by the programs and the benches: a micro-batch, the noise at
/// a random timestep, one call of the program's denoiser under autocast, the loss, the backward
/// pass, then AdamW on the trainable parameters (with fp16 loss scaling and clipping).
///
/// The step knows nothing of what it trains: a program hands it the parameters and the model
/// call that reaches them (`Trainable`), so SC-Tuners, CSC-Tuners with their conditions, LoRA or
/// a ControlNet all train through the same code. The data path is docs/ARCHITECTURE.md's.

#include <sd/embeddings.hpp>
#include <sd/precision.hpp>
#include <sd/scheduler.hpp>

#include <scedit/compat.hpp>
#include <scedit/foreach_adamw.hpp>
#include <scedit/safetensors.hpp>

#include <common/optim.hpp>

#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace common {

/// One micro-batch as the step sees it, every tensor on the step's device.
struct TrainBatch {
  /// The UNet's latents [B, 4, h, w] (a VAE posterior draw, × scaling factor), float32.
  torch::Tensor latents;
  /// Text embeddings [B, 77, D] from the frozen text encoder(s), or the captions' token ids
  /// (`sd::tokenize_prompts`: [B, 77], SDXL [B, 2, 77], int64) for a `Trainable` that runs (and
  /// trains) the text encoder itself.
  torch::Tensor text;
  /// SDXL's added conditioning: the pooled text embedding [B, P] (undefined when the denoiser
  /// computes it from token ids) and the size conditioning's time ids [B, 6]; empty for SD 1.x
  /// and 2.x.
  sd::UNetAddedConditions added;
  /// Condition images, one tensor per condition, each [B, 3, 8h, 8w] in [0, 1] (none for style).
  std::vector<torch::Tensor> conditions;
};

/// The model call of a training step: noisy latents [B, 4, h, w], timesteps [B] int64, the
/// batch's text (embeddings [B, 77, D], in the frozen weights' dtype as the latents; or token ids,
/// see `Trainable::text_as_tokens`), its added conditioning (`TrainBatch::added`, floating parts
/// in the frozen dtype; empty but for SDXL) and its conditions -> the prediction [B, 4, h, w].
/// It runs under the step's autocast; every trainable parameter must be reached from it.
using Denoiser = std::function<torch::Tensor(const torch::Tensor& noisy, const torch::Tensor& timesteps,
                                             const torch::Tensor& text, const sd::UNetAddedConditions& added,
                                             const std::vector<torch::Tensor>& conditions)>;

/// What a program trains: the parameters, the model call that reaches them, and how its final
/// weights are written.
struct Trainable {
  /// The trainable tensors with their names (the keys of a checkpoint), in optimizer order.
  std::vector<std::pair<std::string, torch::Tensor>> parameters;
  /// The model call of a step.
  Denoiser denoiser;
  /// What is trained (e.g. `{"method": "scedit"}`): recorded in checkpoints, checked on resume.
  nlohmann::json settings = nlohmann::json::object();
  /// Writes the final weights into a folder and returns the files it wrote.
  std::function<std::vector<std::string>(const std::filesystem::path&)> save;
  /// The optimizer's parameter groups as consecutive runs of `parameters`: each run's length and
  /// its learning rate as a multiple of the run's. Empty: one group, at the run's rate.
  std::vector<std::pair<size_t, double>> groups;
  /// Whether the denoiser takes the captions as token ids and runs the text encoder itself (it
  /// trains parts of it) rather than taking the frozen encoder's embeddings.
  bool text_as_tokens = false;

  /// The tensors alone, in optimizer order.
  std::vector<torch::Tensor> tensors() const {
    std::vector<torch::Tensor> out;
    for (const auto& named : parameters) out.push_back(named.second);
    return out;
  }
  /// The tensors by name, as checkpoints hold them.
  scedit::TensorMap by_name() const {
    scedit::TensorMap out;
    for (const auto& named : parameters) out[named.first] = named.second;
    return out;
  }
};

/// The random draws of one micro-step (`TrainStep::draw`), on the step's device.
struct StepDraws {
  torch::Tensor noise;      ///< ε [B, 4, h, w] float32.
  torch::Tensor timesteps;  ///< t [B] int64 in [0, T).
};

/// The training objective: the latents noised to timestep t, the denoiser under autocast, MSE
/// against what the model predicts (ε or v). The step trains with it; validation measures with it.
struct DenoisingLoss {
  sd::NoiseSchedule schedule;           ///< ᾱ_t, the noising and the v target
  std::string prediction_type = "epsilon";  ///< epsilon | v_prediction
  sd::Precision precision = sd::Precision::kFP32;  ///< frozen weights' dtype and autocast

  /// The loss (0-dim float32, with its autograd graph) of `batch` for noise ε [B, 4, h, w]
  /// float32 and timesteps t [B] int64, all on the batch's device. Reads nothing on the host.
  torch::Tensor operator()(const Denoiser& denoiser, const TrainBatch& batch, const torch::Tensor& noise,
                           const torch::Tensor& t) const {
    const auto frozen = sd::compute_dtype(precision);
    auto x0 = batch.latents.to(torch::kFloat32);
    auto noisy = schedule.add_noise(x0, noise, t);  // q(x_t | x_0)
    auto target = schedule.prediction_target(prediction_type, x0, noise, t);
    scedit::compat::AutocastGuard autocast(noise.device().type(), frozen);
    auto frozen_dtype = [&](const torch::Tensor& x) {
      return x.defined() && x.is_floating_point() ? x.to(frozen) : x;
    };
    const sd::UNetAddedConditions added{frozen_dtype(batch.added.text_embeds), frozen_dtype(batch.added.time_ids)};
    auto prediction = denoiser(noisy.to(frozen), t, frozen_dtype(batch.text), added, batch.conditions);
    return torch::mse_loss(prediction.to(torch::kFloat32), target);
  }
};

/// How a step's gradients are reduced across processes (examples/common/gradient_reducer.hpp
/// averages them over the ranks of a run): told when each backward pass begins, so that it can
/// start reducing during the step's last one, and asked to finish before the optimizer step.
class GradientReduction {
 public:
  virtual ~GradientReduction() = default;
  /// Called before each backward pass; `last`: it is the step's last micro-step, after which the
  /// gradients are complete.
  virtual void begin_backward(bool last) = 0;
  /// Called once the step's backward passes are done, before the fp16 unscale, the finite check
  /// and clipping: on return, the parameters' gradients are the reduced ones.
  virtual void finish() = 0;
};

/// One training step (shared by the programs and the benches).
class TrainStep {
 public:
  /// Trains `parameters` (float32, on `device`) through `denoiser`; `prediction_type` is the
  /// target of the loss: `epsilon` or `v_prediction`; `groups` as `Trainable::groups`.
  TrainStep(Denoiser denoiser, std::vector<torch::Tensor> parameters, sd::NoiseSchedule schedule,
            OptimOptions options, sd::Precision precision, torch::Device device,
            std::string prediction_type = "epsilon", std::vector<std::pair<size_t, double>> groups = {})
      : denoiser_(std::move(denoiser)),
        loss_{std::move(schedule), std::move(prediction_type), precision},
        options_(std::move(options)),
        device_(device),
        params_(std::move(parameters)),
        groups_(groups.empty() ? std::vector<std::pair<size_t, double>>{{params_.size(), 1.0}} : std::move(groups)),
        optimizer_(param_groups(), adamw_options(options_.lr)) {
    TORCH_CHECK(!params_.empty(), "TrainStep: nothing to train (no trainable parameters)");
    TORCH_CHECK(denoiser_ != nullptr, "TrainStep: no denoiser");
    TORCH_CHECK(loss_.prediction_type == "epsilon" || loss_.prediction_type == "v_prediction",
                "--prediction must be epsilon or v_prediction, got '", loss_.prediction_type, "'");
    sd::check_precision(loss_.precision, device_);
  }

  /// Forward and backward of one micro-batch: draws noise and timesteps from `generator`, adds
  /// the gradients of `loss / accumulation` to the parameters, returns the (unscaled) loss as a
  /// 0-dim float32 tensor on the device: reading it (`item`) waits for the GPU, so callers do
  /// that once the step is queued, not in between.
  torch::Tensor forward_backward(const TrainBatch& batch, torch::Generator& generator,
                                 int64_t accumulation = 1) {
    const auto [noise, t] = draw(batch.latents.sizes(), generator);
    auto loss = this->loss(batch, noise, t);
    backward(loss * (loss_scale_ / static_cast<double>(accumulation)), ++micro_steps_ >= accumulation);
    return loss.detach();
  }

  /// The random draws of one micro-step from its CPU `generator`, on the device: the noise ε
  /// [B, 4, h, w] float32 for latents of `sizes` and the timesteps t [B] int64 in [0, T). Both are
  /// a pure function of the generator's state (so a resume stays exact). On the CPU ε comes from
  /// `generator` itself; elsewhere from a device generator seeded by one draw of it, so that no
  /// host-side draw and copy (~7 ms at batch 30) holds up the GPU.
  StepDraws draw(at::IntArrayRef sizes, torch::Generator& generator) const {
    const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(device_);
    torch::Tensor noise;
    if (device_.is_cpu()) {
      noise = torch::randn(sizes, generator, options);
    } else {
      uint64_t seed;
      {
        std::lock_guard<std::mutex> lock(generator.mutex());
        seed = at::check_generator<at::CPUGeneratorImpl>(generator)->random64();
      }
      auto on_device = at::globalContext().defaultGenerator(device_).clone();
      {
        std::lock_guard<std::mutex> lock(on_device.mutex());
        on_device.set_current_seed(seed);
      }
      noise = torch::randn(sizes, on_device, options);
    }
    auto t = torch::randint(0, num_train_timesteps(), {sizes[0]}, generator, torch::kLong).to(device_);
    return {noise, t};
  }

  /// The training loss (`DenoisingLoss`) of one micro-batch for the given noise ε [B, 4, h, w]
  /// float32 and timesteps t [B] int64, all on the device. Reads nothing on the host.
  torch::Tensor loss(const TrainBatch& batch, const torch::Tensor& noise, const torch::Tensor& t) {
    return loss_(denoiser_, batch, noise, t);
  }

  /// The backward pass of `loss`, adding to the parameters' gradients; `last`: the step's last
  /// micro-step (the gradient reduction may start during it).
  void backward(const torch::Tensor& loss, bool last = true) {
    if (reduction_) reduction_->begin_backward(last);
    loss.backward();
  }

  /// Applies the accumulated gradients at learning rate `lr`: reduce (the gradient reduction),
  /// unscale (fp16), skip the step on overflow, clip, AdamW, zero the gradients. Returns false
  /// when an fp16 overflow skipped it.
  bool optimizer_step(double lr) {
    reduce_gradients();
    bool finite = true;
    if (loss_scale_ != 1.0) {
      torch::NoGradGuard no_grad;
      for (auto& p : params_) {
        if (!p.grad().defined()) continue;
        p.grad().div_(loss_scale_);
        finite = finite && torch::isfinite(p.grad()).all().item<bool>();
      }
    }
    if (finite) {
      if (options_.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(params_, options_.max_grad_norm);
      const auto rates = learning_rates(lr);
      for (size_t g = 0; g < rates.size(); ++g) {
        static_cast<torch::optim::AdamWOptions&>(optimizer_.param_groups()[g].options()).lr(rates[g]);
      }
      if (options_.foreach) {
        scedit::foreach_adamw_step(optimizer_);
      } else {
        optimizer_.step();
      }
    }
    optimizer_.zero_grad();
    micro_steps_ = 0;
    update_loss_scale(finite);
    return finite;
  }

  /// The learning rate of each optimizer group when the run's rate is `lr`.
  std::vector<double> learning_rates(double lr) const {
    std::vector<double> rates;
    for (const auto& group : groups_) rates.push_back(lr * group.second);
    return rates;
  }

  /// Sets what reduces the gradients before each optimizer step (nothing by default).
  void set_gradient_reduction(std::shared_ptr<GradientReduction> reduction) { reduction_ = std::move(reduction); }
  /// Finishes the gradient reduction, if any (the graphed step calls it too).
  void reduce_gradients() {
    if (reduction_) reduction_->finish();
  }

  /// The optimizer (its state goes into checkpoints).
  torch::optim::AdamW& optimizer() { return optimizer_; }
  /// The trainable parameters, in optimizer order.
  const std::vector<torch::Tensor>& parameters() const { return params_; }
  /// Current fp16 loss scale (1 unless fp16).
  double loss_scale() const { return loss_scale_; }
  /// Restores the fp16 loss scale from a checkpoint.
  void set_loss_scale(double scale) { loss_scale_ = scale; }
  /// The dtype frozen weights and model inputs use.
  torch::Dtype frozen_dtype() const { return sd::compute_dtype(loss_.precision); }
  /// The optimizer options the step was built with.
  const OptimOptions& options() const { return options_; }
  /// The precision the step trains in.
  sd::Precision precision() const { return loss_.precision; }
  /// The device the model and the trainable parameters sit on.
  const torch::Device& device() const { return device_; }
  /// T of the noise schedule: timesteps are drawn from [0, T).
  int64_t num_train_timesteps() const { return loss_.schedule.num_train_timesteps(); }

 private:
  torch::optim::AdamWOptions adamw_options(double lr) const {
    return torch::optim::AdamWOptions(lr)
        .betas({options_.beta1, options_.beta2})
        .eps(options_.eps)
        .weight_decay(options_.weight_decay);
  }

  // `groups_` as the optimizer's parameter groups.
  std::vector<torch::optim::OptimizerParamGroup> param_groups() const {
    std::vector<torch::optim::OptimizerParamGroup> out;
    size_t begin = 0;
    for (const auto& [count, factor] : groups_) {
      TORCH_CHECK(count > 0 && begin + count <= params_.size() && std::isfinite(factor) && factor > 0,
                  "TrainStep: parameter group of ", count, " tensors at ", factor, "× the learning rate "
                  "does not fit the ", params_.size(), " parameters (or its factor is not positive)");
      std::vector<torch::Tensor> params(params_.begin() + static_cast<std::ptrdiff_t>(begin),
                                        params_.begin() + static_cast<std::ptrdiff_t>(begin + count));
      out.emplace_back(std::move(params), std::make_unique<torch::optim::AdamWOptions>(
                                              adamw_options(options_.lr * factor)));
      begin += count;
    }
    TORCH_CHECK(begin == params_.size(), "TrainStep: the parameter groups hold ", begin, " of the ",
                params_.size(), " parameters");
    return out;
  }


  // Dynamic loss scaling (as torch.cuda.amp.GradScaler): halve on overflow, double after 2000
  // clean steps.
  void update_loss_scale(bool finite) {
    if (loss_.precision != sd::Precision::kFP16) return;
    if (!finite) {
      loss_scale_ = std::max(1.0, loss_scale_ / 2);
      clean_steps_ = 0;
    } else if (++clean_steps_ % 2000 == 0) {
      loss_scale_ *= 2;
    }
  }

  Denoiser denoiser_;
  DenoisingLoss loss_;
  OptimOptions options_;
  torch::Device device_;
  std::vector<torch::Tensor> params_;
  std::vector<std::pair<size_t, double>> groups_;  // before optimizer_, which is built from it
  torch::optim::AdamW optimizer_;
  std::shared_ptr<GradientReduction> reduction_;
  int64_t micro_steps_ = 0;  // backward passes since the last optimizer step
  double loss_scale_ = loss_.precision == sd::Precision::kFP16 ? 65536.0 : 1.0;
  int64_t clean_steps_ = 0;
};

}  // namespace common
