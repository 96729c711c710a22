#pragma once
/// @file scheduler.hpp
/// @brief The diffusion noise schedule (training targets) and the DDIM sampler, reproducing
/// diffusers' `DDIMScheduler` (`schedulers/scheduling_ddim.py`), plus classifier-free guidance
/// with diffusers' `rescale_noise_cfg`.
///
/// Notation: ᾱ_t = alphas_cumprod[t] = Π_{s≤t} (1 − β_s) (DDPM, Ho et al. 2020, eq. 4);
/// a noised sample is x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε.
///
/// Example:
/// @code
/// sd::DDIMScheduler scheduler(sd::DDIMSchedulerOptions().timestep_spacing("trailing"));
/// scheduler.set_timesteps(50);
/// for (int64_t i = 0; i < scheduler.timesteps().size(0); ++i) {
///   const int64_t t = scheduler.timesteps()[i].item<int64_t>();
///   torch::Tensor eps = sd::classifier_free_guidance(eps_uncond, eps_cond, 7.5, 0.5);
///   latents = scheduler.step(eps, t, latents);
/// }
/// @endcode

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// The β schedule of training (diffusers' scheduler constructor arguments).
struct NoiseScheduleOptions {
  /// Number of diffusion steps of training, T.
  TORCH_ARG(int64_t, num_train_timesteps) = 1000;
  /// β_0 (0.00085 for SD; diffusers' default 0.0001).
  TORCH_ARG(double, beta_start) = 0.00085;
  /// β_{T−1} (0.012 for SD; diffusers' default 0.02).
  TORCH_ARG(double, beta_end) = 0.012;
  /// "scaled_linear" (SD: linear in √β) or "linear" (DDPM).
  TORCH_ARG(std::string, beta_schedule) = "scaled_linear";
  /// Rescale the betas to zero terminal SNR, ᾱ_{T−1} = 0 (Lin et al. 2023, "Common Diffusion
  /// Noise Schedules and Sample Steps are Flawed", algorithm 1; diffusers'
  /// `rescale_betas_zero_snr`). Only a model that predicts v (or x₀) can sample from such a
  /// schedule: at ᾱ = 0 the sample is pure noise and says nothing of x₀ that ε could recover.
  TORCH_ARG(bool, rescale_betas_zero_snr) = false;
};

/// β_t, ᾱ_t and the training-time noising / targets.
///
/// The schedule is computed in float32 exactly as diffusers' PyTorch computes it (bit-identical
/// values, whatever LibTorch build runs this); `alphas_cumprod64()` holds those float32 values
/// widened to float64.
class NoiseSchedule {
 public:
  /// Computes the schedule of `options`; throws for an unknown beta_schedule or bad values.
  explicit NoiseSchedule(NoiseScheduleOptions options = {}) : options_(std::move(options)) {
    const int64_t steps = options_.num_train_timesteps();
    TORCH_CHECK(steps >= 2, "NoiseSchedule: num_train_timesteps must be >= 2, got ", steps);
    TORCH_CHECK(options_.beta_start() > 0 && options_.beta_end() < 1 &&
                    options_.beta_start() <= options_.beta_end(),
                "NoiseSchedule: need 0 < beta_start <= beta_end < 1, got beta_start ",
                options_.beta_start(), ", beta_end ", options_.beta_end());
    std::vector<float> betas;
    if (options_.beta_schedule() == "linear") {
      // scheduling_ddim.py: torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
      betas = linspace_f32(options_.beta_start(), options_.beta_end(), steps);
    } else if (options_.beta_schedule() == "scaled_linear") {
      // scheduling_ddim.py ("specific to the latent diffusion model"):
      // torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
      betas = linspace_f32(std::sqrt(options_.beta_start()), std::sqrt(options_.beta_end()), steps);
      for (float& b : betas) b = b * b;
    } else {
      TORCH_CHECK(false, "NoiseSchedule: beta_schedule must be \"scaled_linear\" or \"linear\", got \"",
                  options_.beta_schedule(), "\"");
    }
    if (options_.rescale_betas_zero_snr()) betas = rescale_zero_terminal_snr(betas);
    const std::vector<float> cumprod = cumulative_alphas(betas);
    betas_ = torch::tensor(betas, torch::kFloat32);
    alphas_cumprod_ = torch::tensor(cumprod, torch::kFloat32);
    alphas_cumprod64_ = alphas_cumprod_.to(torch::kFloat64);
  }

