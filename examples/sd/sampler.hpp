#pragma once
/// @file sampler.hpp
/// @brief Sampling with Stable Diffusion: prompts → text embeddings → DDIM with classifier-free
/// guidance → VAE decode → uint8 images; image-to-image; CSC-Tuners' conditions. Shared by the
/// `generate` program, the training programs' validation samples and the benches.
///
/// The sampler follows diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline`
/// (`__call__`): one batched UNet call over [uncond; cond] per step when guidance > 1, then
/// `classifier_free_guidance` with diffusers' `rescale_noise_cfg` (scheduler.hpp), the DDIM
/// step, and `vae.decode(latents / scaling_factor + shift)`. For SDXL it follows
/// `StableDiffusionXLPipeline`: both text encoders (`encode_text`), and the pooled embedding and
/// size conditioning (`added_conditions`) in every UNet call, for both halves of guidance. The
/// defaults are SCEdit's sampling recipe (DDIM, eta 0, 50 steps, trailing timesteps, guidance 7.5,
/// guidance rescale 0.5, empty negative prompt).
///
/// Determinism: image `i` of a call (prompt-major: prompt p, copy k → i = p·images_per_prompt
/// + k) draws all its noise — the initial latents, then each step's DDIM noise when eta > 0 —
/// from its own CPU generator seeded with `seed + i`, in float32, then moved to the model's
/// device. So an image depends on its seed only, not on the batch it ran in, and CPU and CUDA
/// runs start from the same latents.
///
/// Example:
/// @code
/// auto pipe = sd::load_pipeline("stable-diffusion-v1-5");
/// sd::AttachedTuners tuners;
/// sd::attach_tuner_file(pipe, "style.safetensors", /*scale=*/1.0, tuners);  // tuner_files.hpp
/// sd::GenerateOptions options;
/// options.seed = 42;
/// std::vector<torch::Tensor> images = sd::generate(pipe, {"a cat in a hat"}, options);
/// // images[0]: uint8 [512, 512, 3]
/// @endcode

#include <sd/controlnet.hpp>
#include <sd/noise_prediction.hpp>
#include <sd/precision.hpp>
#include <sd/scheduler.hpp>
#include <sd/stable_diffusion.hpp>

#include <scedit/compat.hpp>
#include <scedit/csctuner.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// Where a `generate` call is, for progress displays.
struct GenerateProgress {
  int64_t step = 0;     ///< Denoising steps done in this batch (1..steps).
  int64_t steps = 0;    ///< Denoising steps per batch (fewer than `GenerateOptions::steps` for img2img).
  int64_t batch = 0;    ///< Batch index (0-based).
  int64_t batches = 0;  ///< Number of batches.
};

/// The condition image of one CSC-Tuner for a `generate` call.
struct GenerateCondition {
  std::string tuner;    ///< The CSC-Tuner's name on the UNet (`scedit::csc_tuners`).
  torch::Tensor image;  ///< uint8 [height, width, 3], RGB.
};

/// A ControlNet for a `generate` call: the model, its condition image and its strength. Several
/// ControlNets add their residuals (diffusers' MultiControlNet).
struct GenerateControlNet {
  ControlNetModel model{nullptr};  ///< Loaded on the UNet's device (`load_controlnet`).
  torch::Tensor image;             ///< uint8 [height, width, 3], RGB.
  double scale = 1.0;              ///< diffusers' `controlnet_conditioning_scale`.
};

/// The denoising steps image-to-image runs: the last int(steps · strength) of `steps`
/// (diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps`).
inline int64_t image_to_image_steps(int64_t steps, double strength) {
  return std::min<int64_t>(static_cast<int64_t>(static_cast<double>(steps) * strength), steps);
}

