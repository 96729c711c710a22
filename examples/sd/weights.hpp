#pragma once
/// @file weights.hpp
/// @brief Loading Stable Diffusion weights (SD 1.x, SD 2.x, SDXL) — a diffusers folder or an
/// original single-file checkpoint — into this example's UNet, VAE and CLIP text encoder(s).
///
/// Two layouts are read (docs/FILE_FORMATS.md lists them):
///  - a diffusers folder: `model_index.json`; `unet/` and `vae/` with `config.json` and
///    `diffusion_pytorch_model[.fp16].safetensors` (or, failing those, the `.bin` `torch.save`
///    files of older models); `text_encoder/` with `config.json` and `model[.fp16].safetensors`
///    (or `.bin`; keys with or without transformers' `text_model.` prefix);
///    `tokenizer/vocab.json` + `merges.txt` (+ `tokenizer_config.json` if present);
///    `scheduler/scheduler_config.json` if present. An SDXL folder (model_index.json names
///    `text_encoder_2`, or the folder has `text_encoder_2/`) adds `text_encoder_2/` (a
///    transformers `CLIPTextModelWithProjection`: `text_model.*` and `text_projection.weight`)
///    and `tokenizer_2/`. Every configuration comes from its component's `config.json`;
///  - a single-file original checkpoint (CompVis LDM for SD 1.x and 2.x, sgm for SDXL),
///    `.safetensors` or a Lightning-era `.ckpt` (its `state_dict`): its family is told by its
///    keys and its configurations are that family's released ones unless given
///    (single_file.hpp); it is mapped with ldm_keys_xl.hpp's layouts. Its tokenizer(s) come from
///    `WeightsOptions::tokenizer` (and `tokenizer_2`), since a single file carries none.
///
/// Loads are strict: a missing or unexpected key, a wrong shape, a non-floating tensor, a
/// truncated file or a missing config is an error naming the key and the file, raised before
/// any parameter is written. Each tensor is copied straight from the memory-mapped safetensors
/// file into the module's parameter, converting to the dtype and device asked (no float32 copy
/// of the weights on the way). `torch.save` files (`.bin`, `.ckpt`, `.pt`, `.pth`) are read by
/// `scedit::load_torch_file`, which runs none of their code and refuses any Python global
/// outside its allow-list; their storages are read into memory first.
///
/// Example:
/// @code
/// auto unet = sd::load_unet("stable-diffusion-v1-5", sd::WeightsOptions()
///                               .dtype(torch::kFloat16).device(torch::kCUDA).variant("fp16"));
/// auto vae = sd::load_vae("sd_xl_base_1.0.safetensors", torch::kFloat32);
/// @endcode

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/tensor_file.hpp>
#include <scedit/trainable.hpp>

#include <sd/clip.hpp>
#include <sd/clip_projection.hpp>
#include <sd/config.hpp>
#include <sd/ldm_keys_xl.hpp>
#include <sd/single_file.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tokenizer.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// How to load weights.
///
/// Example:
/// @code
/// auto options = sd::WeightsOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
/// @endcode
struct WeightsOptions {
  /// Dtype of the loaded modules' parameters.
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
  /// Device of the loaded modules.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// Weights file to prefer in a diffusers folder: "" (`<name>.safetensors`) or e.g. "fp16"
  /// (`<name>.fp16.safetensors`); the other one is used, with a notice, when it is absent.
  TORCH_ARG(std::string, variant) = "";
  /// Tokenizer folder (`vocab.json`, `merges.txt`), or a diffusers pipeline folder whose
  /// `tokenizer/` (and, for SDXL, `tokenizer_2/`) are meant: required for a single-file
  /// checkpoint; overrides a diffusers folder's `tokenizer/` when set.
  TORCH_ARG(std::filesystem::path, tokenizer) = {};
  /// SDXL's second tokenizer folder: overrides the `tokenizer_2/` of the model's folder or of
  /// `tokenizer`'s pipeline folder; an SDXL single file needs it unless `tokenizer` is a
  /// pipeline folder.
  TORCH_ARG(std::filesystem::path, tokenizer_2) = {};
  /// UNet configuration of a single-file checkpoint (default: its family's, single_file.hpp's
  /// `default_ldm_configs`).
  TORCH_ARG(std::optional<UNetConfig>, unet_config) = std::nullopt;
  /// VAE configuration of a single-file checkpoint (default: its family's).
  TORCH_ARG(std::optional<VAEConfig>, vae_config) = std::nullopt;
  /// Text-encoder configuration of a single-file checkpoint (default: its family's).
  TORCH_ARG(std::optional<CLIPTextConfig>, text_config) = std::nullopt;
  /// SDXL's second text-encoder configuration of a single-file checkpoint (default
  /// `CLIPTextConfig::sdxl_2()`).
  TORCH_ARG(std::optional<CLIPTextConfig>, text_config_2) = std::nullopt;
  /// Further module keys not to expect in the file, besides `lsc_identity.*` and the keys of
  /// attached tuners, which are always skipped.
  TORCH_ARG(std::function<bool(const std::string&)>, skip_module_key) = nullptr;
  /// Print notices (variant fallback) to stderr.
  TORCH_ARG(bool, verbose) = true;
};