  /// Number of training steps T.
  int64_t num_train_timesteps() const { return options_.num_train_timesteps(); }
  /// β_t, float32 [T].
  const torch::Tensor& betas() const { return betas_; }
  /// ᾱ_t, float32 [T], exactly as diffusers holds it.
  const torch::Tensor& alphas_cumprod() const { return alphas_cumprod_; }
  /// ᾱ_t as float64 [T] (the float32 values, widened).
  const torch::Tensor& alphas_cumprod64() const { return alphas_cumprod64_; }
  /// The options the schedule was built with.
  const NoiseScheduleOptions& options() const { return options_; }

  /// x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε (DDPM eq. 4; diffusers `DDIMScheduler.add_noise`).
  /// `t`: int64 [B] (or one value for the whole batch); the computation runs in x₀'s dtype.
  torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                          const torch::Tensor& t) const {
    const auto [sqrt_alpha, sqrt_one_minus_alpha] = coefficients(x0, noise, t, "add_noise");
    return sqrt_alpha * x0 + sqrt_one_minus_alpha * noise;
  }

  /// The v-prediction target v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀ (Salimans & Ho 2022, "Progressive
  /// Distillation", sec. 4; diffusers `DDIMScheduler.get_velocity`).
  torch::Tensor velocity(const torch::Tensor& x0, const torch::Tensor& noise,
                         const torch::Tensor& t) const {
    const auto [sqrt_alpha, sqrt_one_minus_alpha] = coefficients(x0, noise, t, "velocity");
    return sqrt_alpha * noise - sqrt_one_minus_alpha * x0;
  }

  /// What the model learns to predict (diffusers' training scripts): ε for "epsilon",
  /// `velocity` for "v_prediction", x₀ for "sample". ε on a zero-terminal-SNR schedule is
  /// refused (`check_prediction`).
  torch::Tensor prediction_target(const std::string& kind, const torch::Tensor& x0,
                                  const torch::Tensor& noise, const torch::Tensor& t) const {
    check_prediction(kind, "NoiseSchedule::prediction_target");
    if (kind == "epsilon") return noise;
    if (kind == "v_prediction") return velocity(x0, noise, t);
    if (kind == "sample") return x0;
    TORCH_CHECK(false, "NoiseSchedule::prediction_target: kind must be \"epsilon\", \"v_prediction\" "
                "or \"sample\", got \"", kind, "\"");
  }

  /// Refuses ε prediction on a zero-terminal-SNR schedule, naming `caller`: at t = T − 1 the
  /// sample is pure noise (ᾱ = 0), so ε is the sample itself and x̂₀ = (x − √(1 − ᾱ)·ε)/√ᾱ divides
  /// by zero (Lin et al. 2023, sec. 3.2: such a schedule needs v prediction).
  void check_prediction(const std::string& kind, const char* caller) const {
    TORCH_CHECK(!(options_.rescale_betas_zero_snr() && kind == "epsilon"), caller,
                ": a zero-terminal-SNR schedule (rescale_betas_zero_snr, --zero-terminal-snr) needs "
                "prediction_type v_prediction, not epsilon: at the last timestep ᾱ = 0, the sample "
                "is pure noise and an ε prediction says nothing of the image (x̂₀ divides by √ᾱ = 0)");
  }

 private:
  /// ᾱ_t = cumprod(1 − β) as diffusers' `torch.cumprod(1.0 - betas, dim=0)`: float32 values, but
  /// PyTorch's CPU cumprod accumulates in double (acc_type<float>) and rounds each output.
  static std::vector<float> cumulative_alphas(const std::vector<float>& betas) {
    std::vector<float> cumprod(betas.size());
    double product = 1.0;
    for (size_t i = 0; i < betas.size(); ++i) {
      product *= static_cast<double>(1.0f - betas[i]);
      cumprod[i] = static_cast<float>(product);
    }
    return cumprod;
  }

  /// diffusers' `rescale_zero_terminal_snr` (schedulers/scheduling_ddim.py; Lin et al. 2023,
  /// algorithm 1), in its float32 arithmetic: shift √ᾱ so that its last value is 0, scale it so
  /// that its first is unchanged, and turn the squares back into betas
  /// (α_0 = ᾱ_0, α_t = ᾱ_t / ᾱ_{t−1}, β = 1 − α; the last β is exactly 1).
  static std::vector<float> rescale_zero_terminal_snr(const std::vector<float>& betas) {
    std::vector<float> root = cumulative_alphas(betas);
    for (float& a : root) a = std::sqrt(a);
    const float first = root.front(), last = root.back();
    const float scale = first / (first - last);  // a 0-dim float32 tensor in diffusers
    for (float& a : root) a = (a - last) * scale;
    std::vector<float> rescaled(betas.size());
    for (size_t i = 0; i < root.size(); ++i) {
      const float alpha_bar = root[i] * root[i];
      const float alpha = i == 0 ? alpha_bar : alpha_bar / (root[i - 1] * root[i - 1]);
      rescaled[i] = 1.0f - alpha;
    }
    return rescaled;
  }

  /// `torch.linspace(start, end, steps, dtype=torch.float32)` as PyTorch 2.x's CPU kernel yields
  /// it (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp): step = (end − start) / (steps − 1)
  /// in float; the first half start + step·i, the second half end − step·(steps − 1 − i), each
  /// one fused multiply-add as compiled. Spelled out because LibTorch builds differ in the last
  /// bit here (vectorised paths round twice), and the fixtures pin the reference's bits.
  static std::vector<float> linspace_f32(double start_value, double end_value, int64_t steps) {
    const auto start = static_cast<float>(start_value), end = static_cast<float>(end_value);
    const float step = (end - start) / static_cast<float>(steps - 1);
    const int64_t halfway = steps / 2;
    std::vector<float> out(static_cast<size_t>(steps));
    for (int64_t i = 0; i < steps; ++i) {
      out[static_cast<size_t>(i)] =
          i < halfway ? std::fma(step, static_cast<float>(i), start)
                      : std::fma(-step, static_cast<float>(steps - i - 1), end);
    }
    return out;
  }

  /// √ᾱ_t and √(1 − ᾱ_t) in x0's dtype and device, shaped [B, 1, …] to broadcast over x0
  /// (diffusers add_noise: alphas_cumprod.to(dtype) first, then index, then ** 0.5).
  std::pair<torch::Tensor, torch::Tensor> coefficients(const torch::Tensor& x0,
                                                       const torch::Tensor& noise,
                                                       const torch::Tensor& t,
                                                       const char* caller) const {
    TORCH_CHECK(x0.sizes() == noise.sizes(), "NoiseSchedule::", caller, ": x0 ", x0.sizes(),
                " and noise ", noise.sizes(), " must have the same shape");
    TORCH_CHECK(x0.dim() >= 1 && x0.is_floating_point(), "NoiseSchedule::", caller,
                ": x0 must be a floating tensor [B, …], got ", x0.sizes(), " ", x0.scalar_type());
    TORCH_CHECK(!t.is_floating_point() && !t.is_complex(), "NoiseSchedule::", caller,
                ": timesteps must be integers, got ", t.scalar_type());
    TORCH_CHECK(t.numel() == 1 || t.numel() == x0.size(0), "NoiseSchedule::", caller,
                ": need one timestep or one per batch row (", x0.size(0), "), got ", t.numel());
    if (t.device().is_cpu()) {  // on an accelerator the index op itself checks (no sync here)
      TORCH_CHECK(t.min().item<int64_t>() >= 0 &&
                      t.max().item<int64_t>() < options_.num_train_timesteps(),
                  "NoiseSchedule::", caller, ": timesteps must be in [0, ",
                  options_.num_train_timesteps(), "), got ", t.min().item<int64_t>(), "..",
                  t.max().item<int64_t>());
    }
    const torch::Tensor alphas = alphas_cumprod_on(x0.device(), x0.scalar_type())
                                     .index_select(0, t.flatten().to(x0.device(), torch::kInt64));
    std::vector<int64_t> shape(static_cast<size_t>(x0.dim()), 1);
    shape[0] = alphas.size(0);  // [B] -> [B, 1, …, 1]
    return {alphas.sqrt().view(shape), (1.0 - alphas).sqrt().view(shape)};
  }

  /// ᾱ converted to `dtype` on `device`, cached: a training step must not pay (and wait for) a
  /// host-to-device copy.
  torch::Tensor alphas_cumprod_on(torch::Device device, torch::ScalarType dtype) const {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    for (const auto& cached : cache_->tensors) {
      if (cached.device() == device && cached.scalar_type() == dtype) return cached;
    }
    cache_->tensors.push_back(alphas_cumprod_.to(device, dtype));
    return cache_->tensors.back();
  }

  /// Converted copies of alphas_cumprod_, shared by copies of the schedule.
  struct Cache {
    std::mutex mutex;
    std::vector<torch::Tensor> tensors;
  };

  NoiseScheduleOptions options_;
  std::shared_ptr<Cache> cache_ = std::make_shared<Cache>();
  torch::Tensor betas_;
  torch::Tensor alphas_cumprod_;
  torch::Tensor alphas_cumprod64_;
};

