#pragma once
/// @file pipeline.hpp
/// @brief Sampling with Stable Diffusion: prompts → text embeddings → DDIM with classifier-free
/// guidance → VAE decode → uint8 images; image-to-image; and loading tuner files (SC-Tuners,
/// CSC-Tuners, LoRA) onto a pipeline. Shared by the `generate` program, `train_style`'s
/// validation samples and the benches.
///
/// The sampler follows diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline`
/// (`__call__`): one batched UNet call over [uncond; cond] per step when guidance > 1, then
/// `classifier_free_guidance` with diffusers' `rescale_noise_cfg` (scheduler.hpp), the DDIM
/// step, and `vae.decode(latents / scaling_factor)`. The defaults are SCEdit's sampling recipe
/// (DDIM, eta 0, 50 steps, trailing timesteps, guidance 7.5, guidance rescale 0.5, empty
/// negative prompt).
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
/// sd::attach_tuner_file(pipe, "style.safetensors", /*scale=*/1.0, tuners);
/// sd::GenerateOptions options;
/// options.seed = 42;
/// std::vector<torch::Tensor> images = sd::generate(pipe, {"a cat in a hat"}, options);
/// common::write_png("cat.png", images[0]);  // uint8 [512, 512, 3]
/// @endcode

#include <sd/scheduler.hpp>
#include <sd/weights.hpp>

#include <common/image.hpp>

#include <scedit/compat.hpp>
#include <scedit/csctuner.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/tuner_io.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace sd {

namespace detail {

/// The first parameter of `module` (its device and dtype stand for the module's).
inline torch::Tensor first_parameter(const torch::nn::Module& module, const char* what) {
  const auto parameters = module.parameters();
  TORCH_CHECK(!parameters.empty(), "pipeline: the ", what, " has no parameters");
  return parameters.front();
}

}  // namespace detail

/// The autocast dtype of a `--precision` name: `fp32` (no autocast), `bf16`, `fp16`.
inline torch::Dtype precision_dtype(const std::string& precision) {
  if (precision == "fp32") return torch::kFloat32;
  if (precision == "bf16") return torch::kBFloat16;
  if (precision == "fp16") return torch::kFloat16;
  TORCH_CHECK(false, "precision must be fp32, bf16 or fp16, got '", precision, "'");
}

/// Pixels per latent cell: 2^(VAE levels − 1) (8 for SD).
inline int64_t vae_scale_factor(const StableDiffusion& sd) {
  return int64_t{1} << (sd.vae_config.block_out_channels.size() - 1);
}

/// What image sides must be multiples of for this model: the VAE's factor times the UNet's
/// downsampling (8 · 8 = 64 for SD 1.5: the UNet halves the latent three times).
inline int64_t image_size_multiple(const StableDiffusion& sd) {
  return vae_scale_factor(sd) * (int64_t{1} << (sd.unet_config.num_blocks() - 1));
}

/// The model's native image side: UNet `sample_size` × VAE factor (512 for SD 1.5, 64 for the
/// tiny model); 512 when the configuration does not say.
inline int64_t default_image_size(const StableDiffusion& sd) {
  return sd.unet_config.sample_size > 0 ? sd.unet_config.sample_size * vae_scale_factor(sd) : 512;
}

/// Text embeddings of `prompts`: tokenized, then the text encoder's last hidden state,
/// [B, 77, D], on the text encoder's device and in its dtype (no graph).
inline torch::Tensor encode_prompts(StableDiffusion& sd, const std::vector<std::string>& prompts) {
  TORCH_CHECK(sd.tokenizer.has_value(), "encode_prompts: the pipeline has no tokenizer");
  TORCH_CHECK(!sd.text_encoder.is_empty(), "encode_prompts: the pipeline has no text encoder");
  TORCH_CHECK(!prompts.empty(), "encode_prompts: no prompts");
  torch::NoGradGuard no_grad;
  const auto device = detail::first_parameter(*sd.text_encoder, "text encoder").device();
  const torch::Tensor ids = (*sd.tokenizer)(prompts).to(device);  // int64 [B, 77]
  return sd.text_encoder->forward(ids).last_hidden_state;        // [B, 77, D]
}

/// Where a `generate` call is, for progress displays.
struct GenerateProgress {
  int64_t step = 0;     ///< Denoising steps done in this batch (1..steps).
  int64_t steps = 0;    ///< Denoising steps per batch (fewer than `GenerateOptions::steps` for img2img).
  int64_t batch = 0;    ///< Batch index (0-based).
  int64_t batches = 0;  ///< Number of batches.
};