/// The weights file of a diffusers component folder: `<stem>.<variant>.safetensors` when a
/// variant is asked, else `<stem>.safetensors`; when that file is absent the other one
/// (`<stem>.safetensors`, or `<stem>.fp16.safetensors` when no variant was asked) is used with
/// a notice on stderr (if `verbose`). Without either, the same two as `torch.save` files
/// (`<stem>[.<variant>].bin`), in the same order. A folder holding none of them is an error
/// naming the folder and the files looked for.
inline std::filesystem::path resolve_weights_file(const std::filesystem::path& folder,
                                                  const std::string& stem,
                                                  const std::string& variant, bool verbose = true) {
  const std::string other_variant = variant.empty() ? "fp16" : variant;
  const auto named = [&](bool with_variant, const char* extension) {
    return folder / (with_variant ? stem + "." + other_variant + extension : stem + extension);
  };
  const auto preferred = named(!variant.empty(), ".safetensors");
  const auto fallback = named(variant.empty(), ".safetensors");
  for (const auto& candidate : {preferred, fallback, named(!variant.empty(), ".bin"),
                                named(variant.empty(), ".bin")}) {
    if (!std::filesystem::is_regular_file(candidate)) continue;
    const bool other_variant_file = candidate == fallback || candidate == named(variant.empty(), ".bin");
    if (verbose && other_variant_file) {
      std::cerr << "note: no '" << preferred.filename().string() << "' in '" << folder.string()
                << "'; using '" << candidate.filename().string() << "'\n";
    }
    return candidate;
  }
  TORCH_CHECK(false, "missing weights file in '", folder.string(), "': expected '",
              preferred.filename().string(), "' or '", fallback.filename().string(),
              "' (or the same as .bin)");
}

namespace detail {

/// What tells the components apart when looking for their files.
struct Component {
  const char* name;          ///< "UNet", "VAE", "text encoder" (for messages).
  const char* subfolder;     ///< Folder inside a diffusers pipeline.
  const char* weights_stem;  ///< Weights file name without `.safetensors`.
  /// Text encoders: what their module's text-model keys start with ("" for a `CLIPTextModel`,
  /// "text_model." for a `CLIPTextModelWithProjection`); null for other models.
  const char* text_head = nullptr;
};
/// The UNet's files.
inline const Component kUNetFiles{"UNet", "unet", "diffusion_pytorch_model"};
/// The VAE's files.
inline const Component kVAEFiles{"VAE", "vae", "diffusion_pytorch_model"};
/// The text encoder's files.
inline const Component kTextFiles{"text encoder", "text_encoder", "model", ""};
/// SDXL's second text encoder's files.
inline const Component kText2Files{"second text encoder", "text_encoder_2", "model", "text_model."};

/// Refuses pickles and anything else that is not `.safetensors`.
inline void check_safetensors_path(const std::filesystem::path& path) {
  const std::string ext = path.extension().string();
  TORCH_CHECK(ext != ".ckpt" && ext != ".bin" && ext != ".pt" && ext != ".pth" && ext != ".pkl",
              "'", path.string(), "' is a PyTorch pickle (", ext,
              "), which is not supported: pickles can run code and need Python to read; "
              "convert it to .safetensors first");
  TORCH_CHECK(ext == ".safetensors", "'", path.string(),
              "' is not a .safetensors file; expected a diffusers folder or a .safetensors file");
}

/// Refuses a single file that is neither `.safetensors` nor a `torch.save` file (`.ckpt`,
/// `.pt`, `.pth`, `.bin`), and one whose first bytes are neither container (a legacy pickle),
/// before anything else is checked or read.
inline void check_weights_path(const std::filesystem::path& path) {
  const std::string ext = path.extension().string();
  TORCH_CHECK(ext == ".safetensors" || ext == ".ckpt" || ext == ".bin" || ext == ".pt" || ext == ".pth",
              "'", path.string(), "' is not a weights file; expected a diffusers folder, a "
              ".safetensors file or a torch.save .ckpt, .pt, .pth or .bin");
  scedit::check_tensor_file_format(path.string());
}

/// Reads a JSON file; errors name the file.
inline nlohmann::json read_json(const std::filesystem::path& path, const std::string& what) {
  TORCH_CHECK(std::filesystem::is_regular_file(path), "missing ", what, " '", path.string(), "'");
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "cannot open ", what, " '", path.string(), "'");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "cannot parse ", what, " '", path.string(), "': ", e.what());
  }
}

