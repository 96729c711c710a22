#pragma once
// The training step shared by the programs and the benches: tuners attached to a frozen UNet,
// AdamW on the tuner parameters only, mixed precision, loss scaling for fp16.
//
// One step (ARCHITECTURE.md): latents + text embeddings (frozen, no graph) → noise at t →
// UNet encoder (frozen, no graph: nothing upstream of the first tuner requires gradients) →
// skips edited by the tuners → decoder → MSE on the target → backward through the decoder and
// the tuners only → optimizer on the tuner parameters.

#include <scedit/compat.hpp>
#include <scedit/foreach_adamw.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>
#include <sd/scheduler.hpp>
#include <sd/unet.hpp>

#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace common {

// ---- precision and device -------------------------------------------------------------------

/// How a run computes: everything float32, or frozen weights in bf16/fp16 with autocast while the
/// trainable weights and the optimizer state stay float32.
enum class Precision { kFP32, kBF16, kFP16 };

/// Parses `fp32`, `bf16` or `fp16` (the `--precision` flag).
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

/// The dtype of frozen weights and of autocast under `precision`.
inline torch::Dtype compute_dtype(Precision precision) {
  switch (precision) {
    case Precision::kBF16: return torch::kBFloat16;
    case Precision::kFP16: return torch::kFloat16;
    default: return torch::kFloat32;
  }
}

/// Resolves `--device auto|cpu|cuda|cuda:N`; `auto` picks CUDA when there is one.
inline torch::Device resolve_device(const std::string& flag) {
  if (flag == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::kCPU;
  torch::Device device(torch::kCPU);
  try {
    device = torch::Device(flag);
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "--device must be auto, cpu or cuda[:N], got '", flag, "'");
  }
  TORCH_CHECK(!device.is_cuda() || torch::cuda::is_available(),
              "--device ", flag, ": this build or machine has no CUDA device");
  return device;
}

/// Refuses precision/device pairs LibTorch cannot run.
inline void check_precision(Precision precision, const torch::Device& device) {
  TORCH_CHECK(precision != Precision::kFP16 || device.is_cuda(),
              "--precision fp16 needs a CUDA device (LibTorch's CPU kernels lack half-precision "
              "convolutions); use bf16 on the CPU");
}

// ---- tuners ---------------------------------------------------------------------------------

/// Which tuners a run trains (the `--method` family of flags).
struct MethodOptions {
  std::string method = "scedit";  ///< scedit | lora | scedit+lora
  double sc_down_ratio = 1.0;     ///< SC-Tuner hidden width as a fraction of the skip channels
  std::string sc_pattern;         ///< regex over site paths (`lsc_identity\.[0-9]+`); empty = all 12
  int64_t lora_rank = 64;         ///< LoRA rank r (the seed's table uses 64)
  double lora_alpha = 8;          ///< LoRA alpha; scale alpha / r (the seed's table uses 8)
  std::vector<std::string> lora_targets = {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                           "ff.net.2"};  ///< peft-style module names
};

/// One `--lean` lever: its flag name and the `sd::LeanActivations` switch it sets.
struct LeanLever {
  const char* name;               ///< spelling in `--lean`
  bool sd::LeanActivations::*on;  ///< the switch
  bool fused;                     ///< runs on the fused CUDA kernels
};

/// Every lever, in the order `to_string` prints them. `all` names the first four, `fused` the
/// fused ones.
inline const std::vector<LeanLever>& lean_levers() {
  static const std::vector<LeanLever> levers = {
      {"norm-silu", &sd::LeanActivations::group_norm_silu, false},
      {"geglu", &sd::LeanActivations::geglu, false},
      {"norm-dtype", &sd::LeanActivations::norms_in_activation_dtype, false},
      {"ff-recompute", &sd::LeanActivations::recompute_feed_forward, false},
      {"fused-norm-silu", &sd::LeanActivations::fused_norm_silu, true},
      {"fused-geglu", &sd::LeanActivations::fused_geglu, true},
      {"fused-layer-norm", &sd::LeanActivations::fused_layer_norm, true},
  };
  return levers;
}