/// Settings of one `generate` call (diffusers' pipeline arguments). The defaults are SCEdit's
/// sampling recipe except the size, which callers set from the model (`default_image_size`).
struct GenerateOptions {
  int64_t width = 512;             ///< Image width: a multiple of 8 (of 64 for SD's UNet).
  int64_t height = 512;            ///< Image height: a multiple of 8 (of 64 for SD's UNet).
  int64_t steps = 50;              ///< DDIM steps (> 0); img2img runs the last strength·steps.
  double guidance_scale = 7.5;     ///< Classifier-free guidance; <= 1 runs the conditional pass only.
  double guidance_rescale = 0.5;   ///< diffusers' rescale_noise_cfg φ in [0, 1] (0: off).
  double eta = 0.0;                ///< DDIM η (0: deterministic DDIM).
  uint64_t seed = 0;               ///< Image i uses a CPU generator seeded with seed + i.
  std::string negative_prompt;     ///< The unconditional prompt ("" as in the recipe).
  std::string timestep_spacing = "trailing";  ///< "trailing" (recipe), "leading" or "linspace".
  int64_t batch_size = 1;          ///< Images per UNet batch (the UNet sees 2× that with guidance).
  int64_t images_per_prompt = 1;   ///< Images made from each prompt.
  std::string precision = "fp32";  ///< Autocast of text encoder + UNet: fp32 (off), bf16, fp16 (CUDA).
  /// Where to run; unset: where the UNet is. The models must already be there.
  std::optional<torch::Device> device;
  /// Image-to-image: uint8 [H, W, 3] starting image (resized to width × height), or undefined.
  torch::Tensor init_image;
  /// Image-to-image strength in [0, 1]: 1 starts from noise, 0 returns the init image's VAE
  /// round trip (diffusers: the last int(steps · strength) timesteps run).
  double strength = 0.8;
  /// Condition image for attached CSC-Tuners: uint8 [H, W, 3] (resized to width × height), fed
  /// to every CSC-Tuner for this call; undefined to keep what was set on them.
  torch::Tensor condition;
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
    TORCH_CHECK(eta >= 0 && std::isfinite(eta), "generate: eta must be >= 0, got ", eta);
    TORCH_CHECK(timestep_spacing == "trailing" || timestep_spacing == "leading" ||
                    timestep_spacing == "linspace",
                "generate: timestep spacing must be trailing, leading or linspace, got '",
                timestep_spacing, "'");
    TORCH_CHECK(batch_size > 0, "generate: batch_size must be > 0, got ", batch_size);
    TORCH_CHECK(images_per_prompt > 0, "generate: images_per_prompt must be > 0, got ",
                images_per_prompt);
    precision_dtype(precision);
    TORCH_CHECK(strength >= 0 && strength <= 1, "generate: strength must be in [0, 1], got ",
                strength);
    for (const auto* image : {&init_image, &condition}) {
      TORCH_CHECK(!image->defined() || (image->scalar_type() == torch::kUInt8 &&
                                        image->dim() == 3 && image->size(2) == 3),
                  "generate: ", image == &init_image ? "init_image" : "condition",
                  " must be a uint8 [H, W, 3] image, got ",
                  image->defined() ? image->sizes() : torch::IntArrayRef{}, " ",
                  image->defined() ? image->scalar_type() : torch::kUInt8);
    }
  }
};

/// The seed of image `index` of a call (see the file comment).
inline uint64_t image_seed(const GenerateOptions& options, int64_t index) {
  return options.seed + static_cast<uint64_t>(index);
}

/// The DDIM sampler of `sd`: its `scheduler_config.json` when it has one (SD 1.5: scaled_linear
/// 0.00085 → 0.012, steps_offset 1, set_alpha_to_one false), else SD 1.5's settings; with
/// `spacing` as timestep spacing.
inline DDIMScheduler make_scheduler(const StableDiffusion& sd, const std::string& spacing) {
  DDIMSchedulerOptions options = sd.scheduler_config.is_object()
                                     ? DDIMSchedulerOptions::from_json(sd.scheduler_config)
                                     : DDIMSchedulerOptions();
  options.timestep_spacing(spacing);
  return DDIMScheduler(options);
}

