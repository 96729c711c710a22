#pragma once
/// @file lora_export.hpp
/// @brief Writing LoRA files: peft's adapter folder (`save_lora_peft`), Kohya's and diffusers'
/// single files of one model or several (`export_lora_kohya`, `export_lora_diffusers`); the
/// layouts are described in lora_formats.hpp and lora_io.hpp. Every file is written atomically.
///
/// Example:
/// @code
/// scedit::export_lora_kohya("style.safetensors", {{scedit::LoRARole::unet, &unet_lora},
///                                                 {scedit::LoRARole::text_encoder, &te_lora}});
/// @endcode

#include <scedit/atomic_file.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_formats.hpp>
#include <scedit/safetensors.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace scedit {

namespace detail {

/// The layers holding `adapter`, with the adapter's state; throws when none does.
inline std::vector<std::pair<std::string, std::shared_ptr<LoRALayer>>> lora_layers_with(
    const LoRALayers& layers, const std::string& adapter, const char* where) {
  std::vector<std::pair<std::string, std::shared_ptr<LoRALayer>>> out;
  for (const auto& e : layers.entries()) {
    if (e.second->has_adapter(adapter)) out.push_back(e);
  }
  TORCH_CHECK(!out.empty(), where, ": no layer has adapter '", adapter, "' (", layers.size(),
              " LoRA layers)");
  return out;
}

}  // namespace detail