/// Parses the `--lean` flag for a run on `device`: a comma-separated list of the levers of
/// `lean_levers` (`norm-silu`: GroupNorm + SiLU keeping only its input; `geglu`: GEGLU keeping
/// only its projection; `norm-dtype`: norms in the activation dtype under autocast;
/// `ff-recompute`: feed-forwards recomputed in the backward pass; `fused-norm-silu`,
/// `fused-geglu`, `fused-layer-norm`: the fused CUDA kernels) and of the groups `all` (the four
/// portable ones), `fused` (the three fused ones), `default` (`norm-dtype`, plus `fused` where
/// this build and `device` run the kernels: the fastest measured, bench/RESULTS.md v0.5, v0.6)
/// and `none`. See sd/lean_ops.hpp. Fused levers named explicitly are refused, saying why, where
/// the build or the device cannot run them.
inline sd::LeanActivations parse_lean_activations(const std::string& list, const torch::Device& device) {
  sd::LeanActivations lean;
  std::stringstream stream(list);
  for (std::string part; std::getline(stream, part, ',');) {
    if (part == "none") continue;
    const bool by_default = part == "default", all = part == "all";
    const bool fused = part == "fused" || (by_default && sd::fused::usable(device));
    lean.norms_in_activation_dtype |= by_default;
    bool known = by_default || all || fused;
    std::string names;
    for (const auto& lever : lean_levers()) {
      const bool named = part == lever.name;
      known |= named;
      lean.*lever.on |= named || (lever.fused ? fused : all);
      names += std::string(lever.name) + ", ";
    }
    TORCH_CHECK(known, "--lean: '", part, "' is not ", names, "all, fused, default or none");
    if (part == "fused" || part.rfind("fused-", 0) == 0) sd::fused::check_usable(device, "--lean " + part);
  }
  return lean;
}

/// The `--lean` spelling of `lean` (`none` when all are off).
inline std::string to_string(const sd::LeanActivations& lean) {
  std::string names;
  for (const auto& lever : lean_levers()) {
    if (lean.*lever.on) names += (names.empty() ? "" : ",") + std::string(lever.name);
  }
  return names.empty() ? "none" : names;
}

/// The tuners attached to a UNet for training.
struct TrainedTuners {
  std::vector<scedit::SCTuner> sc;            ///< SC-Tuners in decoder order (empty without SCEdit)
  std::optional<scedit::LoRAInjection> lora;  ///< LoRA layers (absent without LoRA)

  /// LoRA is injected weight-side: rebind the effective weights before each forward.
  void refresh() {
    if (lora) lora->refresh();
  }

  /// Writes the final weights in the library's formats into `folder`: `sc_tuners.safetensors`
  /// (+ `.json`) and `lora/` (peft) + `lora_diffusers.safetensors` + `lora_kohya.safetensors`.
  std::vector<std::string> save(const std::filesystem::path& folder) const {
    std::filesystem::create_directories(folder);
    std::vector<std::string> written;
    if (!sc.empty()) {
      const auto path = (folder / "sc_tuners.safetensors").string();
      scedit::save_sc_tuners(path, sc);
      written.push_back(path);
    }
    if (lora) {
      scedit::save_lora_peft((folder / "lora").string(), *lora);
      scedit::export_lora_diffusers((folder / "lora_diffusers.safetensors").string(), *lora);
      scedit::export_lora_kohya((folder / "lora_kohya.safetensors").string(), *lora);
      written.push_back((folder / "lora").string());
      written.push_back((folder / "lora_diffusers.safetensors").string());
      written.push_back((folder / "lora_kohya.safetensors").string());
    }
    return written;
  }
};

/// Attaches the tuners `options` asks for to `unet`, freezes everything else, and keeps the
/// trainable weights in float32 on `device` whatever dtype the frozen weights have.
inline TrainedTuners attach_tuners(sd::UNet& unet, const MethodOptions& options,
                                   const torch::Device& device) {
  const bool sc = options.method == "scedit" || options.method == "scedit+lora";
  const bool lora = options.method == "lora" || options.method == "scedit+lora";
  TORCH_CHECK(sc || lora, "--method must be scedit, lora or scedit+lora, got '", options.method, "'");
  TrainedTuners tuners;
  if (sc) {
    tuners.sc = scedit::attach_sc_tuners(
        *unet, scedit::SCAttachOptions().pattern(options.sc_pattern).down_ratio(options.sc_down_ratio));
  }
  if (lora) {
    TORCH_CHECK(options.lora_rank > 0, "--lora-rank must be positive, got ", options.lora_rank);
    tuners.lora = scedit::inject_lora(
        *unet, scedit::LoRAConfig(scedit::LoRAOptions(options.lora_rank).alpha(options.lora_alpha))
                   .target_modules(options.lora_targets));
  }
  scedit::freeze_except_tuners(*unet);
  torch::NoGradGuard no_grad;
  for (auto& p : scedit::tuner_parameters(*unet)) p.set_data(p.data().to(device, torch::kFloat32));
  return tuners;
}