/// The noise prediction of one step. With `uncond` defined: one UNet call over the batch
/// [uncond; cond] ([2B, …]) and classifier-free guidance with rescale; without: the
/// conditional prediction alone. `latents` [B, C, h, w], `cond` / `uncond` [B, 77, D]; the
/// result is in the latents' dtype.
inline torch::Tensor predict_noise(UNet& unet, const torch::Tensor& latents, int64_t t,
                                   const torch::Tensor& cond, const torch::Tensor& uncond,
                                   double guidance_scale, double guidance_rescale) {
  const auto dtype = detail::first_parameter(*unet, "UNet").scalar_type();
  const torch::Tensor timestep = torch::full({1}, t, torch::kInt64);
  if (!uncond.defined()) {
    return unet(latents.to(dtype), timestep, cond.to(dtype)).to(latents.scalar_type());
  }
  const auto input = torch::cat({latents, latents}).to(dtype);      // [2B, C, h, w]
  const auto context = torch::cat({uncond, cond}).to(dtype);        // [2B, 77, D]
  const auto eps = unet(input, timestep, context).to(latents.scalar_type()).chunk(2);
  return classifier_free_guidance(eps[0], eps[1], guidance_scale, guidance_rescale);
}

/// VAE latents of one image: uint8 [H, W, 3] → `(mean − shift) · scaling_factor`
/// [1, C, H/8, W/8] in float32 (or float64 for a float64 VAE), on the VAE's device. The
/// posterior mean is used (diffusers' `retrieve_latents(sample_mode="argmax")`), so the result
/// is deterministic.
inline torch::Tensor encode_image(StableDiffusion& sd, const torch::Tensor& image) {
  torch::NoGradGuard no_grad;
  const auto reference = detail::first_parameter(*sd.vae, "VAE");
  const auto x = common::to_float(image).unsqueeze(0).to(reference.device(), reference.scalar_type());
  const auto mean = sd.vae->encode(x).mean;  // [1, 3, H, W] -> [1, C, H/8, W/8]
  const auto out_dtype = reference.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return (mean.to(out_dtype) - sd.vae_config.shift_factor) * sd.scaling_factor;
}

/// Images of latents [B, C, h, w]: `vae.decode(latents / scaling_factor + shift)`, clamped to
/// [-1, 1], as uint8 [H, W, 3] on the CPU.
inline std::vector<torch::Tensor> decode_latents(StableDiffusion& sd, const torch::Tensor& latents) {
  torch::NoGradGuard no_grad;
  const auto reference = detail::first_parameter(*sd.vae, "VAE");
  const auto z = (latents / sd.scaling_factor + sd.vae_config.shift_factor)
                     .to(reference.device(), reference.scalar_type());
  const auto images = common::to_uint8(sd.vae->decode(z).to(torch::kFloat32));  // [B, H, W, 3]
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < images.size(0); ++i) out.push_back(images[i].clone());
  return out;
}

/// The CSC-Tuners attached to `unet` (registered as its children by `attach_csc_tuner`).
inline std::vector<scedit::CSCTuner> csc_tuners(UNet& unet) {
  std::vector<scedit::CSCTuner> tuners;
  for (const auto& module : unet->modules(/*include_self=*/false)) {
    if (auto csc = std::dynamic_pointer_cast<scedit::CSCTunerImpl>(module)) tuners.emplace_back(csc);
  }
  return tuners;
}

namespace detail {

/// uint8 [H, W, 3] resized to height × width when it is not that size already.
inline torch::Tensor fit_image(const torch::Tensor& image, int64_t height, int64_t width) {
  return image.size(0) == height && image.size(1) == width ? image
                                                           : common::resize(image, height, width);
}

/// Feeds `GenerateOptions::condition` to every CSC-Tuner of the UNet for one call (clearing it
/// at the end), or checks that each active CSC-Tuner already has one.
class ConditionScope {
 public:
  ConditionScope(UNet& unet, const GenerateOptions& options, torch::Dtype compute) {
    auto tuners = csc_tuners(unet);
    if (!options.condition.defined()) {
      for (const auto& tuner : tuners) {
        const bool active = tuner->options.scale() != 0 && tuner->options.control_scale() != 0;
        TORCH_CHECK(!active || tuner->has_condition(), "generate: a CSC-Tuner is attached but no "
                    "condition image was given (GenerateOptions::condition, --condition FILE)");
      }
      return;
    }
    TORCH_CHECK(!tuners.empty(), "generate: a condition image was given but no CSC-Tuner is "
                "attached (load one with attach_tuner_file / --tuner)");
    const auto image = fit_image(options.condition, options.height, options.width);
    // uint8 [H, W, 3] -> float [1, 3, H, W] in [0, 1] (scepter's condition range)
    const auto condition = image.permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32) / 255.0;
    for (auto& tuner : tuners) {
      const auto reference = first_parameter(*tuner, "CSC-Tuner");
      const auto device = reference.device();
      scedit::compat::AutocastGuard autocast(device.type(), compute);
      tuner->set_condition(condition.to(device, reference.scalar_type()));
      tuners_.push_back(tuner);
    }
  }
  ConditionScope(const ConditionScope&) = delete;
  ConditionScope& operator=(const ConditionScope&) = delete;
  ~ConditionScope() {
    for (auto& tuner : tuners_) tuner->clear_condition();
  }