/// Options of DDIMScheduler. The defaults are SD 1.5's sampling settings (its
/// scheduler_config.json); `from_json` uses diffusers' DDIMScheduler defaults for missing keys.
struct DDIMSchedulerOptions {
  /// The training noise schedule.
  TORCH_ARG(NoiseScheduleOptions, schedule) = NoiseScheduleOptions();
  /// How inference timesteps are placed: "leading" (SD 1.5 default), "trailing" (Lin et al.
  /// 2023, table 2: starts at t = T − 1), "linspace".
  TORCH_ARG(std::string, timestep_spacing) = "leading";
  /// Added to "leading" timesteps (1 for SD).
  TORCH_ARG(int64_t, steps_offset) = 1;
  /// ᾱ used after the last step: 1 when true, else ᾱ_0 (false for SD).
  TORCH_ARG(bool, set_alpha_to_one) = false;
  /// What the model predicts: "epsilon", "v_prediction" or "sample".
  TORCH_ARG(std::string, prediction_type) = "epsilon";
  /// Clamp the predicted x₀ to [−clip_sample_range, clip_sample_range] (false for latents).
  TORCH_ARG(bool, clip_sample) = false;
  /// Clamp bound of clip_sample.
  TORCH_ARG(double, clip_sample_range) = 1.0;