// ---- optimisation ---------------------------------------------------------------------------

/// AdamW and its schedule; the defaults are SCEdit's reference recipe (SCEDIT.md).
struct OptimOptions {
  double lr = 1e-4;              ///< peak learning rate
  double beta1 = 0.9;            ///< AdamW β1
  double beta2 = 0.999;          ///< AdamW β2
  double eps = 1e-8;             ///< AdamW ε
  double weight_decay = 1e-2;    ///< AdamW decoupled weight decay
  std::string schedule = "constant";  ///< constant | warmup | cosine
  int64_t warmup_steps = 0;      ///< linear warm-up steps (warmup, cosine)
  double max_grad_norm = 0;      ///< clip the gradient norm to this; 0 = no clipping
  bool foreach = true;           ///< multi-tensor AdamW kernels (scedit/foreach_adamw.hpp), same result
};

/// The learning rate at optimizer step `step` (0-based) of `total`.
inline double learning_rate(const OptimOptions& o, int64_t step, int64_t total) {
  TORCH_CHECK(o.schedule == "constant" || o.schedule == "warmup" || o.schedule == "cosine",
              "--lr-schedule must be constant, warmup or cosine, got '", o.schedule, "'");
  if (o.schedule == "constant") return o.lr;
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.schedule == "warmup") return o.lr;
  // Cosine decay to zero after the warm-up (diffusers' get_cosine_schedule_with_warmup).
  const double progress = static_cast<double>(step - o.warmup_steps) /
                          static_cast<double>(std::max<int64_t>(1, total - o.warmup_steps));
  return o.lr * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

/// A CPU generator for one micro-step: the run's randomness is a pure function of (seed, index),
/// so a resumed run draws exactly what an uninterrupted one would.
inline torch::Generator step_generator(uint64_t seed, int64_t index, uint64_t stream = 0) {
  auto generator = torch::make_generator<at::CPUGeneratorImpl>(
      seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(index) * 0xBF58476D1CE4E5B9ULL + stream);
  return generator;
}

/// One training step of a UNet whose tuners train (shared by the programs and the benches).
class TrainStep {
 public:
  /// `unet` already carries `tuners` (see attach_tuners) and sits on `device`.
  TrainStep(sd::UNet unet, TrainedTuners& tuners, sd::NoiseSchedule schedule, OptimOptions options,
            Precision precision, torch::Device device, std::string prediction_type = "epsilon")
      : unet_(std::move(unet)),
        tuners_(tuners),
        schedule_(std::move(schedule)),
        options_(std::move(options)),
        precision_(precision),
        device_(device),
        prediction_type_(std::move(prediction_type)),
        params_(scedit::tuner_parameters(*unet_)),
        optimizer_(params_, torch::optim::AdamWOptions(options_.lr)
                                .betas({options_.beta1, options_.beta2})
                                .eps(options_.eps)
                                .weight_decay(options_.weight_decay)) {
    TORCH_CHECK(!params_.empty(), "TrainStep: the UNet has no trainable tuner parameters");
    TORCH_CHECK(prediction_type_ == "epsilon" || prediction_type_ == "v_prediction",
                "--prediction must be epsilon or v_prediction, got '", prediction_type_, "'");
    check_precision(precision_, device_);
  }

