#pragma once
/// @file lora_targets.hpp
/// @brief Where a LoRA file's keys land in a Stable Diffusion: the UNet (its modules also known
/// by their LDM names, as Kohya files from A1111's era and ComfyUI's generic keys spell them),
/// the CLIP text encoder (known to other tools under transformers' `text_model.` prefix, which
/// this CLIP's module paths lack) and SDXL's second text encoder (Kohya `lora_te2_…`, diffusers
/// `text_encoder_2.…`; its module paths are transformers' own, `text_model.…`).
///
/// Example:
/// @code
/// scedit::LoRAInjection unet_lora, text_lora, text_lora_2;
/// auto result = scedit::load_lora("style.safetensors",
///                                 sd::lora_targets(pipe, unet_lora, text_lora, text_lora_2));
/// @endcode

#include <sd/ldm_keys.hpp>
#include <sd/stable_diffusion.hpp>

#include <scedit/lora_io.hpp>

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

namespace sd {

/// The UNet's modules by their LDM names (`input_blocks.1.1.proj_in`,
/// `output_blocks.2.0.skip_connection`, ...) -> their module paths (diffusers' names), from the
/// weight keys of `ldm_unet_keys`: `model.diffusion_model.<ldm>.weight` <-> `<path>.weight`.
inline std::map<std::string, std::string> unet_lora_aliases(const UNetConfig& config) {
  const std::string prefix = kLdmUNetPrefix;
  const std::string weight = ".weight";
  auto strip = [&](const std::string& key, size_t head) {
    return key.substr(head, key.size() - head - weight.size());
  };
  std::map<std::string, std::string> aliases;
  for (const auto& pair : ldm_unet_keys(config)) {
    if (pair.ldm.size() <= prefix.size() + weight.size() ||
        pair.ldm.compare(pair.ldm.size() - weight.size(), weight.size(), weight) != 0) {
      continue;
    }
    const auto ldm = strip(pair.ldm, prefix.size());
    const auto path = strip(pair.diffusers, 0);
    if (ldm != path) aliases.emplace(ldm, path);
  }
  return aliases;
}

/// The text encoder's Linear layers by transformers' names (`text_model.encoder.layers.0.
/// self_attn.q_proj`) -> this CLIP's module paths (`encoder.layers.0.self_attn.q_proj`).
inline std::map<std::string, std::string> clip_lora_aliases(const torch::nn::Module& clip) {
  std::map<std::string, std::string> aliases;
  for (const auto& item : clip.named_modules("", /*include_self=*/false)) {
    if (std::dynamic_pointer_cast<torch::nn::LinearImpl>(item.value())) {
      aliases.emplace("text_model." + item.key(), item.key());
    }
  }
  return aliases;
}

/// The LoRA targets of `sd`, for `scedit::load_lora(file, targets)`: the UNet into `unet` (LDM
/// aliases), the text encoder into `text` (transformers' aliases) and, for SDXL, the second text
/// encoder into `text_2` (no aliases: its paths are transformers' names).
inline std::vector<scedit::LoRATarget> lora_targets(StableDiffusion& sd, scedit::LoRAInjection& unet,
                                                    scedit::LoRAInjection& text,
                                                    scedit::LoRAInjection& text_2) {
  TORCH_CHECK(!sd.unet.is_empty(), "lora_targets: the pipeline has no UNet");
  std::vector<scedit::LoRATarget> targets;
  targets.push_back({scedit::LoRARole::unet, &unet, sd.unet.get(), unet_lora_aliases(sd.unet_config)});
  if (!sd.text_encoder.is_empty()) {
    targets.push_back({scedit::LoRARole::text_encoder, &text, sd.text_encoder.get(),
                       clip_lora_aliases(*sd.text_encoder)});
  }
  if (!sd.text_encoder_2.is_empty()) {
    targets.push_back({scedit::LoRARole::text_encoder_2, &text_2, sd.text_encoder_2.get(), {}});
  }
  return targets;
}

}  // namespace sd