 public:
  /// Reads diffusers `scheduler_config.json` keys; a missing key takes diffusers'
  /// DDIMScheduler default (linear 0.0001 → 0.02, leading, steps_offset 0, set_alpha_to_one and
  /// clip_sample true). Keys of other schedulers (e.g. PNDM's skip_prk_steps) are ignored;
  /// trained_betas and thresholding are refused when set.
  static DDIMSchedulerOptions from_json(const nlohmann::json& j) {
    TORCH_CHECK(j.is_object(), "DDIMSchedulerOptions::from_json: expected a JSON object, got ",
                j.dump());
    auto get = [&j](const char* key, auto fallback) {
      using T = decltype(fallback);
      if (!j.contains(key) || j[key].is_null()) return fallback;
      try {
        return j[key].get<T>();
      } catch (const nlohmann::json::exception&) {
        TORCH_CHECK(false, "DDIMSchedulerOptions::from_json: key '", key,
                    "' has the wrong type: ", j[key].dump());
      }
    };
    TORCH_CHECK(!j.contains("trained_betas") || j["trained_betas"].is_null(),
                "DDIMSchedulerOptions::from_json: trained_betas is not supported");
    TORCH_CHECK(!get("thresholding", false),
                "DDIMSchedulerOptions::from_json: thresholding is not supported");
    DDIMSchedulerOptions o;
    o.schedule(NoiseScheduleOptions()
                   .num_train_timesteps(get("num_train_timesteps", int64_t{1000}))
                   .beta_start(get("beta_start", 0.0001))
                   .beta_end(get("beta_end", 0.02))
                   .beta_schedule(get("beta_schedule", std::string("linear")))
                   .rescale_betas_zero_snr(get("rescale_betas_zero_snr", false)));
    o.timestep_spacing(get("timestep_spacing", std::string("leading")));
    o.steps_offset(get("steps_offset", int64_t{0}));
    o.set_alpha_to_one(get("set_alpha_to_one", true));
    o.prediction_type(get("prediction_type", std::string("epsilon")));
    o.clip_sample(get("clip_sample", true));
    o.clip_sample_range(get("clip_sample_range", 1.0));
    return o;
  }