/// Settings of one `generate` call (diffusers' pipeline arguments). The defaults are SCEdit's
/// sampling recipe except the size, which callers set from the model (`default_image_size`).
struct GenerateOptions {
  int64_t width = 512;             ///< Image width: a positive multiple of 8 (the VAE's factor).
  int64_t height = 512;            ///< Image height: a positive multiple of 8 (the VAE's factor).
  int64_t steps = 50;              ///< DDIM steps (> 0); img2img runs the last strength·steps.
  double guidance_scale = 7.5;     ///< Classifier-free guidance; <= 1 runs the conditional pass only.
  double guidance_rescale = 0.5;   ///< diffusers' rescale_noise_cfg φ in [0, 1] (0: off).
  double eta = 0.0;                ///< DDIM η in [0, 1] (0: deterministic DDIM; 1: DDPM's variance).
  uint64_t seed = 0;               ///< Image i uses a CPU generator seeded with seed + i.
  /// The unconditional prompt ("" as in the recipe). SDXL with an empty one gets zeros for its
  /// context and pooled embedding instead of the empty prompt's encoding, as diffusers'
  /// StableDiffusionXLPipeline does for SDXL base (`force_zeros_for_empty_prompt`, true in its
  /// model_index.json).
  std::string negative_prompt;
  /// SDXL's size conditioning of the images (diffusers' `original_size`,
  /// `crops_coords_top_left`, `target_size`); unset: `SizeConditioning::uncropped(height,
  /// width)`, diffusers' defaults. Refused for a UNet that takes no added conditioning.
  std::optional<SizeConditioning> size_conditioning;
  /// SDXL's size conditioning of the unconditional half of guidance (diffusers'
  /// `negative_original_size`, `negative_crops_coords_top_left`, `negative_target_size`); unset:
  /// the same as `size_conditioning`, as diffusers.
  std::optional<SizeConditioning> negative_size_conditioning;
  std::string timestep_spacing = "trailing";  ///< "trailing" (recipe), "leading" or "linspace".
  int64_t batch_size = 1;          ///< Images per UNet batch (the UNet sees 2× that with guidance).
  int64_t images_per_prompt = 1;   ///< Images made from each prompt.
  Precision precision = Precision::kFP32;  ///< Autocast of text encoder + UNet (fp16: CUDA only).
  /// Where to run; unset: where the UNet is. The models must already be there.
  std::optional<torch::Device> device;
  /// Image-to-image: uint8 [height, width, 3] starting image, or undefined.
  torch::Tensor init_image;
  /// Image-to-image strength in [0, 1]: 1 starts from noise, 0 returns the init image's VAE
  /// round trip (diffusers: the last int(steps · strength) timesteps run).
  double strength = 0.8;
  /// Inpainting: uint8 [height, width] (or [height, width, 1 or 3]) mask over `init_image`, non-zero
  /// where the image is made anew. Outside the mask the init image stays: after every step its
  /// latents, noised to the next step's level, replace the sample's there (diffusers'
  /// StableDiffusionInpaintPipeline with a 4-channel UNet). Undefined: no inpainting.
  torch::Tensor mask;
  /// The condition image of each attached CSC-Tuner that takes part (every one whose scale is not
  /// 0), by the tuner's name; one CSC-Tuner, one condition.
  std::vector<GenerateCondition> conditions;
  /// ControlNets and their condition images (with CSC-Tuners or without).
  std::vector<GenerateControlNet> controlnets;
  /// Replays each step's noise prediction from a CUDA graph where one applies (a CUDA device, a
  /// build with CUDA graphs: `NoisePrediction`); false: every step eager. The same kernels either
  /// way, so the same images.
  bool cuda_graph = true;
  /// Called after every denoising step (e.g. to print progress); may be empty.
  std::function<void(const GenerateProgress&)> progress;

