#pragma once
/// @file clip.hpp
/// @brief The CLIP text encoder of Stable Diffusion 1.x / 2.x and SDXL's first one
/// (transformers `CLIPTextModel`; SDXL's second one, with its projection, is in
/// clip_projection.hpp).
///
/// Layout and key names follow transformers' `modeling_clip.py` without the `text_model.`
/// prefix: `embeddings.{token,position}_embedding`, `encoder.layers.{i}.{self_attn.{q,k,v,out}
/// _proj, layer_norm1, mlp.fc{1,2}, layer_norm2}`, `final_layer_norm`. Each layer is pre-LN:
/// `x + attn(ln1(x))` (causal), then `x + mlp(ln2(x))`; `pooled` is the final hidden state at
/// the end-of-text position. `hidden_states` (on request) are the embeddings and every layer's
/// output, before the final LayerNorm: SDXL's context is the last but one of them.
///
/// Example:
/// @code
/// sd::CLIPTextModel text_encoder(sd::CLIPTextConfig::sd15());
/// sd::load_clip_text_weights(*text_encoder, "text_encoder/model.safetensors");
/// sd::CLIPTextOutput out = text_encoder->forward(tokenizer({"a photo of a cat"}));
/// torch::Tensor context = out.last_hidden_state;  // [1, 77, 768]
/// @endcode

#include <scedit/compat.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// Hyper-parameters of a CLIP text encoder; defaults are transformers' `CLIPTextConfig`
/// defaults (CLIP ViT-B/32), `sd15()` gives SD 1.5's CLIP ViT-L/14.
struct CLIPTextConfig {
  int64_t vocab_size = 49408;              ///< Token embedding rows.
  int64_t hidden_size = 512;               ///< Width D; 768 for SD 1.x, 1024 for SD 2.x.
  int64_t intermediate_size = 2048;        ///< MLP width; 3072 for SD 1.x.
  int64_t num_hidden_layers = 12;          ///< Encoder layers; 12 for SD 1.x, 23 used of 24 in SD 2.x.
  int64_t num_attention_heads = 8;         ///< Heads; 12 for SD 1.x.
  int64_t max_position_embeddings = 77;    ///< Position embedding rows (the sequence length).
  std::string hidden_act = "quick_gelu";   ///< "quick_gelu" (x·σ(1.702x)) or "gelu" (erf).
  double layer_norm_eps = 1e-5;            ///< LayerNorm epsilon.
  int64_t bos_token_id = 49406;            ///< Start-of-text id (0 in SD 1.5's config.json).
  int64_t eos_token_id = 49407;            ///< End-of-text id; 2 selects the legacy argmax pooling.
  int64_t pad_token_id = 1;                ///< Padding id (unused by the forward pass).
  int64_t projection_dim = 512;            ///< Width of CLIPTextModelWithProjection's output.

  /// SD 1.5's `text_encoder/config.json` (CLIP ViT-L/14 text tower; bos 0, eos 2, pad 1 as in
  /// that file, so pooling takes the argmax of the ids, i.e. the first `<|endoftext|>`).
  static CLIPTextConfig sd15() {
    CLIPTextConfig c;
    c.hidden_size = 768;
    c.intermediate_size = 3072;
    c.num_attention_heads = 12;
    c.projection_dim = 768;
    c.bos_token_id = 0;
    c.eos_token_id = 2;
    c.pad_token_id = 1;
    return c;
  }

  /// SD 2.x's `text_encoder/config.json`: OpenCLIP ViT-H's text tower with exact GELU, 23 of its
  /// 24 layers (the pipeline's context is the final-normed output of the 23rd).
  static CLIPTextConfig sd21() {
    CLIPTextConfig c = sd15();
    c.hidden_size = 1024;
    c.intermediate_size = 4096;
    c.num_hidden_layers = 23;
    c.num_attention_heads = 16;
    c.hidden_act = "gelu";
    c.projection_dim = 512;
    return c;
  }

  /// SDXL's `text_encoder_2/config.json`: OpenCLIP bigG's text tower with exact GELU, a
  /// `CLIPTextModelWithProjection` (clip_projection.hpp). SDXL's first encoder is `sd15()`'s.
  static CLIPTextConfig sdxl_2() {
    CLIPTextConfig c = sd15();
    c.hidden_size = 1280;
    c.intermediate_size = 5120;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 20;
    c.hidden_act = "gelu";
    c.projection_dim = 1280;
    return c;
  }

