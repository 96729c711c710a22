#pragma once
/// @file pipeline.hpp
/// @brief Loading a whole Stable Diffusion (SD 1.x, SD 2.x, SDXL) as one `StableDiffusion`: its
/// models through weights.hpp, its tokenizer(s), its scheduler configuration. The layouts read
/// are weights.hpp's (docs/FILE_FORMATS.md).
///
/// Example:
/// @code
/// auto sd15 = sd::load_pipeline("stable-diffusion-v1-5", sd::WeightsOptions()
///                                   .dtype(torch::kFloat16).device(torch::kCUDA).variant("fp16"));
/// auto single = sd::load_pipeline("v1-5-pruned-emaonly.safetensors",
///                                 sd::WeightsOptions().tokenizer("stable-diffusion-v1-5/tokenizer"));
/// auto xl = sd::load_pipeline("sd_xl_base_1.0.safetensors",
///                             sd::WeightsOptions().tokenizer("stable-diffusion-xl-base-1.0"));
/// @endcode

#include <sd/single_file.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tokenizer.hpp>
#include <sd/weights.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <string>
#include <utility>

namespace sd {

/// Reads the tokenizer in `folder` (`vocab.json`, `merges.txt`; `pad_token` and
/// `model_max_length` from `tokenizer_config.json` when present).
inline CLIPTokenizer load_tokenizer(const std::filesystem::path& folder) {
  for (const char* name : {"vocab.json", "merges.txt"}) {
    TORCH_CHECK(std::filesystem::is_regular_file(folder / name), "missing tokenizer file '",
                (folder / name).string(), "'");
  }
  CLIPTokenizerOptions options;
  const auto config_path = folder / "tokenizer_config.json";
  if (std::filesystem::is_regular_file(config_path)) {
    const auto config = detail::read_json(config_path, "tokenizer config");
    if (auto pad = config.find("pad_token"); pad != config.end()) {
      if (pad->is_string()) options.pad_token(pad->get<std::string>());
      if (pad->is_object() && pad->contains("content")) {
        options.pad_token(pad->at("content").get<std::string>());
      }
    }
    if (auto length = config.find("model_max_length");
        length != config.end() && length->is_number_integer()) {
      options.max_length(length->get<int64_t>());
    }
  }
  return CLIPTokenizer(folder.string(), options);
}

namespace detail {

/// Whether a pipeline's `model_index.json` names `component` (`"text_encoder_2": ["transformers",
/// ...]`; diffusers writes `[null, null]` for a component a pipeline goes without).
inline bool names_component(const nlohmann::json& index, const char* component) {
  const auto it = index.find(component);
  return it != index.end() && it->is_array() && !it->empty() && !it->front().is_null();
}

/// The tokenizer folders of a model: `WeightsOptions::tokenizer` (a tokenizer folder, or a
/// pipeline folder meaning its `tokenizer/` and `tokenizer_2/`) and `tokenizer_2`, else those of
/// the pipeline folder `pipeline` (empty for a single file). The second is empty unless `sdxl`.
/// Errors name the model `path` and the folder missing.
inline std::pair<std::filesystem::path, std::filesystem::path> tokenizer_folders(
    const std::filesystem::path& path, const std::filesystem::path& pipeline,
    const WeightsOptions& options, bool sdxl) {
  std::filesystem::path first = options.tokenizer(), second = options.tokenizer_2();
  if (!first.empty() && std::filesystem::is_directory(first / "tokenizer")) {
    if (second.empty() && sdxl) second = first / "tokenizer_2";
    first = first / "tokenizer";
  }
  if (!pipeline.empty() && first.empty()) first = pipeline / "tokenizer";
  if (!pipeline.empty() && second.empty() && sdxl) second = pipeline / "tokenizer_2";
  TORCH_CHECK(!first.empty(), "'", path.string(),
              "' is a single-file checkpoint, which carries no tokenizer: set "
              "WeightsOptions::tokenizer (--tokenizer) to a folder with vocab.json and "
              "merges.txt, e.g. a diffusers model's tokenizer/");
  TORCH_CHECK(!sdxl || !second.empty(), "'", path.string(), "' is an SDXL single-file "
              "checkpoint, which carries no tokenizers: set WeightsOptions::tokenizer "
              "(--tokenizer) to a diffusers SDXL model's folder (with tokenizer/ and tokenizer_2/), "
              "or WeightsOptions::tokenizer_2 to the second tokenizer's folder");
  for (const auto* folder : {&first, &second}) {
    TORCH_CHECK(folder->empty() || std::filesystem::is_directory(*folder), "missing tokenizer "
                "folder '", folder->string(), "' (with vocab.json and merges.txt) for '",
                path.string(), "'");
  }
  return {first, second};
}

}  // namespace detail

/// Loads a whole Stable Diffusion (SD 1.x, 2.x or SDXL) from a diffusers folder or a single-file
/// checkpoint (see the file comment). Every file is read and checked before the next model is
/// built; an error names the file and the key at fault. A single file of SD 2.x or SDXL, or a
/// folder without `scheduler/scheduler_config.json`, gets its family's scheduler configuration
/// (`default_ldm_scheduler_config`, a guess for SD 2.x).
inline StableDiffusion load_pipeline(const std::filesystem::path& path,
                                     const WeightsOptions& options = {}) {
  TORCH_CHECK(std::filesystem::exists(path), "'", path.string(), "' does not exist");
  StableDiffusion sd;
  detail::ComponentWeights unet, vae, text, text_2;
  bool sdxl = false;
  std::filesystem::path pipeline;
  if (std::filesystem::is_directory(path)) {
    TORCH_CHECK(std::filesystem::is_regular_file(path / "model_index.json"), "'", path.string(),
                "' is not a diffusers pipeline folder: it has no model_index.json");
    const auto index = detail::read_json(path / "model_index.json", "pipeline index");
    sdxl = detail::names_component(index, "text_encoder_2") ||
           std::filesystem::is_directory(path / "text_encoder_2");
    pipeline = path;
    unet = detail::read_component<UNetConfig>(path, detail::kUNetFiles, options, std::nullopt,
                                              sd.unet_config);
    vae = detail::read_component<VAEConfig>(path, detail::kVAEFiles, options, std::nullopt,
                                            sd.vae_config);
    text = detail::read_component<CLIPTextConfig>(path, detail::kTextFiles, options, std::nullopt,
                                                  sd.text_config);
    if (sdxl) {
      text_2 = detail::read_component<CLIPTextConfig>(path, detail::kText2Files, options,
                                                      std::nullopt, sd.text_config_2);
    }
    const auto scheduler = path / "scheduler" / "scheduler_config.json";
    if (std::filesystem::exists(scheduler)) {
      sd.scheduler_config = detail::read_json(scheduler, "scheduler config");
    } else {  // a folder without one: as a single file, its family's (OpenCLIP's gelu: SD 2.x)
      const auto family = sdxl ? LdmFamily::kSDXL : sd.text_config.hidden_act == "gelu" ? LdmFamily::kSD2 : LdmFamily::kSD1;
      sd.scheduler_config = default_ldm_scheduler_config(family, sd.unet_config);
    }
  } else {
    // A single-file checkpoint: read once, split into its models.
    detail::check_weights_path(path);
    auto all = scedit::load_tensor_file(path.string());
    TORCH_CHECK(detail::has_prefix(all, kLdmUNetPrefix), "'", path.string(),
                "' is not an original Stable Diffusion checkpoint (no '", kLdmUNetPrefix,
                "*' keys); for diffusers weights pass the pipeline folder");
    const auto single = detail::read_single_file(path, std::move(all), options);
    sdxl = single.family == LdmFamily::kSDXL;
    sd.unet_config = single.configs.unet;
    sd.vae_config = single.configs.vae;
    sd.text_config = single.configs.text;
    if (sdxl) sd.text_config_2 = single.configs.text_2;
    sd.scheduler_config = default_ldm_scheduler_config(single.family, sd.unet_config);
    unet = single.part(single.layout.unet);
    vae = single.part(single.layout.vae);
    text = single.part(single.layout.text_encoder);
    if (sdxl) text_2 = single.part(*single.layout.text_encoder_2);
  }
  const auto [tokenizer, tokenizer_2] = detail::tokenizer_folders(path, pipeline, options, sdxl);
  sd.tokenizer = load_tokenizer(tokenizer);
  if (sdxl) sd.tokenizer_2 = load_tokenizer(tokenizer_2);
  sd.unet = detail::build<UNet>(sd.unet_config, unet, options);
  sd.vae = detail::build<VAE>(sd.vae_config, vae, options);
  sd.text_encoder = detail::build<CLIPTextModel>(sd.text_config, text, options);
  sd.files = {{"unet", unet.file}, {"vae", vae.file}, {"text_encoder", text.file},
              {"tokenizer", tokenizer}};
  if (sdxl) {
    sd.text_encoder_2 = detail::build<CLIPTextModelWithProjection>(sd.text_config_2, text_2, options);
    sd.files["text_encoder_2"] = text_2.file;
    sd.files["tokenizer_2"] = tokenizer_2;
  }
  return sd;
}

}  // namespace sd