  /// Throws naming the field and the value when a setting is out of range.
  void validate() const {
    TORCH_CHECK(width > 0 && width % 8 == 0, "generate: width must be a positive multiple of 8, got ",
                width);
    TORCH_CHECK(height > 0 && height % 8 == 0,
                "generate: height must be a positive multiple of 8, got ", height);
    TORCH_CHECK(steps > 0, "generate: steps must be > 0, got ", steps);
    TORCH_CHECK(std::isfinite(guidance_scale), "generate: guidance_scale must be finite, got ",
                guidance_scale);
    TORCH_CHECK(guidance_rescale >= 0 && guidance_rescale <= 1,
                "generate: guidance_rescale must be in [0, 1], got ", guidance_rescale);
    // Past 1, σ_t exceeds √(1 − ᾱ_prev) at some steps and the DDIM update takes a square root of
    // a negative number.
    TORCH_CHECK(eta >= 0 && eta <= 1, "generate: eta must be in [0, 1], got ", eta);
    TORCH_CHECK(timestep_spacing == "trailing" || timestep_spacing == "leading" ||
                    timestep_spacing == "linspace",
                "generate: timestep spacing must be trailing, leading or linspace, got '",
                timestep_spacing, "'");
    TORCH_CHECK(batch_size > 0, "generate: batch_size must be > 0, got ", batch_size);
    TORCH_CHECK(images_per_prompt > 0, "generate: images_per_prompt must be > 0, got ",
                images_per_prompt);
    TORCH_CHECK(strength >= 0 && strength <= 1, "generate: strength must be in [0, 1], got ",
                strength);
    TORCH_CHECK(!init_image.defined() || strength == 0 || image_to_image_steps(steps, strength) > 0,
                "generate: strength ", strength, " of ", steps, " steps runs none of them (int(",
                steps, " · ", strength, ") = 0): raise the steps or the strength, or give strength 0 "
                "for the init image's VAE round trip");
    for (const auto* size : {&size_conditioning, &negative_size_conditioning}) {
      if (size->has_value()) (*size)->time_ids();  // throws naming the sizes when one is not positive
    }
    auto check_image = [&](const torch::Tensor& image, const std::string& what) {
      TORCH_CHECK(image.defined() && image.scalar_type() == torch::kUInt8 && image.dim() == 3 &&
                      image.size(2) == 3,
                  "generate: ", what, " must be a uint8 [H, W, 3] image, got ",
                  image.defined() ? image.sizes() : torch::IntArrayRef{}, " ",
                  image.defined() ? image.scalar_type() : torch::kUInt8);
      TORCH_CHECK(image.size(0) == height && image.size(1) == width, "generate: ", what, " is ",
                  image.size(1), "x", image.size(0), " but the images are ", width, "x", height,
                  ": resize it first (a condition must line up with the image pixel for pixel)");
    };
    if (init_image.defined()) check_image(init_image, "init_image");
    if (mask.defined()) {
      TORCH_CHECK(init_image.defined(), "generate: a mask needs the init_image it masks");
      TORCH_CHECK(mask.scalar_type() == torch::kUInt8 && (mask.dim() == 2 || mask.dim() == 3),
                  "generate: mask must be a uint8 [H, W] or [H, W, C] image, got ", mask.sizes(),
                  " ", mask.scalar_type());
      TORCH_CHECK(mask.size(0) == height && mask.size(1) == width, "generate: the mask is ",
                  mask.size(1), "x", mask.size(0), " but the images are ", width, "x", height,
                  ": resize it first (it must line up with the image pixel for pixel)");
    }
    for (const auto& condition : conditions) {
      check_image(condition.image, "the condition of CSC-Tuner '" + condition.tuner + "'");
    }
    for (size_t i = 0; i < controlnets.size(); ++i) {
      TORCH_CHECK(!controlnets[i].model.is_empty(), "generate: ControlNet ", i, " is not loaded");
      TORCH_CHECK(std::isfinite(controlnets[i].scale), "generate: ControlNet ", i,
                  "'s scale must be finite, got ", controlnets[i].scale);
      check_image(controlnets[i].image, "the condition of ControlNet " + std::to_string(i));
    }
  }
};

