#pragma once
/// @file stable_diffusion.hpp
/// @brief A Stable Diffusion as one value — the UNet, the VAE, the text encoder(s), the
/// tokenizer(s) and their configurations, for SD 1.x, SD 2.x and SDXL alike — and what every user
/// of it needs: prompts to text conditioning (SDXL's pooled embedding and size conditioning
/// included), images to latents and back (the VAE's scaling and shift factors, in one place), and
/// the image sizes the model takes.
///
/// Images reach the models as float [B, 3, H, W] in [-1, 1] (`to_float`) and leave them as uint8
/// [B, H, W, 3] (`to_uint8`); latents are what the UNet sees: `(z − shift) · scaling_factor`.

#include <sd/clip.hpp>
#include <sd/clip_projection.hpp>
#include <sd/config.hpp>
#include <sd/embeddings.hpp>
#include <sd/tokenizer.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace sd {

/// A Stable Diffusion: the models, the tokenizers and their configurations. SD 1.x and 2.x have
/// one text encoder; SDXL has a second one with its own tokenizer (`text_encoder_2`,
/// `tokenizer_2`, set together) and a UNet that takes added conditioning (`is_sdxl`). Made by
/// `load_pipeline` (weights.hpp) or, with random weights, by tiny.hpp.
struct StableDiffusion {
  UNet unet{nullptr};                   ///< The denoiser.
  VAE vae{nullptr};                     ///< Image <-> latent autoencoder.
  CLIPTextModel text_encoder{nullptr};  ///< Prompt encoder (SDXL: CLIP ViT-L).
  std::optional<CLIPTokenizer> tokenizer;  ///< Prompt tokenizer (always set by load_pipeline).
  /// SDXL's second prompt encoder (OpenCLIP ViT-bigG with its projection); empty otherwise.
  CLIPTextModelWithProjection text_encoder_2{nullptr};
  /// SDXL's second tokenizer (it pads with "!" where the first pads with its end token).
  std::optional<CLIPTokenizer> tokenizer_2;
  UNetConfig unet_config;               ///< The UNet's configuration.
  VAEConfig vae_config;                 ///< The VAE's configuration (its scaling and shift factors).
  CLIPTextConfig text_config;           ///< The text encoder's configuration.
  CLIPTextConfig text_config_2;         ///< `text_encoder_2`'s configuration (SDXL only).
  /// `scheduler/scheduler_config.json` when the folder has one, else null.
  nlohmann::json scheduler_config;
  /// Where each part came from: "unet", "vae", "text_encoder", "text_encoder_2" (weights
  /// files), "tokenizer", "tokenizer_2".
  std::map<std::string, std::filesystem::path> files;

  /// Whether this is an SDXL: a second text encoder, and a UNet that reads the pooled prompt
  /// embedding and the size conditioning (`UNetAddedConditions`).
  bool is_sdxl() const { return !text_encoder_2.is_empty(); }

  /// The text encoders that are there (one; SDXL's two), for what is done to each alike.
  std::vector<torch::nn::Module*> text_encoders() const {
    std::vector<torch::nn::Module*> encoders;
    if (!text_encoder.is_empty()) encoders.push_back(text_encoder.ptr().get());
    if (!text_encoder_2.is_empty()) encoders.push_back(text_encoder_2.ptr().get());
    return encoders;
  }

  /// Moves every model (UNet, VAE, text encoders) to `device` in `dtype`.
  void to(const torch::Device& device, torch::Dtype dtype) {
    unet->to(device, dtype);
    vae->to(device, dtype);
    for (auto* encoder : text_encoders()) encoder->to(device, dtype);
  }
};

/// A batch of prompts as the UNet reads them.
struct TextConditioning {
  /// [B, 77, D]: the UNet's `encoder_hidden_states`.
  torch::Tensor context;
  /// [B, P]: SDXL's pooled embedding (`text_embeds`, P = 1280); undefined for SD 1.x and 2.x.
  torch::Tensor pooled;

  /// The rows `start` to `end` of both.
  TextConditioning slice(int64_t start, int64_t end) const {
    return {context.slice(0, start, end), pooled.defined() ? pooled.slice(0, start, end) : pooled};
  }
  /// Both on `device` in `dtype`.
  TextConditioning to(torch::Device device, torch::Dtype dtype) const {
    return {context.to(device, dtype), pooled.defined() ? pooled.to(device, dtype) : pooled};
  }
};

/// SDXL's size conditioning of one image, in pixels (diffusers' `original_size`,
/// `crops_coords_top_left`, `target_size`): the size of the image the model should take it to
/// have come from, where the crop that made it began, and the size made. Training records what
/// the dataset did to each image; generation asks for an uncropped image of the size it makes.
struct SizeConditioning {
  int64_t original_height = 0;  ///< Height of the source image.
  int64_t original_width = 0;   ///< Width of the source image.
  int64_t crop_top = 0;         ///< Top of the crop taken from it (after resizing).
  int64_t crop_left = 0;        ///< Left of the crop taken from it (after resizing).
  int64_t target_height = 0;    ///< Height of the image made.
  int64_t target_width = 0;     ///< Width of the image made.