  /// The options as `scheduler_config.json` keys, every one written: `from_json(to_json())`
  /// gives them back.
  nlohmann::json to_json() const {
    const auto& s = schedule_;
    return {{"_class_name", "DDIMScheduler"}, {"num_train_timesteps", s.num_train_timesteps()},
            {"beta_start", s.beta_start()}, {"beta_end", s.beta_end()},
            {"beta_schedule", s.beta_schedule()}, {"rescale_betas_zero_snr", s.rescale_betas_zero_snr()},
            {"timestep_spacing", timestep_spacing_}, {"steps_offset", steps_offset_},
            {"set_alpha_to_one", set_alpha_to_one_}, {"prediction_type", prediction_type_},
            {"clip_sample", clip_sample_}, {"clip_sample_range", clip_sample_range_}};
  }
};

/// Sets `key` of a model's scheduler configuration (`StableDiffusion::scheduler_config`) to
/// `value`. A model without one (null) first gets SD 1.5's settings, `DDIMSchedulerOptions()`,
/// which it samples with (sampler.hpp): a lone key would bring in diffusers' DDIM defaults
/// (linear betas) instead.
inline void set_scheduler_option(nlohmann::json& config, const std::string& key, nlohmann::json value) {
  if (!config.is_object()) config = DDIMSchedulerOptions().to_json();
  config[key] = std::move(value);
}

/// What one DDIM step computes (diffusers' `DDIMSchedulerOutput`).
struct DDIMStepOutput {
  /// x_{t−Δ}, the sample to continue from.
  torch::Tensor prev_sample;
  /// x̂₀, the clean sample the model output implies at t.
  torch::Tensor pred_original_sample;
};