/// The seed of image `index` of a call (see the file comment).
inline uint64_t image_seed(const GenerateOptions& options, int64_t index) {
  return options.seed + static_cast<uint64_t>(index);
}

/// The DDIM settings of `sd`: its `scheduler_config.json` when it has one (SD 1.5: scaled_linear
/// 0.00085 → 0.012, steps_offset 1, set_alpha_to_one false), else SD 1.5's settings.
inline DDIMSchedulerOptions scheduler_options(const StableDiffusion& sd) {
  return sd.scheduler_config.is_object() ? DDIMSchedulerOptions::from_json(sd.scheduler_config)
                                         : DDIMSchedulerOptions();
}

/// The DDIM sampler of `sd` (`scheduler_options`) with `spacing` as timestep spacing.
inline DDIMScheduler make_scheduler(const StableDiffusion& sd, const std::string& spacing) {
  return DDIMScheduler(scheduler_options(sd).timestep_spacing(spacing));
}

/// The noise schedule `sd` was trained with: its scheduler config's betas (SD 1.5's without one),
/// zero-terminal-SNR rescaled when the config says so. Whatever the config's prediction type:
/// training may choose its own target (`NoiseSchedule::prediction_target` checks it).
inline NoiseSchedule noise_schedule(const StableDiffusion& sd) {
  return NoiseSchedule(scheduler_options(sd).schedule());
}

/// What `sd`'s UNet predicts: its scheduler config's `prediction_type` (epsilon, SD 1.5's,
/// without one).
inline std::string prediction_type(const StableDiffusion& sd) {
  return scheduler_options(sd).prediction_type();
}