  /// Reads transformers' config.json keys (a CLIPModel config's `text_config` object is used
  /// when present); missing keys keep the transformers defaults. Throws on a key of the wrong
  /// type or an invalid configuration.
  static CLIPTextConfig from_json(const nlohmann::json& json) {
    const nlohmann::json& j = json.contains("text_config") && json["text_config"].is_object()
                                  ? json["text_config"]
                                  : json;
    TORCH_CHECK(j.is_object(), "CLIPTextConfig::from_json: expected a JSON object, got ", j.dump());
    CLIPTextConfig c;
    auto read = [&j](const char* key, auto& field) {
      if (!j.contains(key) || j[key].is_null()) return;
      try {
        field = j[key].get<std::decay_t<decltype(field)>>();
      } catch (const nlohmann::json::exception&) {
        TORCH_CHECK(false, "CLIPTextConfig::from_json: key '", key, "' has the wrong type: ",
                    j[key].dump());
      }
    };
    read("vocab_size", c.vocab_size);
    read("hidden_size", c.hidden_size);
    read("intermediate_size", c.intermediate_size);
    read("num_hidden_layers", c.num_hidden_layers);
    read("num_attention_heads", c.num_attention_heads);
    read("max_position_embeddings", c.max_position_embeddings);
    read("hidden_act", c.hidden_act);
    read("layer_norm_eps", c.layer_norm_eps);
    read("bos_token_id", c.bos_token_id);
    read("eos_token_id", c.eos_token_id);
    read("pad_token_id", c.pad_token_id);
    read("projection_dim", c.projection_dim);
    c.validate();
    return c;
  }

  /// The configuration as transformers' config.json keys (every field written out).
  nlohmann::json to_json() const {
    return {{"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"max_position_embeddings", max_position_embeddings},
            {"hidden_act", hidden_act},
            {"layer_norm_eps", layer_norm_eps},
            {"bos_token_id", bos_token_id},
            {"eos_token_id", eos_token_id},
            {"pad_token_id", pad_token_id},
            {"projection_dim", projection_dim}};
  }

  /// Throws naming the field when a size is not positive, the width does not split into the
  /// heads, or the activation is unknown.
  void validate() const {
    TORCH_CHECK(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0 &&
                    num_hidden_layers > 0 && num_attention_heads > 0 && max_position_embeddings > 0,
                "CLIPTextConfig: sizes must be positive (vocab_size ", vocab_size, ", hidden_size ",
                hidden_size, ", intermediate_size ", intermediate_size, ", num_hidden_layers ",
                num_hidden_layers, ", num_attention_heads ", num_attention_heads,
                ", max_position_embeddings ", max_position_embeddings, ")");
    TORCH_CHECK(hidden_size % num_attention_heads == 0, "CLIPTextConfig: hidden_size ",
                hidden_size, " is not divisible by num_attention_heads ", num_attention_heads);
    TORCH_CHECK(hidden_act == "quick_gelu" || hidden_act == "gelu",
                "CLIPTextConfig: hidden_act must be \"quick_gelu\" or \"gelu\", got \"", hidden_act,
                "\"");
    TORCH_CHECK(layer_norm_eps > 0, "CLIPTextConfig: layer_norm_eps must be > 0, got ",
                layer_norm_eps);
  }
};

namespace functional {

/// QuickGELU `x·σ(1.702x)` (transformers `QuickGELUActivation`, OpenAI CLIP).
inline torch::Tensor quick_gelu(const torch::Tensor& x) { return x * torch::sigmoid(1.702 * x); }

/// The activation named by `CLIPTextConfig::hidden_act`.
inline torch::Tensor clip_activation(const torch::Tensor& x, const std::string& name) {
  if (name == "quick_gelu") return quick_gelu(x);
  TORCH_CHECK(name == "gelu", "clip_activation: unknown hidden_act \"", name, "\"");
  return torch::gelu(x);  // exact (erf) GELU
}

}  // namespace functional

/// Multi-head causal self-attention (transformers `CLIPAttention`).
class CLIPAttentionImpl : public torch::nn::Cloneable<CLIPAttentionImpl> {
 public:
  /// Builds the four D×D projections of `config`.
  explicit CLIPAttentionImpl(CLIPTextConfig config) : config_(std::move(config)) { reset(); }

  /// Registers q_proj, k_proj, v_proj, out_proj.
  void reset() override {
    const int64_t d = config_.hidden_size;
    q_proj = register_module("q_proj", torch::nn::Linear(d, d));
    k_proj = register_module("k_proj", torch::nn::Linear(d, d));
    v_proj = register_module("v_proj", torch::nn::Linear(d, d));
    out_proj = register_module("out_proj", torch::nn::Linear(d, d));
  }