/// The config of a diffusers component folder; errors name the file.
template <typename Config>
Config read_config(const std::filesystem::path& folder, const Component& component) {
  const auto path = folder / "config.json";
  const auto json = read_json(path, std::string(component.name) + " config");
  try {
    return Config::from_json(json);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "invalid ", component.name, " config '", path.string(), "': ",
                e.what_without_backtrace());
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "invalid ", component.name, " config '", path.string(), "': ", e.what());
  }
}

/// One component's tensors keyed for its module, and where they came from.
struct ComponentWeights {
  scedit::TensorMap tensors;   ///< Module key -> tensor (views of the mapped file).
  std::filesystem::path file;  ///< The file read.
  /// Module key -> the key in the file, where they differ (LDM names, `text_model.` prefix).
  std::map<std::string, std::string> file_keys;
};

/// True when some key of `file` starts with `prefix`.
inline bool has_prefix(const scedit::safetensors::File& file, const std::string& prefix) {
  const auto& infos = file.tensors();
  return std::any_of(infos.begin(), infos.end(),
                     [&](const auto& info) { return info.name.rfind(prefix, 0) == 0; });
}

/// transformers' CLIP keys as the text encoder's module names them: `head` ("" or
/// "text_model.", `Component::text_head`) before every text-model key, whether or not the file
/// had transformers' `text_model.` prefix; `text_projection.*` as they are; `position_ids` (a
/// buffer older transformers saved) dropped.
inline void normalize_text_keys(ComponentWeights& weights, const std::string& head) {
  const std::string prefix = "text_model.";
  scedit::TensorMap out;
  for (auto& [key, tensor] : weights.tensors) {
    std::string k = key;
    if (key.rfind("text_projection.", 0) != 0) {
      const std::string bare = key.rfind(prefix, 0) == 0 ? key.substr(prefix.size()) : key;
      if (bare == "embeddings.position_ids") continue;
      k = head + bare;
    }
    TORCH_CHECK(out.emplace(k, std::move(tensor)).second, "key '", k, "' appears both with and "
                "without the 'text_model.' prefix in '", weights.file.string(), "'");
    if (k != key) weights.file_keys[k] = key;
  }
  weights.tensors = std::move(out);
}

/// The tensors of a diffusers-layout weights file of `component` in its module's keys;
/// `config` is `given` or the `config.json` beside the file.
template <typename Config>
ComponentWeights diffusers_file_component(const std::filesystem::path& path,
                                          scedit::TensorMap tensors, const Component& component,
                                          const std::optional<Config>& given, Config& config) {
  ComponentWeights weights;
  weights.file = path;
  weights.tensors = std::move(tensors);
  config = given ? *given : read_config<Config>(path.parent_path(), component);
  if (component.text_head != nullptr) normalize_text_keys(weights, component.text_head);
  return weights;
}

/// The weights of `component` in its module's keys, from a diffusers folder (component or
/// pipeline folder) or a diffusers-layout file with `config.json` beside it (`.safetensors` or
/// `torch.save`; `given` instead of that config when set). Sets `config` to the configuration
/// that goes with them. Single-file checkpoints: `read_model`.
template <typename Config>
ComponentWeights read_component(const std::filesystem::path& path, const Component& component,
                                const WeightsOptions& options, const std::optional<Config>& given,
                                Config& config) {
  TORCH_CHECK(std::filesystem::exists(path), "'", path.string(), "' does not exist");
  if (!std::filesystem::is_directory(path)) {
    check_weights_path(path);
    return diffusers_file_component(path, scedit::load_tensor_file(path.string()), component,
                                    given, config);
  }
  // A component folder holds config.json; a pipeline folder holds the component's subfolder.
  const bool pipeline = !std::filesystem::exists(path / "config.json") &&
                        std::filesystem::exists(path / "model_index.json");
  const auto folder = pipeline ? path / component.subfolder : path;
  TORCH_CHECK(std::filesystem::is_directory(folder), "missing ", component.name, " folder '",
              folder.string(), "'");
  ComponentWeights weights;
  config = read_config<Config>(folder, component);
  weights.file = resolve_weights_file(folder, component.weights_stem, options.variant(),
                                      options.verbose());
  weights.tensors = scedit::load_tensor_file(weights.file.string());
  if (component.text_head != nullptr) normalize_text_keys(weights, component.text_head);
  return weights;
}