/// Denoising Diffusion Implicit Models sampler (Song et al. 2021), step for step diffusers'
/// `DDIMScheduler` (`schedulers/scheduling_ddim.py`), including its float32 scalar arithmetic.
class DDIMScheduler {
 public:
  /// Builds the schedule; throws for an unknown spacing / prediction type or bad values.
  explicit DDIMScheduler(DDIMSchedulerOptions options = {})
      : options_(std::move(options)), schedule_(options_.schedule()) {
    const std::string& spacing = options_.timestep_spacing();
    TORCH_CHECK(spacing == "leading" || spacing == "trailing" || spacing == "linspace",
                "DDIMScheduler: timestep_spacing must be \"leading\", \"trailing\" or \"linspace\", "
                "got \"", spacing, "\"");
    const std::string& kind = options_.prediction_type();
    TORCH_CHECK(kind == "epsilon" || kind == "v_prediction" || kind == "sample",
                "DDIMScheduler: prediction_type must be \"epsilon\", \"v_prediction\" or \"sample\", "
                "got \"", kind, "\"");
    schedule_.check_prediction(kind, "DDIMScheduler");
    TORCH_CHECK(options_.steps_offset() >= 0, "DDIMScheduler: steps_offset must be >= 0, got ",
                options_.steps_offset());
    TORCH_CHECK(options_.clip_sample_range() > 0,
                "DDIMScheduler: clip_sample_range must be > 0, got ", options_.clip_sample_range());
    alphas_ = schedule_.alphas_cumprod().contiguous();
    // final_alpha_cumprod: torch.tensor(1.0) if set_alpha_to_one else alphas_cumprod[0]
    final_alpha_cumprod_ = options_.set_alpha_to_one() ? 1.0f : alphas_.data_ptr<float>()[0];
  }

  /// Chooses `n` inference timesteps (diffusers `DDIMScheduler.set_timesteps`, numpy semantics:
  /// np.round is round-half-to-even, np.arange fills start + i·((start + step) − start)).
  void set_timesteps(int64_t n) {
    const int64_t train = schedule_.num_train_timesteps();
    TORCH_CHECK(n >= 1, "DDIMScheduler::set_timesteps: num_inference_steps must be >= 1, got ", n);
    TORCH_CHECK(n <= train, "DDIMScheduler::set_timesteps: num_inference_steps (", n,
                ") cannot be larger than num_train_timesteps (", train, ")");
    std::vector<int64_t> steps;
    const std::string& spacing = options_.timestep_spacing();
    if (spacing == "linspace") {
      // np.linspace(0, T - 1, n).round()[::-1]
      const double step = n > 1 ? static_cast<double>(train - 1) / static_cast<double>(n - 1) : 0.0;
      for (int64_t i = n - 1; i >= 0; --i) {
        const double value = i == n - 1 && n > 1 ? static_cast<double>(train - 1) : i * step;
        steps.push_back(static_cast<int64_t>(std::nearbyint(value)));
      }
    } else if (spacing == "leading") {
      // (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
      const int64_t ratio = train / n;
      for (int64_t i = n - 1; i >= 0; --i) steps.push_back(i * ratio + options_.steps_offset());
      TORCH_CHECK(steps.front() < train, "DDIMScheduler::set_timesteps: \"leading\" spacing with "
                  "steps_offset ", options_.steps_offset(), " puts the first of ", n, " steps at timestep ",
                  steps.front(), ", past the last trained one (", train - 1, "): take fewer steps, or "
                  "\"trailing\" spacing");
    } else {
      // np.round(np.arange(T, 0, -T / n)) - 1
      const double start = static_cast<double>(train), step = -static_cast<double>(train) / n;
      const auto length = static_cast<int64_t>(std::ceil((0.0 - start) / step));
      const double delta = (start + step) - start;
      for (int64_t i = 0; i < length; ++i) {
        const double value = i == 0 ? start : i == 1 ? start + step : start + i * delta;
        steps.push_back(static_cast<int64_t>(std::nearbyint(value)) - 1);
      }
    }
    num_inference_steps_ = n;
    timesteps_ = torch::tensor(steps, torch::kInt64);
  }