 private:
  std::vector<scedit::CSCTuner> tuners_;
};

/// Runs the sampler batch by batch and hands each batch's final latents to `consume`.
inline void sample_batches(StableDiffusion& sd, const std::vector<std::string>& prompts,
                           const GenerateOptions& options,
                           const std::function<void(const torch::Tensor&)>& consume) {
  options.validate();
  TORCH_CHECK(!prompts.empty(), "generate: no prompts");
  TORCH_CHECK(!sd.unet.is_empty() && !sd.vae.is_empty(), "generate: the pipeline has no UNet or VAE");
  const int64_t multiple = image_size_multiple(sd);
  TORCH_CHECK(options.width % multiple == 0 && options.height % multiple == 0, "generate: size ",
              options.width, "x", options.height, " is not a multiple of ", multiple,
              " in both sides, which this model needs (VAE factor ", vae_scale_factor(sd),
              " × the UNet's downsampling ", multiple / vae_scale_factor(sd), ")");
  const auto unet_param = first_parameter(*sd.unet, "UNet");
  const torch::Device device = unet_param.device();
  if (options.device) {
    const auto& want = *options.device;
    TORCH_CHECK(want.type() == device.type() && (!want.has_index() || !device.has_index() ||
                                                 want.index() == device.index()),
                "generate: asked to run on ", want, " but the UNet is on ", device,
                "; move the models there first");
  }
  for (const auto& [module, name] :
       {std::make_pair(static_cast<torch::nn::Module*>(sd.vae.get()), "VAE"),
        std::make_pair(static_cast<torch::nn::Module*>(sd.text_encoder.get()), "text encoder")}) {
    TORCH_CHECK(first_parameter(*module, name).device() == device, "generate: the ", name,
                " is on ", first_parameter(*module, name).device(), " but the UNet on ", device);
  }
  const torch::Dtype compute = precision_dtype(options.precision);
  TORCH_CHECK(compute != torch::kFloat16 || device.is_cuda(), "generate: precision fp16 needs a "
              "CUDA device (LibTorch's CPU kernels lack half precision); use bf16 on the CPU");
#if !SCEDIT_TORCH_2
  // LibTorch 1.13's CPU autocast leaves GroupNorm out of its float32 list: a bf16 activation then
  // meets float32 GroupNorm weights and the kernel throws. Half weights avoid that.
  TORCH_CHECK(!(device.is_cpu() && compute != torch::kFloat32 &&
                unet_param.scalar_type() == torch::kFloat32),
              "generate: precision ", options.precision, " on the CPU needs the model's weights in ",
              options.precision, " (LibTorch 1.13's CPU autocast runs GroupNorm in its input's "
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
    const auto keep = std::min<int64_t>(
        static_cast<int64_t>(static_cast<double>(all_steps) * options.strength), all_steps);
    timesteps.erase(timesteps.begin(), timesteps.begin() + (all_steps - keep));
    init_latents = encode_image(sd, fit_image(options.init_image, options.height, options.width))
                       .to(device, latent_dtype);  // [1, C, h, w]
  }

  ConditionScope conditions(sd.unet, options, compute);
  const bool guided = options.guidance_scale > 1.0;  // diffusers: do_classifier_free_guidance
  torch::Tensor negative;                            // [1, 77, D]
  if (guided) {
    scedit::compat::AutocastGuard autocast(device.type(), compute);
    negative = encode_prompts(sd, {options.negative_prompt});
  }

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
      const auto cond = encode_prompts(sd, batch_prompts);                     // [n, 77, D]
      const auto uncond = guided ? negative.expand({n, -1, -1}) : torch::Tensor();
      if (!init_latents.defined()) {
        latents = initial * scheduler.init_noise_sigma();
      } else if (timesteps.empty()) {
        latents = init_latents.expand({n, -1, -1, -1}).clone();  // strength 0: nothing to denoise
      } else {
        latents = scheduler.schedule().add_noise(init_latents.expand({n, -1, -1, -1}), initial,
                                                 torch::full({1}, timesteps.front(), torch::kInt64));
      }
      for (size_t i = 0; i < timesteps.size(); ++i) {
        const int64_t t = timesteps[i];
        const auto input = scheduler.scale_model_input(latents, t);
        const auto eps = predict_noise(sd.unet, input, t, cond, uncond, options.guidance_scale,
                                       options.guidance_rescale);
        torch::Tensor variance_noise;
        if (options.eta > 0) {
          std::vector<torch::Tensor> z;
          for (auto& generator : generators) {
            z.push_back(torch::randn({1, channels, h, w}, generator, torch::kFloat32));
          }
          variance_noise = torch::cat(z).to(device, latent_dtype);
        }
        latents = scheduler.step(eps, t, latents, options.eta, variance_noise);
        if (options.progress) {
          options.progress({static_cast<int64_t>(i) + 1, static_cast<int64_t>(timesteps.size()),
                            batch, batches});
        }
      }
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
/// a seed (see the file comment). Tuners attached to the UNet take part; CSC-Tuners get
/// `options.condition`.
inline std::vector<torch::Tensor> generate(StableDiffusion& sd, const std::vector<std::string>& prompts,
                                           const GenerateOptions& options) {
  std::vector<torch::Tensor> images;
  detail::sample_batches(sd, prompts, options, [&](const torch::Tensor& latents) {
    for (auto& image : decode_latents(sd, latents)) images.push_back(std::move(image));
  });
  return images;
}

// ---- tuner files -------------------------------------------------------------------------------

/// One tuner file attached by `attach_tuner_file`.
struct AttachedTuner {
  scedit::TunerKind kind = scedit::TunerKind::kUnknown;  ///< What the file held.
  std::string name;    ///< Its name on the skip sites / its LoRA adapter / its CSC module.
  std::string path;    ///< The file.
  double scale = 1.0;  ///< Its strength (LoRA: the adapter weight).
  int64_t count = 0;   ///< Skip sites (SC, CSC) or layers (LoRA) it edits.
};

/// The tuner files attached to one pipeline, and the LoRA injection they share (LoRA layers of
/// a model belong to one `scedit::LoRAInjection`). Keep it alive while generating.
struct AttachedTuners {
  std::vector<AttachedTuner> tuners;              ///< In attachment order.
  std::shared_ptr<scedit::LoRAInjection> lora;    ///< Created by the first LoRA file.

  /// `file:scale` of each tuner, comma-separated ("" when none).
  std::string describe() const {
    std::ostringstream out;
    for (size_t i = 0; i < tuners.size(); ++i) {
      out << (i ? ", " : "") << std::filesystem::path(tuners[i].path).filename().string() << ":"
          << tuners[i].scale;
    }
    return out.str();
  }
};

/// "SC-Tuners", "CSC-Tuner", "LoRA" or "unknown".
inline const char* tuner_kind_name(scedit::TunerKind kind) {
  switch (kind) {
    case scedit::TunerKind::kSC: return "SC-Tuners";
    case scedit::TunerKind::kCSC: return "CSC-Tuner";
    case scedit::TunerKind::kLoRA: return "LoRA";
    case scedit::TunerKind::kUnknown: break;
  }
  return "unknown";
}

/// What a tuner path holds: `scedit::detect_tuner_file` for a file; a folder with
/// `adapter_model.safetensors` is a peft LoRA. Throws naming the path when it does not exist.
inline scedit::TunerKind detect_tuner_path(const std::string& path) {
  TORCH_CHECK(std::filesystem::exists(path), "tuner file '", path, "' does not exist");
  if (std::filesystem::is_directory(path)) {
    return std::filesystem::is_regular_file(std::filesystem::path(path) / "adapter_model.safetensors")
               ? scedit::TunerKind::kLoRA
               : scedit::TunerKind::kUnknown;
  }
  return scedit::detect_tuner_file(path);
}

/// Attaches the tuners of the file at `path` to `sd`'s UNet with strength `scale`, under a name
/// unique within `attached` (`sc0`, `csc1`, `lora2`, ...), on the UNet's device and dtype:
///  - SC-Tuners (`lsc_identity.*`): one per skip site, as `attach_sc_tuners` + `load_sc_tuners`
///    would (options from the file), scale `s + scale·(T(s) − s)`;
///  - a CSC-Tuner (`pre_hint_blocks.*`): `read_csc_tuner` + `attach_csc_tuner`; its condition
///    image comes with each `generate` call (`GenerateOptions::condition`);
///  - LoRA (peft, diffusers or Kohya layout; a peft folder too): `scedit::load_lora` into the
///    shared injection, adapter weight = `scale`. UNet keys only (text-encoder keys are ignored).
/// A tuner at scale 0 is attached but disabled: the images are exactly those without it.
/// Throws naming the file for a missing file, an unknown kind or a mismatch with the model;
/// the model is left unchanged then.
inline AttachedTuner attach_tuner_file(StableDiffusion& sd, const std::string& path, double scale,
                                       AttachedTuners& attached) {
  TORCH_CHECK(std::isfinite(scale), "tuner file '", path, "': scale must be finite, got ", scale);
  AttachedTuner tuner;
  tuner.kind = detect_tuner_path(path);
  tuner.path = path;
  tuner.scale = scale;
  const auto index = std::to_string(attached.tuners.size());
  const auto reference = detail::first_parameter(*sd.unet, "UNet");
  auto& unet = *sd.unet;
  switch (tuner.kind) {
    case scedit::TunerKind::kSC: {
      tuner.name = "sc" + index;
      auto tuners = scedit::read_sc_tuners(path);
      auto sites = unet.skip_sites();
      TORCH_CHECK(tuners.size() == sites.size(), "tuner file '", path, "' holds ", tuners.size(),
                  " SC-Tuners but the UNet has ", sites.size(), " skip sites");
      for (size_t i = 0; i < sites.size(); ++i) {
        TORCH_CHECK(tuners[i]->options.channels() == sites[i]->skip_channels(), "tuner file '",
                    path, "': SC-Tuner ", i, " has ", tuners[i]->options.channels(),
                    " channels but skip site ", i, " of the UNet has ", sites[i]->skip_channels());
      }
      for (size_t i = 0; i < sites.size(); ++i) {
        tuners[i]->to(reference.device(), reference.scalar_type());
        tuners[i]->set_scale(scale);
        sites[i]->attach(tuner.name, tuners[i].ptr(), tuners[i].ptr());
        if (scale == 0) sites[i]->set_enabled(tuner.name, false);
      }
      tuner.count = static_cast<int64_t>(sites.size());
      break;
    }
    case scedit::TunerKind::kCSC: {
      tuner.name = "csc" + index;
      auto csc = scedit::read_csc_tuner(path, "", unet.skip_down_flags());
      csc->to(reference.device(), reference.scalar_type());
      csc->options.scale(scale);
      try {
        scedit::attach_csc_tuner(unet, csc, tuner.name);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "tuner file '", path, "': ", e.what_without_backtrace());
      }
      if (scale == 0) scedit::set_tuner_enabled(unet, tuner.name, false);
      tuner.count = csc->num_skips();
      break;
    }
    case scedit::TunerKind::kLoRA: {
      tuner.name = "lora" + index;
      if (!attached.lora) attached.lora = std::make_shared<scedit::LoRAInjection>();
      const auto result = scedit::load_lora(path, *attached.lora, unet,
                                            scedit::LoRALoadOptions().adapter_name(tuner.name));
      TORCH_CHECK(!result.paths.empty(), "tuner file '", path, "' holds no LoRA weights for the UNet");
      attached.lora->set_adapter_weight(tuner.name, scale);
      if (scale == 0) attached.lora->set_adapter_enabled(tuner.name, false);
      tuner.count = static_cast<int64_t>(result.paths.size());
      break;
    }
    case scedit::TunerKind::kUnknown:
      TORCH_CHECK(false, "tuner file '", path, "' holds neither SC-Tuners (lsc_identity.* keys), "
                  "a CSC-Tuner (pre_hint_blocks.*) nor LoRA weights (lora_A / lora.down / "
                  "lora_down keys)");
  }
  attached.tuners.push_back(tuner);
  return tuner;
}

}  // namespace sd
