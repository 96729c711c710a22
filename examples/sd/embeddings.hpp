#pragma once
/// @file embeddings.hpp
/// @brief The UNet's conditioning embeddings: the sinusoidal timestep features, the
/// `TimestepEmbedding` MLP, and SDXL's added "text_time" conditioning (`UNetAddedConditions`:
/// a pooled text embedding and six size / crop ids).
///
/// Reference: diffusers `models/embeddings.py` (`get_timestep_embedding`, `Timesteps`,
/// `TimestepEmbedding`) and `models/unets/unet_2d_condition.py` (`get_aug_embed`).

#include <torch/torch.h>

#include <cmath>
#include <utility>

namespace sd {

namespace functional {

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`: a float32 computation
/// whatever the model's dtype (the caller casts afterwards, as diffusers does; computing it in
/// float64 would not reproduce diffusers' float64 outputs).
///
/// The float32 values of exp, sin and cos are taken correctly rounded (evaluated in float64,
/// then rounded): the same on every platform and device. diffusers gets them from float32 libm
/// code (MKL, Sleef or CUDA, depending on the build), which agrees with these within one ulp.
/// timesteps [B] (any numeric dtype) -> [B, dim] float32.
inline torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim,
                                        bool flip_sin_to_cos, double downscale_freq_shift,
                                        double max_period = 10000.0) {
  const auto f32 = torch::kFloat32, f64 = torch::kFloat64;
  const int64_t half = dim / 2;
  auto exponent = torch::arange(half, timesteps.options().dtype(f32)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);  // float32, as diffusers
  auto freqs = exponent.to(f64).exp().to(f32);
  auto args = timesteps.to(f32).unsqueeze(1) * freqs.unsqueeze(0);  // [B] x [half] -> [B, half]
  auto sin = args.to(f64).sin().to(f32), cos = args.to(f64).cos().to(f32);
  auto emb = flip_sin_to_cos ? torch::cat({cos, sin}, -1) : torch::cat({sin, cos}, -1);  // [B, 2·half]
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1}, 0);
  return emb;
}

}  // namespace functional

/// Options of a `TimestepEmbedding`.
struct TimestepEmbeddingOptions {
  /// Example: `TimestepEmbeddingOptions(320, 1280)`.
  TimestepEmbeddingOptions(int64_t in_channels, int64_t time_embed_dim)
      : in_channels_(in_channels), time_embed_dim_(time_embed_dim) {}
  /// Width of the sinusoidal embedding.
  TORCH_ARG(int64_t, in_channels);
  /// Width of the time embedding.
  TORCH_ARG(int64_t, time_embed_dim);
};

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
class TimestepEmbeddingImpl : public torch::nn::Cloneable<TimestepEmbeddingImpl> {
 public:
  /// Builds the two linears.
  explicit TimestepEmbeddingImpl(TimestepEmbeddingOptions options) : options(std::move(options)) {
    reset();
  }

  /// Registers linear_1 and linear_2.
  void reset() override {
    linear_1 = register_module("linear_1",
                               torch::nn::Linear(options.in_channels(), options.time_embed_dim()));
    linear_2 = register_module(
        "linear_2", torch::nn::Linear(options.time_embed_dim(), options.time_embed_dim()));
  }

  /// [B, in_channels] -> [B, time_embed_dim].
  torch::Tensor forward(const torch::Tensor& x) { return linear_2(torch::silu(linear_1(x))); }

  /// The options it was built with.
  TimestepEmbeddingOptions options;
  /// First linear.
  torch::nn::Linear linear_1{nullptr};
  /// Second linear.
  torch::nn::Linear linear_2{nullptr};
};

/// Holder of `TimestepEmbeddingImpl`.
TORCH_MODULE(TimestepEmbedding);

/// SDXL's added conditioning (diffusers' `added_cond_kwargs` for `addition_embed_type`
/// "text_time"), passed to `UNet2DConditionModel::forward` / `encode` next to the text context.
///
/// Example:
/// @code
/// // (original h, w, crop top, left, target h, w) in pixels, as StableDiffusionXLPipeline
/// auto time_ids = torch::tensor({1024., 1024., 0., 0., 1024., 1024.}).repeat({batch, 1});
/// auto v = unet(latents, t, context, sd::UNetAddedConditions{pooled, time_ids});
/// @endcode
struct UNetAddedConditions {
  /// The pooled text embedding [B, D] (SDXL: text_encoder_2's `text_embeds`, D = 1280).
  torch::Tensor text_embeds;
  /// [B, 6]: original_h, original_w, crop_top, crop_left, target_h, target_w, in this order.
  torch::Tensor time_ids;

  /// Whether any part is given.
  bool defined() const { return text_embeds.defined() || time_ids.defined(); }
};

namespace functional {

/// The sinusoidal features of SDXL's time ids (diffusers' `add_time_proj` on
/// `time_ids.flatten()`): each of the ids gets its own `timestep_embedding` of `dim` values
/// ([cos, sin] when `flip_sin_to_cos`), concatenated in the ids' order: time_ids [B, N] ->
/// [B, N·dim] float32.
inline torch::Tensor time_ids_embedding(const torch::Tensor& time_ids, int64_t dim,
                                        bool flip_sin_to_cos, double downscale_freq_shift) {
  TORCH_CHECK(time_ids.dim() == 2, "time_ids_embedding: expected time_ids [B, N], got shape ",
              time_ids.sizes());
  auto features = timestep_embedding(time_ids.flatten(), dim, flip_sin_to_cos,
                                     downscale_freq_shift);  // [B·N, dim]
  return features.reshape({time_ids.size(0), -1});           // [B·N, dim] -> [B, N·dim]
}

}  // namespace functional

}  // namespace sd