  /// The inference timesteps, int64 [n], descending (empty before set_timesteps).
  const torch::Tensor& timesteps() const { return timesteps_; }
  /// n of the last set_timesteps (0 before).
  int64_t num_inference_steps() const { return num_inference_steps_; }
  /// The training schedule (ᾱ_t, add_noise, velocity).
  const NoiseSchedule& schedule() const { return schedule_; }
  /// The options the scheduler was built with.
  const DDIMSchedulerOptions& options() const { return options_; }
  /// σ of the initial noise (1 for DDIM).
  double init_noise_sigma() const { return 1.0; }
  /// DDIM needs no input scaling: returns `sample`.
  torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t /*t*/) const {
    return sample;
  }
  /// The timestep a step from `t` lands on: t − T // n (diffusers uses this for every spacing).
  int64_t previous_timestep(int64_t t) const {
    TORCH_CHECK(num_inference_steps_ > 0, "DDIMScheduler: call set_timesteps before stepping");
    return t - schedule_.num_train_timesteps() / num_inference_steps_;
  }

  /// One DDIM step x_t -> x_{t−Δ} (Song et al. 2021, eq. 12; diffusers `DDIMScheduler.step`):
  /// x̂₀ from the model output, σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev) (eq. 16),
  /// x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z. With η > 0, z is `variance_noise`
  /// (same shape as the sample) or drawn with torch::randn.
  torch::Tensor step(const torch::Tensor& model_output, int64_t t, const torch::Tensor& sample,
                     double eta = 0.0, const torch::Tensor& variance_noise = {}) const {
    return step_impl(model_output, t, sample, eta, variance_noise, nullptr).prev_sample;
  }

  /// As `step`, drawing z with `generator` when η > 0.
  torch::Tensor step(const torch::Tensor& model_output, int64_t t, const torch::Tensor& sample,
                     double eta, at::Generator generator) const {
    return step_impl(model_output, t, sample, eta, {}, &generator).prev_sample;
  }

  /// As `step`, returning the predicted x̂₀ too (diffusers' `DDIMSchedulerOutput`).
  DDIMStepOutput step_output(const torch::Tensor& model_output, int64_t t,
                             const torch::Tensor& sample, double eta = 0.0,
                             const torch::Tensor& variance_noise = {}) const {
    return step_impl(model_output, t, sample, eta, variance_noise, nullptr);
  }

 private:
  DDIMStepOutput step_impl(const torch::Tensor& model_output, int64_t t,
                           const torch::Tensor& sample, double eta,
                           const torch::Tensor& variance_noise, at::Generator* generator) const {
    const int64_t prev_t = previous_timestep(t);
    TORCH_CHECK(t >= 0 && t < schedule_.num_train_timesteps(), "DDIMScheduler::step: timestep ",
                t, " is outside [0, ", schedule_.num_train_timesteps(), ")");
    TORCH_CHECK(model_output.sizes() == sample.sizes(), "DDIMScheduler::step: model_output ",
                model_output.sizes(), " and sample ", sample.sizes(), " must have the same shape");
    TORCH_CHECK(eta >= 0, "DDIMScheduler::step: eta must be >= 0, got ", eta);
    // Scalars in float32, as diffusers computes them from its float32 alphas_cumprod (0-dim
    // tensors); the tensors then use them in their own dtype.
    const float* alphas = alphas_.data_ptr<float>();
    const float alpha_t = alphas[t];
    const float alpha_prev = prev_t >= 0 ? alphas[prev_t] : final_alpha_cumprod_;
    const float beta_t = 1.0f - alpha_t;
    const double sqrt_alpha_t = std::sqrt(alpha_t), sqrt_beta_t = std::sqrt(beta_t);

    torch::Tensor pred_x0, pred_eps;  // x̂₀ and ε̂ (eq. 12's "predicted x₀" and direction)
    const std::string& kind = options_.prediction_type();
    if (kind == "epsilon") {
      pred_x0 = (sample - sqrt_beta_t * model_output) / sqrt_alpha_t;
      pred_eps = model_output;
    } else if (kind == "sample") {
      pred_x0 = model_output;
      pred_eps = (sample - sqrt_alpha_t * pred_x0) / sqrt_beta_t;
    } else {  // v_prediction (Salimans & Ho 2022, eq. 4 rearranged)
      pred_x0 = sqrt_alpha_t * sample - sqrt_beta_t * model_output;
      pred_eps = sqrt_alpha_t * model_output + sqrt_beta_t * sample;
    }
    if (options_.clip_sample()) {
      pred_x0 = pred_x0.clamp(-options_.clip_sample_range(), options_.clip_sample_range());
    }
    // _get_variance: (β_prev / β_t)·(1 − ᾱ_t / ᾱ_prev)
    const float beta_prev = 1.0f - alpha_prev;
    const float variance = (beta_prev / beta_t) * (1.0f - alpha_t / alpha_prev);
    const float std_dev = static_cast<float>(eta) * std::sqrt(variance);
    const double direction_scale = std::sqrt(1.0f - alpha_prev - std_dev * std_dev);
    torch::Tensor prev = static_cast<double>(std::sqrt(alpha_prev)) * pred_x0 +
                         direction_scale * pred_eps;
    if (eta > 0) {
      torch::Tensor z = variance_noise;
      if (!z.defined()) {
        z = generator != nullptr
                ? torch::randn(model_output.sizes(), *generator, model_output.options())
                : torch::randn_like(model_output);
      }
      TORCH_CHECK(z.sizes() == sample.sizes(), "DDIMScheduler::step: variance_noise ", z.sizes(),
                  " must have the sample's shape ", sample.sizes());
      prev = prev + static_cast<double>(std_dev) * z;
    }
    return {prev, pred_x0};
  }

  DDIMSchedulerOptions options_;
  NoiseSchedule schedule_;
  torch::Tensor alphas_;  // float32 [T], contiguous, CPU
  float final_alpha_cumprod_ = 1.0f;
  int64_t num_inference_steps_ = 0;
  torch::Tensor timesteps_ = torch::empty({0}, torch::kInt64);
};