namespace detail {

/// Gives each attached CSC-Tuner its condition image of `options` for one call, and checks that
/// every CSC-Tuner that takes part has one and every condition names an attached tuner.
inline void set_conditions(StableDiffusion& sd, const GenerateOptions& options,
                           scedit::ConditionScope& scope) {
  const auto tuners = scedit::csc_tuners(*sd.unet);
  std::string names;
  for (const auto& item : tuners) names += (names.empty() ? "'" : ", '") + item.key() + "'";
  for (const auto& condition : options.conditions) {
    const auto* tuner = tuners.find(condition.tuner);
    TORCH_CHECK(tuner != nullptr, "generate: a condition is given for CSC-Tuner '",
                condition.tuner, "', but the UNet has ",
                names.empty() ? "no CSC-Tuner" : "only " + names);
    const auto reference = first_parameter(**tuner, "CSC-Tuner");
    const auto image = condition_to_float(condition.image).unsqueeze(0);  // [1, 3, H, W]
    scope.set(*tuner, image.to(reference.device(), reference.scalar_type()));
  }
  for (const auto& item : tuners) {
    const auto& options_k = item.value()->options;
    const bool active = options_k.scale() != 0 && options_k.control_scale() != 0;
    TORCH_CHECK(!active || item.value()->has_condition(), "generate: CSC-Tuner '", item.key(),
                "' is attached but has no condition image (GenerateOptions::conditions)");
  }
}

/// Throws, naming the first denoising step whose latents hold NaN or Inf, unless every entry of
/// `finite` (bool [1 + steps]: the starting latents, then those after each of `timesteps`) is
/// set. Decoded, such latents make a black image that looks like a result.
inline void check_finite_steps(const torch::Tensor& finite, const std::vector<int64_t>& timesteps,
                               int64_t batch, double guidance_scale) {
  const auto flags = finite.cpu();  // the one wait for the device
  const bool* set = flags.data_ptr<bool>();
  const int64_t first_bad = std::find(set, set + flags.numel(), false) - set;
  if (first_bad == flags.numel()) return;
  TORCH_CHECK(first_bad != 0, "generate: the starting latents of batch ", batch + 1,
              " hold NaN or Inf before any denoising step (the VAE's or the model's weights?); "
              "no image was decoded");
  TORCH_CHECK(false, "generate: the latents of batch ", batch + 1, " became NaN or Inf at denoising step ",
              first_bad, " of ", timesteps.size(), " (timestep ", timesteps[static_cast<size_t>(first_bad - 1)],
              ", guidance scale ", guidance_scale, "); no image was decoded (an extreme guidance "
              "scale, or weights that overflow, cause this)");
}

/// Runs the sampler batch by batch and hands each batch's final latents to `consume`.
inline void sample_batches(StableDiffusion& sd, const std::vector<std::string>& prompts,
                           const GenerateOptions& options,
                           const std::function<void(const torch::Tensor&)>& consume) {
  options.validate();
  TORCH_CHECK(!prompts.empty(), "generate: no prompts");
  TORCH_CHECK(!sd.unet.is_empty() && !sd.vae.is_empty(), "generate: the pipeline has no UNet or VAE");
  const auto unet_param = detail::first_parameter(*sd.unet, "UNet");
  const torch::Device device = unet_param.device();
  if (options.device) {
    const auto& want = *options.device;
    TORCH_CHECK(want.type() == device.type() && (!want.has_index() || !device.has_index() ||
                                                 want.index() == device.index()),
                "generate: asked to run on ", want, " but the UNet is on ", device,
                "; move the models there first");
  }
  std::vector<std::pair<torch::nn::Module*, std::string>> frozen{{sd.vae.get(), "VAE"}};
  for (auto* encoder : sd.text_encoders()) frozen.emplace_back(encoder, "text encoder");
  for (const auto& [module, name] : frozen) {
    TORCH_CHECK(detail::first_parameter(*module, name.c_str()).device() == device, "generate: the ", name,
                " is on ", detail::first_parameter(*module, name.c_str()).device(), " but the UNet on ", device);
  }
  const bool added = sd.unet_config.has_text_time();  // SDXL: pooled text and size conditioning
  TORCH_CHECK(added || (!options.size_conditioning && !options.negative_size_conditioning),
              "generate: size conditioning (original size, crop, target size) is SDXL's; this "
              "model's UNet takes none");
  check_precision(options.precision, device);
  const torch::Dtype compute = compute_dtype(options.precision);
#if !SCEDIT_TORCH_2
  // LibTorch 1.13's CPU autocast leaves GroupNorm out of its float32 list: a bf16 activation then
  // meets float32 GroupNorm weights and the kernel throws. Half weights avoid that.
  TORCH_CHECK(!(device.is_cpu() && compute != torch::kFloat32 &&
                unet_param.scalar_type() == torch::kFloat32),
              "generate: precision ", to_string(options.precision), " on the CPU needs the model's "
              "weights in ", to_string(options.precision), " (LibTorch 1.13's CPU autocast runs GroupNorm in its input's "
              "dtype): load the model in that dtype");
#endif
  const auto latent_dtype =
      unet_param.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const int64_t factor = vae_scale_factor(sd);
  const int64_t channels = sd.unet_config.in_channels;
  const int64_t h = options.height / factor, w = options.width / factor;

  torch::NoGradGuard no_grad;
  auto scheduler = make_scheduler(sd, options.timestep_spacing);
  scheduler.set_timesteps(options.steps);
  const auto& schedule_timesteps = scheduler.timesteps();  // int64 [steps], descending
  std::vector<int64_t> timesteps(schedule_timesteps.data_ptr<int64_t>(),
                                 schedule_timesteps.data_ptr<int64_t>() + schedule_timesteps.numel());
  const auto all_steps = static_cast<int64_t>(timesteps.size());

  // Image-to-image (diffusers StableDiffusionImg2ImgPipeline.get_timesteps): keep the last
  // int(steps · strength) timesteps and start from the init latents noised to the first.
  torch::Tensor init_latents;
  if (options.init_image.defined()) {
    const auto keep = image_to_image_steps(all_steps, options.strength);
    timesteps.erase(timesteps.begin(), timesteps.begin() + (all_steps - keep));
    init_latents = encode_images(sd, to_float(options.init_image).unsqueeze(0))
                       .to(device, latent_dtype);  // [1, C, h, w]
  }
  // Inpainting: where the mask is set, in latent cells (nearest, as diffusers' mask processor).
  torch::Tensor known_region;  // [1, 1, h, w], 1 where the init image stays
  if (options.mask.defined()) {
    auto mask = options.mask.dim() == 3 ? options.mask.amax(2) : options.mask;  // [H, W]
    mask = torch::nn::functional::interpolate(
        mask.gt(0).to(torch::kFloat32).view({1, 1, mask.size(0), mask.size(1)}),
        torch::nn::functional::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kNearest));
    known_region = (1 - mask).to(device, latent_dtype);
  }

