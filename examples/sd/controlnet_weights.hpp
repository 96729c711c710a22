#pragma once
/// @file controlnet_weights.hpp
/// @brief Where a ControlNet's weights come from: its UNet (`controlnet_from_unet`, diffusers'
/// `ControlNetModel.from_unet`), a diffusers folder or file, or an original single file.
///
/// Three layouts are read by `load_controlnet`, strictly and with the conversions of
/// weights.hpp (a missing or unexpected key, a wrong shape or a non-floating tensor is an error
/// naming the key and the file, before any parameter is written; pickles are refused):
///  - a diffusers folder: `config.json` + `diffusion_pytorch_model[.fp16].safetensors` (or a
///    pipeline folder with `model_index.json` and `controlnet/`);
///  - a `.safetensors` file of diffusers `ControlNetModel` keys; its configuration is the one
///    given, else the `config.json` beside it, else SD 1.5's;
///  - an original ControlNet file (`control_model.*` keys, beside the UNet's in a
///    whole ControlLDM checkpoint, or the same keys without the prefix in a standalone file),
///    mapped with `ldm_controlnet_keys`; its configuration is the one given, else SD 1.5's.
///
/// Example:
/// @code
/// auto options = sd::WeightsOptions().dtype(torch::kFloat16).device(torch::kCUDA);
/// auto canny = sd::load_controlnet("sd-controlnet-canny", options);  // a diffusers folder
/// auto original = sd::load_controlnet("control_sd15_canny.safetensors", options);
/// @endcode

#include <sd/controlnet.hpp>
#include <sd/ldm_keys.hpp>
#include <sd/unet.hpp>
#include <sd/weights.hpp>

#include <scedit/atomic_file.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>

#include <torch/torch.h>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace sd {

/// Key prefix of the ControlNet inside an original ControlLDM checkpoint.
inline constexpr const char* kLdmControlNetPrefix = "control_model.";

/// Every ControlNet tensor: original (LDM) keys under `prefix` <-> diffusers `ControlNetModel`
/// keys, following diffusers' conversion (`convert_controlnet_checkpoint`). The time embedding,
/// `input_blocks` and `middle_block` are the UNet's (`detail::ldm_unet_encoder_keys`);
/// `input_hint_block` is a Sequential of convolutions and SiLUs (convolutions at even indices:
/// conv_in, the blocks, conv_out), `zero_convs.{i}.0` the 1×1 convolution of encoder feature i,
/// `middle_block_out.0` that of the middle block.
inline std::vector<KeyPair> ldm_controlnet_keys(const ControlNetConfig& config,
                                                const std::string& prefix = kLdmControlNetPrefix) {
  config.validate();
  detail::KeyTable t;
  detail::ldm_unet_encoder_keys(t, config.unet, prefix);
  const std::string hint = prefix + "input_hint_block.", embedding = "controlnet_cond_embedding.";
  const size_t blocks = 2 * (config.conditioning_embedding_out_channels.size() - 1);
  t.wb(hint + "0", embedding + "conv_in");
  for (size_t i = 0; i < blocks; ++i) {
    t.wb(hint + std::to_string(2 * (i + 1)), embedding + "blocks." + std::to_string(i));
  }
  t.wb(hint + std::to_string(2 * (blocks + 1)), embedding + "conv_out");
  for (size_t i = 0; i < config.residual_channels().size(); ++i) {
    t.wb(prefix + "zero_convs." + std::to_string(i) + ".0",
         "controlnet_down_blocks." + std::to_string(i));
  }
  t.wb(prefix + "middle_block_out.0", "controlnet_mid_block");
  return t.pairs;
}

/// The control-specific arguments of `controlnet_from_unet` (diffusers' `from_unet`'s).
struct ControlNetFromUNetOptions {
  /// Widths of the condition embedding.
  TORCH_ARG(std::vector<int64_t>, conditioning_embedding_out_channels) =
      std::vector<int64_t>{16, 32, 96, 256};
  /// Channels of the condition image.
  TORCH_ARG(int64_t, conditioning_channels) = 3;
  /// "rgb" or "bgr".
  TORCH_ARG(std::string, controlnet_conditioning_channel_order) = "rgb";
  /// Copy conv_in, time_embedding (add_embedding), down_blocks and mid_block from the UNet
  /// (false: random init).
  TORCH_ARG(bool, load_weights_from_unet) = true;
};

