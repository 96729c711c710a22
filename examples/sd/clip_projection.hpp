#pragma once
/// @file clip_projection.hpp
/// @brief SDXL's text conditioning: transformers' `CLIPTextModelWithProjection` (the second text
/// encoder, OpenCLIP bigG, whose projected pooled state is the UNet's `text_embeds`) and the
/// two-encoder prompt encoding of diffusers' `StableDiffusionXLPipeline.encode_prompt`.
///
/// Keys are transformers': `text_model.*` (a `CLIPTextModel`, clip.hpp) and
/// `text_projection.weight` [projection_dim, hidden_size] (a Linear without bias).
///
/// Example:
/// @code
/// sd::CLIPTextModel text_encoder(sd::CLIPTextConfig::from_json(config_1));
/// sd::CLIPTextModelWithProjection text_encoder_2(sd::CLIPTextConfig::from_json(config_2));
/// sd::load_clip_text_weights(*text_encoder, "text_encoder/model.safetensors");
/// sd::load_clip_text_with_projection_weights(*text_encoder_2, "text_encoder_2/model.safetensors");
/// auto text = sd::sdxl_text_conditioning(*text_encoder, *text_encoder_2, ids_1, ids_2);
/// auto eps = unet(latents, t, text.context, sd::UNetAddedConditions{text.text_embeds, time_ids});
/// @endcode

#include <sd/clip.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// What `CLIPTextModelWithProjection` returns.
struct CLIPTextWithProjectionOutput {
  /// [B, projection_dim]: text_projection of the final-normed state at each row's eos.
  torch::Tensor text_embeds;
  /// [B, L, D] after final_layer_norm.
  torch::Tensor last_hidden_state;
  /// As `CLIPTextOutput::hidden_states` (empty unless asked for).
  std::vector<torch::Tensor> hidden_states;
};

/// transformers' `CLIPTextModelWithProjection`: a `CLIPTextModel` (`text_model`) and a Linear
/// without bias (`text_projection`, hidden_size -> projection_dim) of its pooled state.
class CLIPTextModelWithProjectionImpl
    : public torch::nn::Cloneable<CLIPTextModelWithProjectionImpl> {
 public:
  /// Builds the model of `config` (validated; `projection_dim` must be positive).
  explicit CLIPTextModelWithProjectionImpl(CLIPTextConfig config) : config_(std::move(config)) {
    config_.validate();
    TORCH_CHECK(config_.projection_dim > 0,
                "CLIPTextModelWithProjection: projection_dim must be positive, got ",
                config_.projection_dim);
    reset();
  }

  /// Registers text_model and text_projection.
  void reset() override {
    text_model = register_module("text_model", CLIPTextModel(config_));
    text_projection = register_module(
        "text_projection",
        torch::nn::Linear(
            torch::nn::LinearOptions(config_.hidden_size, config_.projection_dim).bias(false)));
  }

  /// ids [B, L] -> text_embeds [B, projection_dim], last_hidden_state [B, L, D] and, with
  /// `output_hidden_states`, every layer's output (arguments as `CLIPTextModel::forward`).
  CLIPTextWithProjectionOutput forward(const torch::Tensor& input_ids,
                                       bool output_hidden_states = false) {
    CLIPTextOutput out = text_model->forward(input_ids, /*clip_skip=*/0, output_hidden_states);
    return {text_projection(out.pooled), std::move(out.last_hidden_state),
            std::move(out.hidden_states)};  // [B, D] -> [B, projection_dim]
  }

  /// Prints `sd::CLIPTextModelWithProjection(layers=…, hidden_size=…, projection_dim=…)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::CLIPTextModelWithProjection(layers=" << config_.num_hidden_layers
           << ", hidden_size=" << config_.hidden_size
           << ", projection_dim=" << config_.projection_dim << ", act=" << config_.hidden_act
           << ")";
  }

  /// The configuration the model was built with.
  const CLIPTextConfig& config() const { return config_; }

  CLIPTextModel text_model{nullptr};           ///< The text transformer.
  torch::nn::Linear text_projection{nullptr};  ///< hidden_size -> projection_dim, no bias.

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPTextModelWithProjectionImpl.
TORCH_MODULE(CLIPTextModelWithProjection);