  // The ControlNets' condition images, once for the whole call.
  std::vector<ControlInput> controls;
  for (const auto& control : options.controlnets) {
    const auto reference = first_parameter(*control.model, "ControlNet");
    TORCH_CHECK(reference.device() == device, "generate: a ControlNet is on ", reference.device(),
                " but the UNet on ", device);
    const auto image = condition_to_float(control.image).unsqueeze(0);  // [1, 3, H, W]
    controls.push_back({control.model, image.to(device, reference.scalar_type()), control.scale});
  }
  // The CSC-Tuners' hint features, once for the whole call (the same for every image).
  scedit::ConditionScope conditions;
  {
    scedit::compat::AutocastGuard autocast(device.type(), compute);
    set_conditions(sd, options, conditions);
  }
  const bool guided = options.guidance_scale > 1.0;  // diffusers: do_classifier_free_guidance
  TextConditioning negative;                         // [1, 77, D] (and SDXL's pooled [1, P])
  if (guided) {
    scedit::compat::AutocastGuard autocast(device.type(), compute);
    negative = encode_text(sd, {options.negative_prompt});
    if (sd.is_sdxl() && options.negative_prompt.empty()) {  // force_zeros_for_empty_prompt
      negative = {torch::zeros_like(negative.context), torch::zeros_like(negative.pooled)};
    }
  }
  // SDXL's size conditioning, the same for every image (diffusers' _get_add_time_ids).
  const auto size = options.size_conditioning.value_or(
      SizeConditioning::uncropped(options.height, options.width));
  const auto negative_size = options.negative_size_conditioning.value_or(size);
  NoisePrediction noise_prediction(sd.unet, options.guidance_scale, options.guidance_rescale, controls,
                                   options.cuda_graph);