/// diffusers `rescale_noise_cfg` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed", sec. 3.4, eqs. 15–16): rescale the guided prediction to the standard
/// deviation of the conditional one (unbiased std over every dim but the batch), then blend:
/// φ·(x_cfg·σ_cond/σ_cfg) + (1 − φ)·x_cfg.
inline torch::Tensor rescale_noise_cfg(const torch::Tensor& noise_cfg,
                                       const torch::Tensor& noise_pred_text,
                                       double guidance_rescale) {
  TORCH_CHECK(noise_cfg.sizes() == noise_pred_text.sizes() && noise_cfg.dim() >= 2,
              "rescale_noise_cfg: need two tensors of one shape [B, …] with dim >= 2, got ",
              noise_cfg.sizes(), " and ", noise_pred_text.sizes());
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < noise_cfg.dim(); ++d) dims.push_back(d);
  const torch::Tensor std_text =
      noise_pred_text.std(torch::IntArrayRef(dims), /*unbiased=*/true, /*keepdim=*/true);
  const torch::Tensor std_cfg =
      noise_cfg.std(torch::IntArrayRef(dims), /*unbiased=*/true, /*keepdim=*/true);
  const torch::Tensor rescaled = noise_cfg * (std_text / std_cfg);
  return guidance_rescale * rescaled + (1.0 - guidance_rescale) * noise_cfg;
}

/// Classifier-free guidance (Ho & Salimans 2022, eq. 6, as diffusers' pipelines write it):
/// uncond + s·(cond − uncond), then `rescale_noise_cfg` when guidance_rescale > 0.
inline torch::Tensor classifier_free_guidance(const torch::Tensor& uncond,
                                              const torch::Tensor& cond, double guidance_scale,
                                              double guidance_rescale = 0.0) {
  TORCH_CHECK(uncond.sizes() == cond.sizes(), "classifier_free_guidance: uncond ", uncond.sizes(),
              " and cond ", cond.sizes(), " must have the same shape");
  TORCH_CHECK(guidance_rescale >= 0 && guidance_rescale <= 1,
              "classifier_free_guidance: guidance_rescale must be in [0, 1], got ", guidance_rescale);
  torch::Tensor guided = uncond + guidance_scale * (cond - uncond);
  if (guidance_rescale > 0) guided = rescale_noise_cfg(guided, cond, guidance_rescale);
  return guided;
}

}  // namespace sd