/// A single-file checkpoint read whole: its family, the configurations of its models (those
/// `WeightsOptions` gives, else the family's) and its key layout.
struct SingleFile {
  std::filesystem::path file;          ///< The file read.
  scedit::TensorMap tensors;           ///< Every tensor of it (views of the mapped file).
  LdmFamily family = LdmFamily::kSD1;  ///< What its keys say.
  LdmConfigs configs;                  ///< Its models' configurations.
  LdmLayout layout;                    ///< Its keys by model.

  /// One model's tensors in its module's keys (strict: `ldm_component_to_diffusers`).
  ComponentWeights part(const LdmComponentKeys& keys) const {
    ComponentWeights weights;
    weights.file = file;
    weights.tensors =
        ldm_component_to_diffusers(tensors, keys, "'" + file.string() + "'", &weights.file_keys);
    return weights;
  }
};

/// `tensors` of the single-file checkpoint `path` with the family and configurations that go
/// with them. SDXL's refiner (one text encoder, `conditioner.embedders.0.model.`) is refused.
inline SingleFile read_single_file(const std::filesystem::path& path, scedit::TensorMap tensors,
                                   const WeightsOptions& options) {
  SingleFile single;
  single.file = path;
  single.tensors = std::move(tensors);
  single.family = detect_ldm_family(single.tensors);
  TORCH_CHECK(single.family != LdmFamily::kSDXL ||
                  !has_prefix(single.tensors, "conditioner.") ||
                  has_prefix(single.tensors, kSgmCLIPPrefix),
              "'", path.string(), "' has sgm text-encoder keys (conditioner.embedders.*) but no '",
              kSgmCLIPPrefix, "*': an SDXL refiner or another sgm model, which is not supported "
              "(SDXL base has CLIP ViT-L there)");
  single.configs = default_ldm_configs(single.family);
  if (options.unet_config()) single.configs.unet = *options.unet_config();
  if (options.vae_config()) single.configs.vae = *options.vae_config();
  if (options.text_config()) single.configs.text = *options.text_config();
  if (options.text_config_2()) single.configs.text_2 = *options.text_config_2();
  single.layout = ldm_layout(single.family, single.configs);
  return single;
}

/// The weights of a model from any layout its loader reads: `read_component`'s, or a
/// single-file checkpoint, of which `part(single, config)` takes the model's tensors and
/// configuration. The file is read once.
template <typename Config, typename Part>
ComponentWeights read_model(const std::filesystem::path& path, const Component& component,
                            const WeightsOptions& options, const std::optional<Config>& given,
                            Config& config, Part part) {
  if (!std::filesystem::is_regular_file(path)) {
    return read_component<Config>(path, component, options, given, config);
  }
  check_weights_path(path);
  auto tensors = scedit::load_tensor_file(path.string());
  if (!is_ldm_checkpoint(tensors)) {
    return diffusers_file_component(path, std::move(tensors), component, given, config);
  }
  return part(read_single_file(path, std::move(tensors), options), config);
}

/// Copies `tensors` into `module` strictly (keys and shapes checked first, then every tensor
/// converted to the parameter's dtype and device). Not expected in the file: `lsc_identity.*`,
/// attached tuners' keys and `extra_skip`'s.
inline void load_into(torch::nn::Module& module, const ComponentWeights& weights,
                      const std::function<bool(const std::string&)>& extra_skip) {
  // Keyed as in the file, renamed back by the load, so that messages name the file's keys. A
  // file key that holds several module tensors (OpenCLIP's fused q/k/v) is named with each.
  std::map<std::string, int> file_key_uses;
  for (const auto& [key, file_key] : weights.file_keys) ++file_key_uses[file_key];
  scedit::TensorMap by_file_key;
  auto to_module = std::make_shared<std::map<std::string, std::string>>();
  for (const auto& [key, tensor] : weights.tensors) {
    const auto renamed = weights.file_keys.find(key);
    std::string file_key = renamed == weights.file_keys.end() ? key : renamed->second;
    if (file_key_uses[file_key] > 1) file_key += " (its part '" + key + "')";
    TORCH_CHECK(tensor.is_floating_point(), "key '", file_key, "' in '", weights.file.string(),
                "' has dtype ", tensor.scalar_type(),
                "; model weights must be F16, BF16, F32 or F64");
    by_file_key.emplace(file_key, tensor);
    if (file_key != key) to_module->emplace(file_key, key);
  }
  auto tuners = scedit::tuner_key_filter(module);
  scedit::LoadOptions options;
  options.strict = true;  // throws listing every missing, unexpected and mis-shaped key
  options.source = "'" + weights.file.string() + "'";
  options.rename = [to_module](const std::string& key) {
    const auto it = to_module->find(key);
    return it == to_module->end() ? key : it->second;
  };
  options.skip_module_key = [tuners, extra_skip](const std::string& key) {
    return key.find("lsc_identity.") != std::string::npos || tuners(key) ||
           (extra_skip && extra_skip(key));
  };
  scedit::load_state_dict(module, by_file_key, options);
}