  /// Forward and backward of one micro-batch: draws noise and timesteps from `generator`, adds
  /// the gradients of `loss / accumulation` to the tuners, returns the (unscaled) loss as a
  /// 0-dim float32 tensor on the device: reading it (`item`) waits for the GPU, so callers do
  /// that once the step is queued, not in between.
  /// `latents` [B, 4, h, w] (already × scaling factor), `text` [B, 77, D], both on the device.
  torch::Tensor forward_backward(const torch::Tensor& latents, const torch::Tensor& text,
                                 torch::Generator& generator, int64_t accumulation = 1) {
    const auto batch = latents.size(0);
    auto noise = draw_noise(latents.sizes(), generator);
    auto t = torch::randint(0, num_train_timesteps(), {batch}, generator, torch::kLong).to(device_);
    auto loss = this->loss(latents, text, noise, t);
    (loss * (loss_scale_ / static_cast<double>(accumulation))).backward();
    return loss.detach();
  }

  /// The training loss (0-dim float32, with its autograd graph) of one micro-batch for the given
  /// noise ε [B, 4, h, w] float32 and timesteps t [B] int64, all on the device: the tuners'
  /// forward under autocast, MSE against the prediction target. Reads nothing on the host.
  torch::Tensor loss(const torch::Tensor& latents, const torch::Tensor& text, const torch::Tensor& noise,
                     const torch::Tensor& t) {
    auto x0 = latents.to(torch::kFloat32);
    auto noisy = schedule_.add_noise(x0, noise, t);                       // q(x_t | x_0)
    auto target = schedule_.prediction_target(prediction_type_, x0, noise, t);
    scedit::compat::AutocastGuard autocast(device_.type(), compute_dtype(precision_));
    tuners_.refresh();
    auto prediction = unet_->forward(noisy.to(frozen_dtype()), t, text.to(frozen_dtype()));
    return torch::mse_loss(prediction.to(torch::kFloat32), target);
  }

  /// Applies the accumulated gradients at learning rate `lr`: unscale (fp16), skip the step on
  /// overflow, clip, AdamW, zero the gradients. Returns false when an fp16 overflow skipped it.
  bool optimizer_step(double lr) {
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
      for (auto& group : optimizer_.param_groups()) {
        static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      }
      if (options_.foreach) {
        scedit::foreach_adamw_step(optimizer_);
      } else {
        optimizer_.step();
      }
    }
    optimizer_.zero_grad();
    update_loss_scale(finite);
    return finite;
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
  torch::Dtype frozen_dtype() const { return compute_dtype(precision_); }
  /// The optimizer options the step was built with.
  const OptimOptions& options() const { return options_; }
  /// The precision the step trains in.
  Precision precision() const { return precision_; }
  /// The device the UNet and the tuners sit on.
  const torch::Device& device() const { return device_; }
  /// T of the noise schedule: timesteps are drawn from [0, T).
  int64_t num_train_timesteps() const { return schedule_.num_train_timesteps(); }

 private:
  // ε ~ N(0, I) [B, 4, h, w] float32 on the device. On the CPU it comes from `generator` itself;
  // elsewhere from a device generator seeded by one draw of `generator`, so a micro-step's noise
  // is still a pure function of (seed, index) on a given device (resume stays exact) and no
  // host-side draw and copy (~7 ms at batch 30) holds up the GPU.
  torch::Tensor draw_noise(at::IntArrayRef sizes, torch::Generator& generator) const {
    const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(device_);
    if (device_.is_cpu()) return torch::randn(sizes, generator, options);
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
    return torch::randn(sizes, on_device, options);
  }

  // Dynamic loss scaling (as torch.cuda.amp.GradScaler): halve on overflow, double after 2000
  // clean steps.
  void update_loss_scale(bool finite) {
    if (precision_ != Precision::kFP16) return;
    if (!finite) {
      loss_scale_ = std::max(1.0, loss_scale_ / 2);
      clean_steps_ = 0;
    } else if (++clean_steps_ % 2000 == 0) {
      loss_scale_ *= 2;
    }
  }

  sd::UNet unet_;
  TrainedTuners& tuners_;
  sd::NoiseSchedule schedule_;
  OptimOptions options_;
  Precision precision_;
  torch::Device device_;
  std::string prediction_type_;
  std::vector<torch::Tensor> params_;
  torch::optim::AdamW optimizer_;
  double loss_scale_ = precision_ == Precision::kFP16 ? 65536.0 : 1.0;
  int64_t clean_steps_ = 0;
};

}  // namespace common
