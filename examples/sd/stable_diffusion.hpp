#pragma once
/// @file stable_diffusion.hpp
/// @brief A Stable Diffusion as one value — the UNet, the VAE, the text encoder, the tokenizer and
/// their configurations — and what every user of it needs: prompts to text embeddings, images to
/// latents and back (the VAE's scaling and shift factors, in one place), and the image sizes the
/// model takes.
///
/// Images reach the models as float [B, 3, H, W] in [-1, 1] (`to_float`) and leave them as uint8
/// [B, H, W, 3] (`to_uint8`); latents are what the UNet sees: `(z − shift) · scaling_factor`.

#include <sd/clip.hpp>
#include <sd/config.hpp>
#include <sd/tokenizer.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace sd {

/// A Stable Diffusion: the three models, the tokenizer and their configurations. Made by
/// `load_pipeline` (weights.hpp) or, with random weights, by tiny.hpp.
struct StableDiffusion {
  UNet unet{nullptr};                   ///< The denoiser.
  VAE vae{nullptr};                     ///< Image <-> latent autoencoder.
  CLIPTextModel text_encoder{nullptr};  ///< Prompt encoder.
  std::optional<CLIPTokenizer> tokenizer;  ///< Prompt tokenizer (always set by load_pipeline).
  UNetConfig unet_config;               ///< The UNet's configuration.
  VAEConfig vae_config;                 ///< The VAE's configuration (its scaling and shift factors).
  CLIPTextConfig text_config;           ///< The text encoder's configuration.
  /// `scheduler/scheduler_config.json` when the folder has one, else null.
  nlohmann::json scheduler_config;
  /// Where each part came from: "unet", "vae", "text_encoder" (weights files), "tokenizer".
  std::map<std::string, std::filesystem::path> files;
};

namespace detail {

/// The first parameter of `module` (its device and dtype stand for the module's).
inline torch::Tensor first_parameter(const torch::nn::Module& module, const char* what) {
  const auto parameters = module.parameters();
  TORCH_CHECK(!parameters.empty(), "Stable Diffusion: the ", what, " has no parameters");
  return parameters.front();
}

}  // namespace detail

// ---- sizes -------------------------------------------------------------------------------------

/// Pixels per latent cell: 2^(VAE levels − 1) (8 for SD).
inline int64_t vae_scale_factor(const StableDiffusion& sd) {
  return int64_t{1} << (sd.vae_config.block_out_channels.size() - 1);
}

/// The model's native image side: UNet `sample_size` × VAE factor (512 for SD 1.5, 64 for the
/// tiny model); 512 when the configuration does not say.
inline int64_t default_image_size(const StableDiffusion& sd) {
  return sd.unet_config.sample_size > 0 ? sd.unet_config.sample_size * vae_scale_factor(sd) : 512;
}

// ---- text --------------------------------------------------------------------------------------

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

// ---- pixels ------------------------------------------------------------------------------------

/// uint8 [H, W, C] (or a batch [B, H, W, C]) -> float [C, H, W] ([B, C, H, W]) in [-1, 1]:
/// `v / 127.5 - 1`, the VAE's input range.
inline torch::Tensor to_float(const torch::Tensor& image) {
  TORCH_CHECK(image.scalar_type() == torch::kUInt8, "to_float: expected a uint8 image, got ",
              image.scalar_type());
  TORCH_CHECK(image.dim() == 3 || image.dim() == 4,
              "to_float: expected [H, W, C] or [B, H, W, C], got shape ", image.sizes());
  auto chw = image.dim() == 3 ? image.permute({2, 0, 1})      // [H, W, C] -> [C, H, W]
                              : image.permute({0, 3, 1, 2});  // [B, H, W, C] -> [B, C, H, W]
  return chw.to(torch::kFloat32).div(127.5).sub(1.0).contiguous();
}

/// float [C, H, W] (or [B, C, H, W]) in [-1, 1], any floating dtype and device -> uint8
/// [H, W, C] ([B, H, W, C]) on the CPU: values are clamped to [-1, 1], then
/// `round((v + 1) * 127.5)`. Exactly inverts `to_float`.
inline torch::Tensor to_uint8(const torch::Tensor& image) {
  TORCH_CHECK(image.is_floating_point(), "to_uint8: expected a floating-point image, got ",
              image.scalar_type());
  TORCH_CHECK(image.dim() == 3 || image.dim() == 4,
              "to_uint8: expected [C, H, W] or [B, C, H, W], got shape ", image.sizes());
  auto values = image.detach().to(torch::kCPU, torch::kFloat32).clamp(-1.0, 1.0).add(1.0)
                    .mul(127.5).round().to(torch::kUInt8);
  auto hwc = image.dim() == 3 ? values.permute({1, 2, 0})      // [C, H, W] -> [H, W, C]
                              : values.permute({0, 2, 3, 1});  // [B, C, H, W] -> [B, H, W, C]
  return hwc.contiguous();
}