/// A module built from `config`, moved to the dtype and device asked, loaded from `weights`,
/// in eval mode.
template <typename Holder, typename Config>
Holder build(const Config& config, const ComponentWeights& weights, const WeightsOptions& options) {
  Holder module(config);
  module->to(options.device(), options.dtype());
  load_into(*module, weights, options.skip_module_key());
  module->eval();
  return module;
}

/// The UNet's weights (and its configuration into `config`) from any layout `load_unet` reads.
inline ComponentWeights read_unet(const std::filesystem::path& path, const WeightsOptions& options,
                                  UNetConfig& config) {
  return read_model<UNetConfig>(path, kUNetFiles, options, options.unet_config(), config,
                                [](const SingleFile& single, UNetConfig& c) {
                                  c = single.configs.unet;
                                  return single.part(single.layout.unet);
                                });
}

}  // namespace detail

/// Loads a UNet from a diffusers `unet/` folder (or a pipeline folder, using its `unet/`), a
/// single-file checkpoint (`.safetensors` or `.ckpt`; config: `options.unet_config()` or its
/// family's), or a diffusers-layout `.safetensors` or `.bin` with `config.json` beside it.
inline UNet load_unet(const std::filesystem::path& path, const WeightsOptions& options = {}) {
  UNetConfig config;
  const auto weights = detail::read_unet(path, options, config);
  return detail::build<UNet>(config, weights, options);
}

/// `load_unet` in `dtype` on `device`.
inline UNet load_unet(const std::filesystem::path& path, torch::Dtype dtype,
                      torch::Device device = torch::kCPU) {
  return load_unet(path, WeightsOptions().dtype(dtype).device(device));
}

/// Loads base weights into an existing UNet, e.g. one with tuners attached (their keys and the
/// skip sites are not expected in the file). `path` as for `load_unet`; the strict shape check
/// refuses weights of another layout.
inline void load_unet_weights(UNet& unet, const std::filesystem::path& path,
                              const WeightsOptions& options = {}) {
  UNetConfig config;  // unused: the UNet exists already
  detail::load_into(*unet, detail::read_unet(path, options, config), options.skip_module_key());
}

/// Loads a VAE (`vae/` folder, pipeline folder, single-file checkpoint or diffusers file).
inline VAE load_vae(const std::filesystem::path& path, const WeightsOptions& options = {}) {
  VAEConfig config;
  const auto weights = detail::read_model<VAEConfig>(
      path, detail::kVAEFiles, options, options.vae_config(), config,
      [](const detail::SingleFile& single, VAEConfig& c) {
        c = single.configs.vae;
        return single.part(single.layout.vae);
      });
  return detail::build<VAE>(config, weights, options);
}

/// `load_vae` in `dtype` on `device`.
inline VAE load_vae(const std::filesystem::path& path, torch::Dtype dtype,
                    torch::Device device = torch::kCPU) {
  return load_vae(path, WeightsOptions().dtype(dtype).device(device));
}

/// Loads the (first) CLIP text encoder (`text_encoder/` folder, pipeline folder, single-file
/// checkpoint or transformers `model.safetensors` with `config.json` beside it).
inline CLIPTextModel load_text_encoder(const std::filesystem::path& path,
                                       const WeightsOptions& options = {}) {
  CLIPTextConfig config;
  const auto weights = detail::read_model<CLIPTextConfig>(
      path, detail::kTextFiles, options, options.text_config(), config,
      [](const detail::SingleFile& single, CLIPTextConfig& c) {
        c = single.configs.text;
        return single.part(single.layout.text_encoder);
      });
  return detail::build<CLIPTextModel>(config, weights, options);
}

/// `load_text_encoder` in `dtype` on `device`.
inline CLIPTextModel load_text_encoder(const std::filesystem::path& path, torch::Dtype dtype,
                                       torch::Device device = torch::kCPU) {
  return load_text_encoder(path, WeightsOptions().dtype(dtype).device(device));
}

}  // namespace sd