/// Saves adapter `adapter` of `layers` as a peft adapter folder: `dir/adapter_model.safetensors`
/// (keys `{key_prefix}{path}.lora_A.weight` / `.lora_B.weight`; peft itself writes and expects
/// the prefix `base_model.model.`) and `dir/adapter_config.json` (`r` and `lora_alpha` of most
/// layers, `rank_pattern` / `alpha_pattern` for the others, `target_modules` = the full module
/// paths). Each file is written atomically; `dir` is created.
inline void save_lora_peft(const std::string& dir, const LoRALayers& layers,
                           const std::string& adapter = "default",
                           const std::string& key_prefix = "base_model.model.") {
  const auto held = detail::lora_layers_with(layers, adapter, "save_lora_peft");
  TensorMap tensors;
  std::map<int64_t, int> r_count;
  std::map<double, int> alpha_count;
  for (const auto& [path, layer] : held) {
    tensors[key_prefix + path + ".lora_A.weight"] = layer->lora_A_weight(adapter).detach();
    tensors[key_prefix + path + ".lora_B.weight"] = layer->lora_B_weight(adapter).detach();
    const auto& o = layer->adapter(adapter).options;
    ++r_count[o.r()];
    ++alpha_count[o.alpha()];
    TORCH_CHECK(o.use_rslora() == held.front().second->adapter(adapter).options.use_rslora(),
                "save_lora_peft: adapter '", adapter, "' mixes use_rslora across layers ('", path,
                "' differs from '", held.front().first, "'); peft's config cannot express that");
  }
  auto most = [](const auto& counts) {
    return std::max_element(counts.begin(), counts.end(),
                            [](const auto& a, const auto& b) { return a.second < b.second; })
        ->first;
  };
  const int64_t r = most(r_count);
  const double alpha = most(alpha_count);
  const auto& first = held.front().second->adapter(adapter).options;
  nlohmann::json rank_pattern = nlohmann::json::object(), alpha_pattern = nlohmann::json::object();
  nlohmann::json targets = nlohmann::json::array();
  for (const auto& [path, layer] : held) {
    const auto& o = layer->adapter(adapter).options;
    if (o.r() != r) rank_pattern[path] = o.r();
    if (o.alpha() != alpha) alpha_pattern[path] = o.alpha();
    targets.push_back(path);
  }
  nlohmann::json config = {
      {"peft_type", "LORA"},
      {"r", r},
      {"lora_alpha", alpha},
      {"lora_dropout", first.dropout()},
      {"use_rslora", first.use_rslora()},
      {"init_lora_weights",
       first.init() == LoRAInit::gaussian ? nlohmann::json("gaussian") : nlohmann::json(true)},
      {"target_modules", targets},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_dora", false},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
      {"task_type", nullptr},
      {"base_model_name_or_path", nullptr},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"revision", nullptr},
  };
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  TORCH_CHECK(!error, "save_lora_peft: cannot create folder '", dir, "': ", error.message());
  const std::filesystem::path folder(dir);
  safetensors::save((folder / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  write_text_file((folder / "adapter_config.json").string(), config.dump(2) + "\n");
}

namespace detail {

/// One model's layers as an export writes them: under `head`, module names as other tools know
/// them (`lora_tool_name`) unless `as_is`.
struct LoRAExportPart {
  std::string head;
  LoRARole role = LoRARole::unet;
  const LoRALayers* layers = nullptr;
  bool as_is = false;
};

/// The parts of a multi-model export, each model once, with its key prefix from `head_of`.
template <typename HeadOf>
std::vector<LoRAExportPart> lora_export_parts(const std::vector<LoRAPart>& parts,
                                              HeadOf head_of, const char* where) {
  TORCH_CHECK(!parts.empty(), where, ": no parts to write");
  std::vector<LoRAExportPart> out;
  std::set<LoRARole> seen;
  bool two_text = false;
  for (const auto& p : parts) two_text |= p.role == LoRARole::text_encoder_2;
  for (const auto& p : parts) {
    TORCH_CHECK(p.layers != nullptr, where, ": the ", lora_role_name(p.role), " part has no layers");
    TORCH_CHECK(seen.insert(p.role).second, where, ": two parts for the ", lora_role_name(p.role));
    out.push_back({head_of(p.role, two_text), p.role, p.layers, false});
  }
  return out;
}

/// Kohya's tensors: `{head}_{name, '.' as '_'}.lora_down.weight` (= A), `.lora_up.weight` (= B)
/// and `.alpha` (float32 scalar; alpha·√r for rsLoRA, so that alpha / r is the scale).
inline void lora_write_kohya(const std::string& file, const std::vector<LoRAExportPart>& parts,
                             const std::string& adapter) {
  TensorMap tensors;
  std::map<std::string, std::string> names;
  for (const auto& part : parts) {
    const std::string head = part.head.empty() ? "" : part.head + "_";
    for (const auto& [path, layer] :
         lora_layers_with(*part.layers, adapter, "export_lora_kohya")) {
      const std::string name =
          head + lora_underscored(part.as_is ? path : lora_tool_name(part.role, path));
      const auto [it, fresh] = names.emplace(name, path);
      TORCH_CHECK(fresh, "export_lora_kohya: '", path, "' and '", it->second,
                  "' share the Kohya name '", name, "'");
      const auto& o = layer->adapter(adapter).options;
      const double alpha =
          o.use_rslora() ? o.alpha() * std::sqrt(static_cast<double>(o.r())) : o.alpha();
      tensors[name + ".lora_down.weight"] = layer->lora_A_weight(adapter).detach();
      tensors[name + ".lora_up.weight"] = layer->lora_B_weight(adapter).detach();
      tensors[name + ".alpha"] = torch::scalar_tensor(alpha, torch::kFloat32);
    }
  }
  safetensors::save(file, tensors, {{"format", "pt"}});
}

/// diffusers' tensors `{head}.{name}.lora_A.weight` (= A) / `.lora_B.weight` (= scale · B) and
/// `lora_adapter_metadata`: per model its LoraConfig fields under `{head}.`, with lora_alpha = r
/// (the scale is in B) and rank_pattern / alpha_pattern for the modules of another rank.
inline void lora_write_diffusers(const std::string& file, const std::vector<LoRAExportPart>& parts,
                                 const std::string& adapter) {
  TensorMap tensors;
  nlohmann::json metadata = nlohmann::json::object();
  for (const auto& part : parts) {
    const std::string head = part.head.empty() ? "" : part.head + ".";
    const auto held = lora_layers_with(*part.layers, adapter, "export_lora_diffusers");
    std::map<int64_t, int> r_count;
    for (const auto& [path, layer] : held) ++r_count[layer->adapter(adapter).options.r()];
    const int64_t r = std::max_element(r_count.begin(), r_count.end(), [](auto& a, auto& b) {
                        return a.second < b.second;
                      })->first;
    nlohmann::json patterns = nlohmann::json::object(), targets = nlohmann::json::array();
    for (const auto& [path, layer] : held) {
      const std::string name = part.as_is ? path : lora_tool_name(part.role, path);
      const auto& o = layer->adapter(adapter).options;
      const auto b = layer->lora_B_weight(adapter).detach();
      tensors[head + name + ".lora_A.weight"] = layer->lora_A_weight(adapter).detach();
      tensors[head + name + ".lora_B.weight"] =
          (b.to(torch::kFloat64) * o.scale()).to(b.scalar_type());
      if (o.r() != r) patterns[name] = o.r();
      targets.push_back(name);
    }
    const nlohmann::json config = {
        {"r", r},           {"lora_alpha", r},        {"rank_pattern", patterns},
        {"alpha_pattern", patterns}, {"target_modules", targets}, {"use_rslora", false},
        {"use_dora", false}, {"lora_dropout", 0.0},   {"bias", "none"},
        {"init_lora_weights", true}, {"fan_in_fan_out", false}, {"peft_type", "LORA"},
    };
    for (const auto& [key, value] : config.items()) metadata[head + key] = value;
  }
  safetensors::save(file, tensors,
                    {{"format", "pt"}, {"lora_adapter_metadata", metadata.dump(2)}});
}

}  // namespace detail

/// Exports adapter `adapter` of several models as diffusers' `save_lora_weights` writes them
/// (see the file comment): `unet.<path>.lora_A.weight`, `text_encoder.text_model.<path>.…`,
/// `text_encoder_2.…`, and `lora_adapter_metadata`. diffusers' `load_lora_weights`, ComfyUI
/// and this library read it. Atomic.
inline void export_lora_diffusers(const std::string& file, const std::vector<LoRAPart>& parts,
                                  const std::string& adapter = "default") {
  detail::lora_write_diffusers(
      file,
      detail::lora_export_parts(
          parts, [](LoRARole role, bool) { return std::string(lora_role_name(role)); },
          "export_lora_diffusers"),
      adapter);
}

/// As `export_lora_diffusers(file, parts)` for one model's layers under key prefix `prefix`
/// (module paths as they are).
inline void export_lora_diffusers(const std::string& file, const LoRALayers& layers,
                                  const std::string& adapter = "default",
                                  const std::string& prefix = "unet") {
  detail::lora_write_diffusers(file, {{prefix, LoRARole::unet, &layers, true}}, adapter);
}

/// Exports adapter `adapter` of several models in Kohya's layout (sd-scripts' `networks/lora.py`):
/// `lora_unet_`, `lora_te_` for a single text encoder, `lora_te1_` / `lora_te2_` for two; text
/// encoders' modules named as transformers does (`text_model.encoder.…`). Atomic.
inline void export_lora_kohya(const std::string& file, const std::vector<LoRAPart>& parts,
                              const std::string& adapter = "default") {
  auto head = [](LoRARole role, bool two_text) -> std::string {
    if (role == LoRARole::unet) return "lora_unet";
    if (role == LoRARole::text_encoder_2) return "lora_te2";
    return two_text ? "lora_te1" : "lora_te";
  };
  detail::lora_write_kohya(file, detail::lora_export_parts(parts, head, "export_lora_kohya"),
                           adapter);
}

/// As `export_lora_kohya(file, parts)` for one model's layers under `prefix` (module paths as
/// they are).
inline void export_lora_kohya(const std::string& file, const LoRALayers& layers,
                              const std::string& adapter = "default",
                              const std::string& prefix = "lora_unet") {
  detail::lora_write_kohya(file, {{prefix, LoRARole::unet, &layers, true}}, adapter);
}

}  // namespace scedit