  /// [B, L, D] -> [B, L, D]; each position attends to itself and earlier ones.
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), l = x.size(1), h = config_.num_attention_heads;
    const int64_t dh = config_.hidden_size / h;
    auto heads = [&](const torch::Tensor& t) {
      return t.view({b, l, h, dh}).transpose(1, 2);  // [B, L, D] -> [B, H, L, Dh]
    };
    torch::Tensor out = scedit::compat::scaled_dot_product_attention(
        heads(q_proj(x)), heads(k_proj(x)), heads(v_proj(x)), {}, /*is_causal=*/true);
    out = out.transpose(1, 2).reshape({b, l, config_.hidden_size});  // [B, H, L, Dh] -> [B, L, D]
    return out_proj(out);
  }

  /// Prints `CLIPAttention(hidden_size=…, heads=…)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::CLIPAttention(hidden_size=" << config_.hidden_size
           << ", heads=" << config_.num_attention_heads << ")";
  }

  torch::nn::Linear q_proj{nullptr};    ///< Query projection.
  torch::nn::Linear k_proj{nullptr};    ///< Key projection.
  torch::nn::Linear v_proj{nullptr};    ///< Value projection.
  torch::nn::Linear out_proj{nullptr};  ///< Output projection.

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPAttentionImpl.
TORCH_MODULE(CLIPAttention);

/// Two-layer MLP `fc2(act(fc1(x)))` (transformers `CLIPMLP`).
class CLIPMLPImpl : public torch::nn::Cloneable<CLIPMLPImpl> {
 public:
  /// Builds fc1 (D -> intermediate) and fc2 (intermediate -> D).
  explicit CLIPMLPImpl(CLIPTextConfig config) : config_(std::move(config)) { reset(); }

  /// Registers fc1, fc2.
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(config_.hidden_size, config_.intermediate_size));
    fc2 = register_module("fc2", torch::nn::Linear(config_.intermediate_size, config_.hidden_size));
  }

  /// [B, L, D] -> [B, L, D].
  torch::Tensor forward(const torch::Tensor& x) {
    return fc2(functional::clip_activation(fc1(x), config_.hidden_act));  // via [B, L, I]
  }

  /// Prints `CLIPMLP(hidden_size=…, intermediate_size=…, act=…)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::CLIPMLP(hidden_size=" << config_.hidden_size
           << ", intermediate_size=" << config_.intermediate_size << ", act=" << config_.hidden_act
           << ")";
  }

  torch::nn::Linear fc1{nullptr};  ///< D -> intermediate.
  torch::nn::Linear fc2{nullptr};  ///< intermediate -> D.

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPMLPImpl.
TORCH_MODULE(CLIPMLP);

/// One pre-LN transformer layer (transformers `CLIPEncoderLayer`).
class CLIPEncoderLayerImpl : public torch::nn::Cloneable<CLIPEncoderLayerImpl> {
 public:
  /// Builds the layer of `config`.
  explicit CLIPEncoderLayerImpl(CLIPTextConfig config) : config_(std::move(config)) { reset(); }

  /// Registers self_attn, layer_norm1, mlp, layer_norm2.
  void reset() override {
    auto norm = [this] {
      return torch::nn::LayerNorm(
          torch::nn::LayerNormOptions({config_.hidden_size}).eps(config_.layer_norm_eps));
    };
    self_attn = register_module("self_attn", CLIPAttention(config_));
    layer_norm1 = register_module("layer_norm1", norm());
    mlp = register_module("mlp", CLIPMLP(config_));
    layer_norm2 = register_module("layer_norm2", norm());
  }

  /// [B, L, D] -> [B, L, D]: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = x + self_attn(layer_norm1(x));
    return h + mlp(layer_norm2(h));
  }

  CLIPAttention self_attn{nullptr};          ///< Causal self-attention.
  torch::nn::LayerNorm layer_norm1{nullptr};  ///< Norm before attention.
  CLIPMLP mlp{nullptr};                       ///< Feed-forward block.
  torch::nn::LayerNorm layer_norm2{nullptr};  ///< Norm before the MLP.

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPEncoderLayerImpl.
TORCH_MODULE(CLIPEncoderLayer);