/// Loads a transformers `CLIPTextModelWithProjection` safetensors file (SDXL's
/// `text_encoder_2/model.safetensors`) into `model`, strictly, converting to the model's dtype.
/// Text-model keys without the `text_model.` prefix are accepted too; `position_ids` is dropped.
inline scedit::LoadReport load_clip_text_with_projection_weights(
    CLIPTextModelWithProjectionImpl& model, const std::string& path) {
  scedit::LoadOptions options;
  options.source = path;
  options.rename = [](const std::string& key) -> std::string {
    static const std::string kPrefix = "text_model.", kProjection = "text_projection.";
    if (key.rfind(kProjection, 0) == 0) return key;
    std::string k = key.rfind(kPrefix, 0) == 0 ? key : kPrefix + key;
    if (k == kPrefix + "embeddings.position_ids") return "";
    return k;
  };
  return scedit::load_state_dict(model, scedit::safetensors::load(path), options);
}

/// SDXL's prompt encoding: the UNet's context and its pooled `text_embeds`.
struct SDXLTextConditioning {
  /// [B, L, D1 + D2]: cat(text_encoder's, text_encoder_2's hidden_states[-2 - clip_skip]).
  torch::Tensor context;
  /// [B, projection_dim] of text_encoder_2.
  torch::Tensor text_embeds;
};

/// Encodes a prompt as diffusers' `StableDiffusionXLPipeline.encode_prompt` does: each encoder's
/// output of layer `num_hidden_layers - 1 - clip_skip` (the penultimate when clip_skip is 0),
/// WITHOUT final_layer_norm, concatenated on the last axis (text_encoder first), and
/// text_encoder_2's `text_embeds`. `ids_1` are the first tokenizer's ids (padded with eos),
/// `ids_2` the second's (padded with 0), both [B, L].
inline SDXLTextConditioning sdxl_text_conditioning(CLIPTextModelImpl& text_encoder,
                                                   CLIPTextModelWithProjectionImpl& text_encoder_2,
                                                   const torch::Tensor& ids_1,
                                                   const torch::Tensor& ids_2,
                                                   int64_t clip_skip = 0) {
  TORCH_CHECK(ids_1.dim() == 2 && ids_2.dim() == 2 && ids_1.size(0) == ids_2.size(0) &&
                  ids_1.size(1) == ids_2.size(1),
              "sdxl_text_conditioning: the two tokenizations must both be [B, L], got ",
              ids_1.sizes(), " and ", ids_2.sizes());
  const int64_t layers_1 = text_encoder.config().num_hidden_layers;
  const int64_t layers_2 = text_encoder_2.config().num_hidden_layers;
  TORCH_CHECK(clip_skip >= 0 && clip_skip < std::min(layers_1, layers_2),
              "sdxl_text_conditioning: clip_skip must be in [0, ",
              std::min(layers_1, layers_2) - 1, "], got ", clip_skip);
  auto out_1 = text_encoder.forward(ids_1, /*clip_skip=*/0, /*output_hidden_states=*/true);
  auto out_2 = text_encoder_2.forward(ids_2, /*output_hidden_states=*/true);
  // hidden_states has layers + 1 entries: [-2 - clip_skip] is entry layers - 1 - clip_skip.
  const auto& h_1 = out_1.hidden_states.at(layers_1 - 1 - clip_skip);
  const auto& h_2 = out_2.hidden_states.at(layers_2 - 1 - clip_skip);
  return {torch::cat({h_1, h_2.to(h_1.scalar_type())}, -1),  // [B, L, D1] + [B, L, D2]
          std::move(out_2.text_embeds)};
}

}  // namespace sd