/// diffusers' `ControlNetModel.from_unet`: a ControlNet of the UNet's configuration whose
/// conv_in, time_embedding (and SDXL's add_embedding), down_blocks and mid_block are copies of
/// the UNet's, and whose zero
/// convolutions are zero, so that it adds nothing to the UNet until trained. Built in the default
/// dtype (float32: what diffusers trains) on the UNet's device; the UNet's values are converted.
/// A UNet whose encoder carries adapters (LoRA) is refused, naming the keys.
inline ControlNetModel controlnet_from_unet(const UNet2DConditionModel& unet,
                                            const ControlNetFromUNetOptions& options = {}) {
  auto config = ControlNetConfig::from_unet(unet->config);
  config.conditioning_embedding_out_channels = options.conditioning_embedding_out_channels();
  config.conditioning_channels = options.conditioning_channels();
  config.controlnet_conditioning_channel_order = options.controlnet_conditioning_channel_order();
  ControlNetModel controlnet(config);
  controlnet->to(unet->conv_in->weight.device());
  if (!options.load_weights_from_unet()) return controlnet;
  auto shared = [](const std::string& key) {
    for (const char* prefix :
         {"conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block."}) {
      if (key.rfind(prefix, 0) == 0) return true;
    }
    return false;
  };
  scedit::TensorMap tensors;
  for (const auto& [key, tensor] : scedit::state_dict(*unet)) {
    if (shared(key)) tensors.emplace(key, tensor);
  }
  scedit::LoadOptions load;
  load.source = "the UNet";
  load.skip_module_key = [shared](const std::string& key) { return !shared(key); };
  scedit::load_state_dict(*controlnet, tensors, load);
  return controlnet;
}

namespace detail {

/// The ControlNet's files.
inline const Component kControlNetFiles{"ControlNet", "controlnet", "diffusion_pytorch_model"};

/// The prefix of the original ControlNet keys in `file`: `control_model.`, "" for a standalone
/// original file (`time_embed.0.weight` at the top), none for another layout.
inline std::optional<std::string> ldm_controlnet_prefix(const scedit::safetensors::File& file) {
  if (has_prefix(file, kLdmControlNetPrefix)) return std::string(kLdmControlNetPrefix);
  for (const auto& info : file.tensors()) {
    if (info.name == "time_embed.0.weight") return std::string();
  }
  return std::nullopt;
}

/// The ControlNet's weights in its module's keys and, into `config`, the configuration that
/// goes with them, from any layout `load_controlnet` reads.
inline ComponentWeights read_controlnet(const std::filesystem::path& path,
                                        const WeightsOptions& options,
                                        const std::optional<ControlNetConfig>& given,
                                        ControlNetConfig& config) {
  TORCH_CHECK(std::filesystem::exists(path), "'", path.string(), "' does not exist");
  if (std::filesystem::is_directory(path)) {
    return read_component<ControlNetConfig>(path, kControlNetFiles, options, std::nullopt, config);
  }
  check_safetensors_path(path);
  ComponentWeights weights;
  weights.file = path;
  const std::string source = "'" + path.string() + "'";
  scedit::safetensors::File mapping(path.string());
  if (const auto prefix = ldm_controlnet_prefix(mapping)) {
    config = given ? *given : ControlNetConfig::sd15();
    weights.tensors = ldm_component_to_diffusers(
        mapping.all(), ldm_controlnet_keys(config, *prefix), *prefix, source, &weights.file_keys);
    return weights;
  }
  TORCH_CHECK(has_prefix(mapping, "controlnet_cond_embedding."), source,
              " holds no ControlNet: expected diffusers ControlNetModel keys "
              "(controlnet_cond_embedding.*) or original ones (control_model.*, or time_embed.* "
              "and input_hint_block.* in a standalone file)");
  const auto beside = path.parent_path() / "config.json";
  config = given ? *given
           : std::filesystem::exists(beside)
               ? read_config<ControlNetConfig>(path.parent_path(), kControlNetFiles)
               : ControlNetConfig::sd15();
  weights.tensors = mapping.all();
  return weights;
}

}  // namespace detail

/// Loads a ControlNet from a diffusers folder, a diffusers-layout `.safetensors` file or an
/// original single file (see the file comment), in `options.dtype()` on `options.device()`,
/// in eval mode. `config` is the configuration of a single file (default: the `config.json`
/// beside a diffusers file, else SD 1.5's); a folder's own `config.json` is always used.
inline ControlNetModel load_controlnet(
    const std::filesystem::path& path, const WeightsOptions& options = {},
    const std::optional<ControlNetConfig>& config = std::nullopt) {
  ControlNetConfig resolved;
  const auto weights = detail::read_controlnet(path, options, config, resolved);
  return detail::build<ControlNetModel>(resolved, weights, options);
}

/// Writes `controlnet` as a diffusers folder that `load_controlnet` (and diffusers'
/// `ControlNetModel.from_pretrained`) reads: `config.json` and
/// `diffusion_pytorch_model.safetensors` (float32 unless the weights are another dtype), each
/// written atomically. Returns the folder.
inline std::filesystem::path save_controlnet(const std::filesystem::path& folder,
                                             const ControlNetModel& controlnet) {
  std::filesystem::create_directories(folder);
  auto config = controlnet->config.to_json();
  config["_class_name"] = "ControlNetModel";
  scedit::write_text_file((folder / "config.json").string(), config.dump(2) + "\n");
  scedit::TensorMap tensors;
  for (const auto& p : controlnet->named_parameters()) tensors[p.key()] = p.value().detach();
  scedit::safetensors::save((folder / "diffusion_pytorch_model.safetensors").string(), tensors);
  return folder;
}

}  // namespace sd