/// Token + learned position embeddings (transformers `CLIPTextEmbeddings`; its `position_ids`
/// buffer is not persistent, so it is computed instead of stored).
class CLIPTextEmbeddingsImpl : public torch::nn::Cloneable<CLIPTextEmbeddingsImpl> {
 public:
  /// Builds the two tables of `config`.
  explicit CLIPTextEmbeddingsImpl(CLIPTextConfig config) : config_(std::move(config)) { reset(); }

  /// Registers token_embedding, position_embedding.
  void reset() override {
    token_embedding = register_module(
        "token_embedding", torch::nn::Embedding(config_.vocab_size, config_.hidden_size));
    position_embedding = register_module(
        "position_embedding",
        torch::nn::Embedding(config_.max_position_embeddings, config_.hidden_size));
  }

  /// ids [B, L] int64 -> [B, L, D].
  torch::Tensor forward(const torch::Tensor& input_ids) {
    const int64_t l = input_ids.size(1);
    torch::Tensor positions = torch::arange(l, input_ids.options().dtype(torch::kInt64));  // [L]
    return token_embedding(input_ids) + position_embedding(positions).unsqueeze(0);
  }

  torch::nn::Embedding token_embedding{nullptr};     ///< [vocab_size, D].
  torch::nn::Embedding position_embedding{nullptr};  ///< [max_position_embeddings, D].

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPTextEmbeddingsImpl.
TORCH_MODULE(CLIPTextEmbeddings);

/// The stack of encoder layers (transformers `CLIPEncoder`), registered as `layers`.
class CLIPEncoderImpl : public torch::nn::Cloneable<CLIPEncoderImpl> {
 public:
  /// Builds `num_hidden_layers` layers.
  explicit CLIPEncoderImpl(CLIPTextConfig config) : config_(std::move(config)) { reset(); }

  /// Registers `layers` (a ModuleList of CLIPEncoderLayer).
  void reset() override {
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < config_.num_hidden_layers; ++i) layers->push_back(CLIPEncoderLayer(config_));
  }

  /// Runs the first `count` layers ([B, L, D] -> [B, L, D]); all of them when count < 0.
  torch::Tensor forward(torch::Tensor x, int64_t count = -1) {
    const int64_t n = count < 0 ? static_cast<int64_t>(layers->size()) : count;
    for (int64_t i = 0; i < n; ++i) x = layers->ptr<CLIPEncoderLayerImpl>(i)->forward(x);
    return x;
  }

  torch::nn::ModuleList layers{nullptr};  ///< The CLIPEncoderLayer stack.

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPEncoderImpl.
TORCH_MODULE(CLIPEncoder);

/// What CLIPTextModel returns.
struct CLIPTextOutput {
  torch::Tensor last_hidden_state;  ///< [B, L, D] after final_layer_norm (the UNet's context).
  torch::Tensor pooled;             ///< [B, D]: last_hidden_state at each row's eos position.
  /// With `output_hidden_states`: num_hidden_layers + 1 tensors [B, L, D], the embeddings and
  /// then each layer's output, without final_layer_norm (transformers' `hidden_states`; SDXL's
  /// context is `hidden_states[num_hidden_layers - 1]`, the penultimate). Empty otherwise.
  std::vector<torch::Tensor> hidden_states;
};

/// The CLIP text transformer (transformers `CLIPTextModel` / `CLIPTextTransformer`).
///
/// Example:
/// @code
/// sd::CLIPTextModel model(sd::CLIPTextConfig::sd15());
/// auto out = model->forward(ids);  // ids int64 [B, 77]
/// @endcode
class CLIPTextModelImpl : public torch::nn::Cloneable<CLIPTextModelImpl> {
 public:
  /// Builds the model of `config` (validated).
  explicit CLIPTextModelImpl(CLIPTextConfig config) : config_(std::move(config)) {
    config_.validate();
    reset();
  }

  /// Registers embeddings, encoder, final_layer_norm.
  void reset() override {
    embeddings = register_module("embeddings", CLIPTextEmbeddings(config_));
    encoder = register_module("encoder", CLIPEncoder(config_));
    final_layer_norm = register_module(
        "final_layer_norm",
        torch::nn::LayerNorm(
            torch::nn::LayerNormOptions({config_.hidden_size}).eps(config_.layer_norm_eps)));
  }