  const int64_t total = static_cast<int64_t>(prompts.size()) * options.images_per_prompt;
  const int64_t batches = (total + options.batch_size - 1) / options.batch_size;
  for (int64_t batch = 0; batch < batches; ++batch) {
    const int64_t start = batch * options.batch_size;
    const int64_t n = std::min(options.batch_size, total - start);
    std::vector<std::string> batch_prompts;
    std::vector<torch::Generator> generators;
    std::vector<torch::Tensor> noise;
    for (int64_t k = 0; k < n; ++k) {
      batch_prompts.push_back(prompts[static_cast<size_t>((start + k) / options.images_per_prompt)]);
      generators.push_back(at::detail::createCPUGenerator(image_seed(options, start + k)));
      noise.push_back(torch::randn({1, channels, h, w}, generators.back(), torch::kFloat32));
    }
    // [n, C, h, w], drawn on the CPU, then moved: the same start on every device.
    const auto initial = torch::cat(noise).to(device, latent_dtype);

    torch::Tensor latents;
    {
      scedit::compat::AutocastGuard autocast(device.type(), compute);
      const auto text = encode_text(sd, batch_prompts);                         // [n, 77, D]
      const auto uncond = guided ? negative.context.expand({n, -1, -1}) : torch::Tensor();
      UNetAddedConditions added_cond, added_uncond;  // SDXL only; empty otherwise
      if (added) {
        added_cond = added_conditions(sd, text.pooled, {size});
        if (guided) added_uncond = added_conditions(sd, negative.pooled.expand({n, -1}), {negative_size});
      }
      noise_prediction.set_batch(text.context, uncond, added_cond, added_uncond);
      if (!init_latents.defined()) {
        latents = initial * scheduler.init_noise_sigma();
      } else if (timesteps.empty()) {
        latents = init_latents.expand({n, -1, -1, -1}).clone();  // strength 0: nothing to denoise
      } else {
        latents = scheduler.schedule().add_noise(init_latents.expand({n, -1, -1, -1}), initial,
                                                 torch::full({1}, timesteps.front(), torch::kInt64));
      }
      // Whether the latents are finite at the start ([0]) and after each step ([i + 1]), kept on
      // the device and read once before the latents leave: a check per step would wait for the
      // device every step.
      std::vector<torch::Tensor> finite{torch::isfinite(latents).all()};
      for (size_t i = 0; i < timesteps.size(); ++i) {
        const int64_t t = timesteps[i];
        const auto input = scheduler.scale_model_input(latents, t);
        const auto eps = noise_prediction(input, t);
        torch::Tensor variance_noise;
        if (options.eta > 0) {
          std::vector<torch::Tensor> z;
          for (auto& generator : generators) {
            z.push_back(torch::randn({1, channels, h, w}, generator, torch::kFloat32));
          }
          variance_noise = torch::cat(z).to(device, latent_dtype);
        }
        latents = scheduler.step(eps, t, latents, options.eta, variance_noise);
        if (known_region.defined()) {  // there: the init latents at the next step's noise level
          const auto known = i + 1 < timesteps.size()
                                 ? scheduler.schedule().add_noise(init_latents.expand({n, -1, -1, -1}), initial,
                                                                  torch::full({1}, timesteps[i + 1], torch::kInt64))
                                 : init_latents.expand({n, -1, -1, -1});
          latents = known_region * known + (1 - known_region) * latents;
        }
        finite.push_back(torch::isfinite(latents).all());
        if (options.progress) {
          options.progress({static_cast<int64_t>(i) + 1, static_cast<int64_t>(timesteps.size()),
                            batch, batches});
        }
      }
      check_finite_steps(torch::stack(finite), timesteps, batch, options.guidance_scale);
    }
    consume(latents);
  }
}

}  // namespace detail

/// Final latents [N, C, H/8, W/8] of every image (N = prompts × images_per_prompt, prompt-major),
/// before the VAE: the sampler of `generate` without the decode.
inline torch::Tensor sample_latents(StableDiffusion& sd, const std::vector<std::string>& prompts,
                                    const GenerateOptions& options) {
  std::vector<torch::Tensor> parts;
  detail::sample_batches(sd, prompts, options, [&](const torch::Tensor& latents) {
    parts.push_back(latents);
  });
  return torch::cat(parts);
}

/// Generates `images_per_prompt` images per prompt (prompt-major order) as uint8 [H, W, 3] CPU
/// tensors: text-to-image, or image-to-image when `options.init_image` is set. Deterministic for
/// a seed (see the file comment). Tuners attached to the UNet take part; CSC-Tuners get their
/// images of `options.conditions`.
inline std::vector<torch::Tensor> generate(StableDiffusion& sd, const std::vector<std::string>& prompts,
                                           const GenerateOptions& options) {
  std::vector<torch::Tensor> images;
  detail::sample_batches(sd, prompts, options, [&](const torch::Tensor& latents) {
    const auto decoded = decode_latents(sd, latents);  // [B, H, W, 3]
    for (int64_t i = 0; i < decoded.size(0); ++i) images.push_back(decoded[i].clone());
  });
  return images;
}

}  // namespace sd