  /// An uncropped `height` × `width` image from a source of the same size.
  static SizeConditioning uncropped(int64_t height, int64_t width) {
    return {height, width, 0, 0, height, width};
  }
  /// The six time ids in the UNet's order: float32 [6].
  torch::Tensor time_ids() const {
    for (int64_t v : {original_height, original_width, target_height, target_width}) {
      TORCH_CHECK(v > 0, "size conditioning: sizes must be positive, got original ",
                  original_height, "x", original_width, ", target ", target_height, "x", target_width);
    }
    TORCH_CHECK(crop_top >= 0 && crop_left >= 0, "size conditioning: the crop must start at or "
                "after the top left, got (", crop_top, ", ", crop_left, ")");
    return torch::tensor({original_height, original_width, crop_top, crop_left, target_height,
                          target_width}, torch::kFloat32);
  }
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

/// The token ids of `prompts` for `sd`'s text encoder(s), on the text encoder's device: int64
/// [B, 77], or for SDXL [B, 2, 77] (the first tokenizer's ids, then the second's).
inline torch::Tensor tokenize_prompts(const StableDiffusion& sd, const std::vector<std::string>& prompts) {
  TORCH_CHECK(sd.tokenizer.has_value(), "tokenize_prompts: the pipeline has no tokenizer");
  TORCH_CHECK(!sd.text_encoder.is_empty(), "tokenize_prompts: the pipeline has no text encoder");
  TORCH_CHECK(!prompts.empty(), "tokenize_prompts: no prompts");
  const auto device = detail::first_parameter(*sd.text_encoder, "text encoder").device();
  // A tokenizer of another model would index past the token embedding: said here, on the host.
  const auto tokenize = [&](const CLIPTokenizer& tokenizer, const CLIPTextConfig& config, const char* encoder) {
    auto ids = tokenizer(prompts);
    const int64_t largest = ids.max().item<int64_t>();
    TORCH_CHECK(largest < config.vocab_size, "the tokenizer gives token id ", largest, ", past the ",
                encoder, "'s vocabulary of ", config.vocab_size, " (its vocab_size): is the tokenizer "
                "another model's?");
    return ids;
  };
  if (!sd.is_sdxl()) return tokenize(*sd.tokenizer, sd.text_config, "text encoder").to(device);  // [B, 77]
  TORCH_CHECK(sd.tokenizer_2.has_value(), "tokenize_prompts: the SDXL pipeline has no second tokenizer");
  return torch::stack({tokenize(*sd.tokenizer, sd.text_config, "first text encoder"),
                       tokenize(*sd.tokenizer_2, sd.text_config_2, "second text encoder")}, 1)
      .to(device);  // [B, 2, 77]
}

/// The conditioning of token ids from `tokenize_prompts`, with the graph of whatever in the
/// text encoders trains: SD 1.x and 2.x, the text encoder's last hidden state (after its final
/// LayerNorm); SDXL, both encoders' penultimate layers side by side and the second's pooled
/// projection (`sdxl_text_conditioning`).
inline TextConditioning encode_tokens(StableDiffusion& sd, const torch::Tensor& ids) {
  if (!sd.is_sdxl()) {
    TORCH_CHECK(ids.dim() == 2, "encode_tokens: expected token ids [B, L], got ", ids.sizes());
    return {sd.text_encoder->forward(ids).last_hidden_state, {}};  // [B, 77, D]
  }
  TORCH_CHECK(ids.dim() == 3 && ids.size(1) == 2,
              "encode_tokens: SDXL takes the ids of both tokenizers [B, 2, L], got ", ids.sizes());
  auto text = sdxl_text_conditioning(*sd.text_encoder, *sd.text_encoder_2, ids.select(1, 0),
                                     ids.select(1, 1));
  return {std::move(text.context), std::move(text.text_embeds)};  // [B, 77, D1 + D2], [B, P]
}

/// The conditioning of `prompts` (`tokenize_prompts`, then `encode_tokens`), on the text
/// encoder's device and in its dtype, without a graph.
inline TextConditioning encode_text(StableDiffusion& sd, const std::vector<std::string>& prompts) {
  torch::NoGradGuard no_grad;
  return encode_tokens(sd, tokenize_prompts(sd, prompts));
}

/// The context alone of `encode_text` ([B, 77, D]): all an SD 1.x or 2.x UNet reads.
inline torch::Tensor encode_prompts(StableDiffusion& sd, const std::vector<std::string>& prompts) {
  return encode_text(sd, prompts).context;
}

/// The time ids of a batch of `batch` rows: one size conditioning for all of them or one per row,
/// float32 [batch, 6] on the CPU.
inline torch::Tensor size_time_ids(const std::vector<SizeConditioning>& sizes, int64_t batch) {
  TORCH_CHECK(sizes.size() == 1 || static_cast<int64_t>(sizes.size()) == batch, "size conditioning: ",
              sizes.size(), " size conditionings for a batch of ", batch);
  std::vector<torch::Tensor> rows;
  for (const auto& size : sizes) rows.push_back(size.time_ids());
  return torch::stack(rows).expand({batch, -1}).contiguous();  // [1 or B, 6] -> [B, 6]
}

/// What an SDXL UNet reads beside the context: `pooled` [B, P] and one size conditioning for the
/// whole batch or one per row, as time ids [B, 6] on `pooled`'s device and in its dtype. Empty
/// (nothing to add) for a UNet without added conditioning, whatever is given.
inline UNetAddedConditions added_conditions(const StableDiffusion& sd, const torch::Tensor& pooled,
                                            const std::vector<SizeConditioning>& sizes) {
  if (!sd.unet_config.has_text_time()) return {};
  TORCH_CHECK(pooled.defined() && pooled.dim() == 2, "added_conditions: the UNet reads a pooled "
              "text embedding [B, P] (SDXL's second text encoder), got ",
              pooled.defined() ? pooled.sizes() : torch::IntArrayRef{});
  return {pooled, size_time_ids(sizes, pooled.size(0)).to(pooled.device(), pooled.scalar_type())};
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

/// Whether a float16 VAE of `sd` runs in float32 from the start, as diffusers' pipelines decide:
/// SDXL's upcast a VAE whose configuration says `force_upcast` (SDXL's VAE overflows in float16
/// on most images); SD 1.x's and 2.x's run it in float16 (`StableDiffusionPipeline` decodes in the
/// VAE's dtype), where `detail::run_vae` redoes a pass that overflows.
inline bool upcasts_float16_vae(const StableDiffusion& sd) {
  return sd.is_sdxl() && sd.vae_config.force_upcast;
}

namespace detail {

/// `pass(dtype)` — one VAE pass, its input cast to `dtype` — in the precision the VAE runs at: its
/// own dtype, except that a float16 VAE runs in float32 where `upcasts_float16_vae` says so, and
/// again in float32 when its float16 result is not finite (float16 ends at 65504, which SD's VAE
/// can pass on some latents; the float32 pass costs a second decode only then). The VAE is back in
/// float16 afterwards, also when the float32 pass throws.
template <typename Pass>
torch::Tensor run_vae(StableDiffusion& sd, const Pass& pass) {
  const auto dtype = first_parameter(*sd.vae, "VAE").scalar_type();
  if (dtype != torch::kHalf) return pass(dtype);
  if (!upcasts_float16_vae(sd)) {
    const torch::Tensor result = pass(torch::kHalf);
    if (torch::isfinite(result).all().item<bool>()) return result;
    std::cerr << "note: the float16 VAE overflowed (a value past float16's 65504); this pass runs "
                 "again in float32\n";
  }
  sd.vae->to(torch::kFloat32);
  try {
    torch::Tensor result = pass(torch::kFloat32);
    sd.vae->to(torch::kHalf);
    return result;
  } catch (...) {
    sd.vae->to(torch::kHalf);  // as it was, for a caller that goes on (after running out of memory, say)
    throw;
  }
}

}  // namespace detail

/// The VAE's posterior of images float [B, 3, H, W] in [-1, 1], on the VAE's device, in the
/// precision `detail::run_vae` chooses: a training batch's encode, which samples from it
/// (`posterior_latents` with noise). SDXL's float16 VAE thus encodes in float32, as diffusers'
/// SDXL training script holds its VAE.
inline LatentDistribution encode_posterior(StableDiffusion& sd, const torch::Tensor& images) {
  torch::NoGradGuard no_grad;
  const auto device = detail::first_parameter(*sd.vae, "VAE").device();
  // Mean and log-variance in one tensor, so that one finite check sees both.
  const auto moments = detail::run_vae(sd, [&](torch::Dtype dtype) {
    const auto posterior = sd.vae->encode(images.to(device, dtype));
    return torch::cat({posterior.mean, posterior.logvar}, 1);
  });
  const auto halves = moments.chunk(2, 1);
  return {halves[0], halves[1]};
}

/// The latents of images float [B, 3, H, W] in [-1, 1]: the VAE's posterior mean (diffusers'
/// `retrieve_latents(sample_mode="argmax")`, deterministic), float32 on the VAE's device.
inline torch::Tensor encode_images(StableDiffusion& sd, const torch::Tensor& images) {
  return posterior_latents(sd, encode_posterior(sd, images));
}

/// Images of latents [B, C, h, w]: `vae.decode(latents / scaling_factor + shift_factor)` as
/// uint8 [B, H, W, 3] on the CPU (values clamped to [-1, 1] first; `detail::run_vae` says in
/// which precision the VAE decodes).
inline torch::Tensor decode_latents(StableDiffusion& sd, const torch::Tensor& latents) {
  torch::NoGradGuard no_grad;
  const auto device = detail::first_parameter(*sd.vae, "VAE").device();
  const auto z = latents / sd.vae_config.scaling_factor + sd.vae_config.shift_factor;
  return to_uint8(detail::run_vae(sd, [&](torch::Dtype dtype) {
    return sd.vae->decode(z.to(device, dtype));  // [B, 3, H, W]
  }));  // -> [B, H, W, 3]
}

}  // namespace sd