  /// ids [B, L] (int64, L ≤ max_position_embeddings) -> hidden states [B, L, D] and pooled
  /// [B, D].
  ///
  /// `clip_skip` = k > 0 returns, as `last_hidden_state`, the output of layer
  /// num_hidden_layers − k passed through final_layer_norm (diffusers' `clip_skip` in
  /// `encode_prompt`); `pooled` always comes from the full stack. `output_hidden_states` also
  /// returns every layer's output (`CLIPTextOutput::hidden_states`).
  CLIPTextOutput forward(const torch::Tensor& input_ids, int64_t clip_skip = 0,
                         bool output_hidden_states = false) {
    TORCH_CHECK(input_ids.dim() == 2, "CLIPTextModel: input_ids must be [B, L], got ",
                input_ids.sizes());
    TORCH_CHECK(input_ids.scalar_type() == torch::kInt64 || input_ids.scalar_type() == torch::kInt32,
                "CLIPTextModel: input_ids must be an integer tensor, got ", input_ids.scalar_type());
    TORCH_CHECK(input_ids.size(1) >= 1 && input_ids.size(1) <= config_.max_position_embeddings,
                "CLIPTextModel: sequence length ", input_ids.size(1),
                " must be in [1, max_position_embeddings = ", config_.max_position_embeddings, "]");
    TORCH_CHECK(clip_skip >= 0 && clip_skip < config_.num_hidden_layers,
                "CLIPTextModel: clip_skip must be in [0, num_hidden_layers = ",
                config_.num_hidden_layers, "), got ", clip_skip);
    const torch::Tensor ids = input_ids.to(torch::kInt64);
    torch::Tensor hidden = embeddings(ids);  // [B, L, D]
    torch::Tensor skipped;
    std::vector<torch::Tensor> hidden_states;
    if (output_hidden_states) hidden_states.push_back(hidden);
    for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
      if (clip_skip > 0 && i == config_.num_hidden_layers - clip_skip) {
        skipped = final_layer_norm(hidden);
      }
      hidden = encoder->layers->ptr<CLIPEncoderLayerImpl>(i)->forward(hidden);
      if (output_hidden_states) hidden_states.push_back(hidden);
    }
    torch::Tensor last = final_layer_norm(hidden);  // [B, L, D]
    // transformers CLIPTextTransformer.forward: eos_token_id == 2 is the legacy configuration
    // (argmax of the ids, which finds <|endoftext|> = the largest id); otherwise the first
    // position holding eos_token_id.
    torch::Tensor eos_at = config_.eos_token_id == 2
                               ? ids.argmax(-1)
                               : ids.eq(config_.eos_token_id).to(torch::kInt32).argmax(-1);  // [B]
    torch::Tensor rows = torch::arange(ids.size(0), eos_at.options());
    torch::Tensor pooled = last.index({rows, eos_at});  // [B, D]
    return {clip_skip > 0 ? skipped : last, pooled, std::move(hidden_states)};
  }

  /// Prints the configuration: `CLIPTextModel(layers=…, hidden_size=…, heads=…, …)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "sd::CLIPTextModel(layers=" << config_.num_hidden_layers
           << ", hidden_size=" << config_.hidden_size << ", heads=" << config_.num_attention_heads
           << ", intermediate_size=" << config_.intermediate_size
           << ", vocab_size=" << config_.vocab_size
           << ", max_position_embeddings=" << config_.max_position_embeddings
           << ", act=" << config_.hidden_act << ")";
  }

  /// The configuration the model was built with.
  const CLIPTextConfig& config() const { return config_; }

  CLIPTextEmbeddings embeddings{nullptr};        ///< Token + position embeddings.
  CLIPEncoder encoder{nullptr};                  ///< The layer stack.
  torch::nn::LayerNorm final_layer_norm{nullptr};  ///< Norm after the last layer.

 private:
  CLIPTextConfig config_;
};
/// Holder of CLIPTextModelImpl.
TORCH_MODULE(CLIPTextModel);

/// Loads a transformers CLIPTextModel safetensors file (keys with or without `text_model.`,
/// e.g. a diffusers folder's `text_encoder/model.safetensors`) into `model`, strictly, converting
/// to the model's dtype. `position_ids` (a buffer older checkpoints stored) is dropped.
inline scedit::LoadReport load_clip_text_weights(CLIPTextModelImpl& model, const std::string& path) {
  scedit::LoadOptions options;
  options.source = path;
  options.rename = [](const std::string& key) -> std::string {
    static const std::string kPrefix = "text_model.";
    std::string k = key.rfind(kPrefix, 0) == 0 ? key.substr(kPrefix.size()) : key;
    if (k == "embeddings.position_ids") return "";
    return k;
  };
  return scedit::load_state_dict(model, scedit::safetensors::load(path), options);
}

}  // namespace sd