/// A condition uint8 [H, W, 3] (or [B, H, W, 3]) -> float [3, H, W] ([B, 3, H, W]) in [0, 1],
/// the range a CSC-Tuner's hint blocks and a ControlNet read.
inline torch::Tensor condition_to_float(const torch::Tensor& condition) {
  TORCH_CHECK(condition.scalar_type() == torch::kUInt8 &&
                  (condition.dim() == 3 || condition.dim() == 4) && condition.size(-1) == 3,
              "condition_to_float: expected uint8 [H, W, 3] or [B, H, W, 3], got ",
              condition.scalar_type(), " ", condition.sizes());
  auto chw = condition.dim() == 3 ? condition.permute({2, 0, 1})      // [H, W, 3] -> [3, H, W]
                                  : condition.permute({0, 3, 1, 2});  // -> [B, 3, H, W]
  return chw.to(torch::kFloat32).div(255.0).contiguous();
}

/// The inverse of `condition_to_float` (for pictures of conditions): float [3, H, W] or
/// [B, 3, H, W] in [0, 1] -> uint8 [H, W, 3] ([B, H, W, 3]) on the CPU, clamped and rounded.
inline torch::Tensor condition_to_uint8(const torch::Tensor& condition) {
  TORCH_CHECK(condition.is_floating_point() && (condition.dim() == 3 || condition.dim() == 4),
              "condition_to_uint8: expected float [3, H, W] or [B, 3, H, W], got ",
              condition.scalar_type(), " ", condition.sizes());
  auto values = condition.detach().to(torch::kCPU, torch::kFloat32).clamp(0.0, 1.0).mul(255.0)
                    .round().to(torch::kUInt8);
  return (condition.dim() == 3 ? values.permute({1, 2, 0}) : values.permute({0, 2, 3, 1}))
      .contiguous();
}

// ---- latents -----------------------------------------------------------------------------------

/// The latents the UNet sees for a VAE posterior: `(z − shift_factor) · scaling_factor`, with z
/// the posterior mean, or the draw `mean + exp(logvar / 2) · noise` when `noise` (standard
/// normal, shaped like the mean) is given. float32, or float64 for a float64 VAE; no graph.
inline torch::Tensor posterior_latents(const StableDiffusion& sd, const LatentDistribution& posterior,
                                       const torch::Tensor& noise = {}) {
  const auto dtype =
      posterior.mean.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const auto mean = posterior.mean.to(dtype);
  const auto z = noise.defined()
                     ? AutoencoderKLImpl::sample(mean, posterior.logvar.to(dtype),
                                                 noise.to(mean.device(), dtype))
                     : mean;
  return (z - sd.vae_config.shift_factor) * sd.vae_config.scaling_factor;
}

/// The latents of images float [B, 3, H, W] in [-1, 1]: the VAE's posterior mean (diffusers'
/// `retrieve_latents(sample_mode="argmax")`, deterministic), on the VAE's device.
inline torch::Tensor encode_images(StableDiffusion& sd, const torch::Tensor& images) {
  torch::NoGradGuard no_grad;
  const auto reference = detail::first_parameter(*sd.vae, "VAE");
  return posterior_latents(sd, sd.vae->encode(images.to(reference.device(), reference.scalar_type())));
}

/// Images of latents [B, C, h, w]: `vae.decode(latents / scaling_factor + shift_factor)` as
/// uint8 [B, H, W, 3] on the CPU (values clamped to [-1, 1] first). A float16 VAE whose
/// configuration says `force_upcast` (SD's and SDXL's VAEs overflow in float16) decodes in
/// float32 and is put back in float16 afterwards, as diffusers' pipelines do.
inline torch::Tensor decode_latents(StableDiffusion& sd, const torch::Tensor& latents) {
  torch::NoGradGuard no_grad;
  const auto reference = detail::first_parameter(*sd.vae, "VAE");
  const bool upcast = reference.scalar_type() == torch::kHalf && sd.vae_config.force_upcast;
  const auto z = (latents / sd.vae_config.scaling_factor + sd.vae_config.shift_factor)
                     .to(reference.device(), upcast ? torch::kFloat32 : reference.scalar_type());
  if (!upcast) return to_uint8(sd.vae->decode(z));  // [B, 3, H, W] -> [B, H, W, 3]
  sd.vae->to(torch::kFloat32);
  auto images = sd.vae->decode(z);
  sd.vae->to(torch::kHalf);
  return to_uint8(images);
}

}  // namespace sd
