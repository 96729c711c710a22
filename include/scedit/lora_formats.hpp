#pragma once
/// @file lora_formats.hpp
/// @brief The key layouts of LoRA files, as the tools that write and read them spell their keys,
/// and the one function that classifies a key (`classify_lora_key`): file detection
/// (`detect_tuner_file`) and loading (`load_lora`) both go through it.
///
/// The layouts, for a module `down_blocks.0.attentions.0.proj_in` of the UNet and
/// `text_model.encoder.layers.0.self_attn.q_proj` of the text encoder (transformers' names):
///
/// | format | UNet key | text-encoder key |
/// |---|---|---|
/// | Kohya (sd-scripts, `networks/lora.py`) | `lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`, `.lora_up.weight`, `.alpha` | `lora_te_text_model_encoder_layers_0_self_attn_q_proj.…` (`lora_te1_` / `lora_te2_` with two text encoders) |
/// | Kohya (LDM names), read by A1111 and ComfyUI | `lora_unet_input_blocks_1_1_proj_in.lora_down.weight` | as Kohya |
/// | diffusers (`save_lora_weights`, peft inside) | `unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`, `.lora_B.weight`; alphas in the header metadata `lora_adapter_metadata` | `text_encoder.text_model.….q_proj.lora_A.weight` (`text_encoder_2.` for the second) |
/// | diffusers (lora.down/up), before peft | `unet.<path>.lora.down.weight`, `.lora.up.weight` | `text_encoder.<path>.lora_linear_layer.down.weight` |
/// | diffusers (attention processors) | `unet.…attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`) | `text_encoder.….self_attn.to_q_lora.down.weight` (`to_q/k/v/out_lora` are `q/k/v/out_proj`) |
/// | peft (`save_pretrained`) | `base_model.model.<path>.lora_A.weight` (+ adapter_config.json) | the same on a text model |
/// | ComfyUI (generic keys) | `diffusion_model.input_blocks.1.1.proj_in.lora_up.weight` (LDM names, dots) | `text_encoders.clip_l.transformer.text_model.….lora_up.weight` (`clip_g` for the second) |
///
/// A module name is kept as the file spells it (Kohya's with its dots turned into underscores);
/// `load_lora` resolves it (`detail::LoRAResolver`) against the target model's module paths and
/// the names the target declares as aliases. LyCORIS (LoHa, LoKr, LoCon's Tucker `lora_mid`)
/// and DoRA keys are recognised in order to be refused by name. Also here: what a file says
/// about alphas (peft's adapter_config.json, diffusers' `lora_adapter_metadata`) and `LoRAPart`,
/// the writers' unit (lora_export.hpp).

#include <scedit/lora.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/tensor_file.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace scedit {

/// The model a LoRA key addresses, as the tools name it.
enum class LoRARole { unet, text_encoder, text_encoder_2 };

/// "unet", "text_encoder" or "text_encoder_2" (diffusers' component names, its key prefixes).
inline const char* lora_role_name(LoRARole role) {
  switch (role) {
    case LoRARole::unet: return "unet";
    case LoRARole::text_encoder: return "text_encoder";
    case LoRARole::text_encoder_2: return "text_encoder_2";
  }
  return "?";
}

/// Whether `role` is a text encoder (its tools name its modules as transformers does, under
/// `text_model.`).
inline bool lora_is_text_role(LoRARole role) { return role != LoRARole::unet; }

/// The key layouts of LoRA files (see the file comment for each one's keys).
enum class LoRAFormat {
  kohya,                ///< `lora_unet_` / `lora_te_` + underscored diffusers / transformers names.
  kohya_ldm,            ///< `lora_unet_` + underscored LDM names (`input_blocks_1_1_…`).
  diffusers,            ///< `unet.` / `text_encoder.` + `<path>.lora_A.weight`, metadata alphas.
  diffusers_legacy,     ///< `unet.<path>.lora.down.weight`, `text_encoder.….lora_linear_layer.…`.
  diffusers_processor,  ///< `….processor.to_q_lora.down.weight`, `self_attn.to_q_lora.…`.
  peft,                 ///< `[base_model.model.]<path>.lora_A.weight` (+ adapter_config.json).
  comfyui,              ///< `diffusion_model.<LDM path>.…`, `text_encoders.clip_l.transformer.…`.
};

/// "Kohya", "Kohya (LDM names)", "diffusers", "diffusers (lora.down/up)",
/// "diffusers (attention processors)", "peft" or "ComfyUI".
inline const char* lora_format_name(LoRAFormat format) {
  switch (format) {
    case LoRAFormat::kohya: return "Kohya";
    case LoRAFormat::kohya_ldm: return "Kohya (LDM names)";
    case LoRAFormat::diffusers: return "diffusers";
    case LoRAFormat::diffusers_legacy: return "diffusers (lora.down/up)";
    case LoRAFormat::diffusers_processor: return "diffusers (attention processors)";
    case LoRAFormat::peft: return "peft";
    case LoRAFormat::comfyui: return "ComfyUI";
  }
  return "?";
}

/// What one key of a LoRA file is.
struct LoRAKey {
  /// The key's part: LoRA's down (A) or up (B) weight, its alpha, a weight of a format this
  /// library does not read, or no LoRA key at all.
  enum class Part { down, up, alpha, unsupported, not_lora };
  Part part = Part::not_lora;            ///< What the key holds.
  LoRAFormat format = LoRAFormat::peft;  ///< The layout its name is in.
  LoRARole role = LoRARole::unet;        ///< The model it addresses.
  /// The module as the file names it (dots; Kohya's underscored), role prefix removed.
  std::string module;
  /// Whether `module` lost its dots (Kohya): it is matched against underscored paths.
  bool underscored = false;
  /// For `Part::unsupported`: the format, e.g. "LyCORIS LoHa (hada_w1_a)".
  std::string unsupported;
};

namespace detail {

inline bool lora_starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

inline bool lora_has_suffix(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// diffusers' attention-processor names -> module names: `….processor.to_q` -> `….to_q`
/// (`to_out` -> `to_out.0`) in the UNet, `self_attn.to_q` -> `self_attn.q_proj` in a text
/// encoder (the mapping of diffusers' `DIFFUSERS_OLD_TO_PEFT` / `UNET_TO_DIFFUSERS`).
inline std::string lora_processor_module(std::string name, LoRARole role) {
  const std::string processor = ".processor.";
  if (const auto at = name.find(processor); at != std::string::npos) {
    name.erase(at, processor.size() - 1);
  }
  const auto dot = name.rfind('.');
  const std::string head = dot == std::string::npos ? "" : name.substr(0, dot + 1);
  const std::string last = dot == std::string::npos ? name : name.substr(dot + 1);
  if (lora_is_text_role(role)) {
    static const std::map<std::string, std::string> text = {
        {"to_q", "q_proj"}, {"to_k", "k_proj"}, {"to_v", "v_proj"}, {"to_out", "out_proj"}};
    const auto it = text.find(last);
    return it == text.end() ? name : head + it->second;
  }
  return last == "to_out" ? head + "to_out.0" : name;
}

}  // namespace detail

/// Classifies one key of a LoRA file (see the file comment for the layouts). Keys of no LoRA
/// layout come back as `Part::not_lora`; LyCORIS and DoRA keys as `Part::unsupported`, naming
/// their format. A key without a role prefix addresses the UNet (peft's model-relative keys:
/// a text model's when its path starts with `text_model.`).
inline LoRAKey classify_lora_key(const std::string& key) {
  using detail::lora_has_suffix;
  using detail::lora_starts_with;
  LoRAKey out;
  // Formats recognised only to be refused, by their tensors' suffixes (LyCORIS: KohakuBlueleaf's
  // `lycoris/modules/{loha,lokr,locon}.py`, as ComfyUI's `comfy/lora.py` reads them; DoRA:
  // `dora_scale` in Kohya-style files, peft's `lora_magnitude_vector`).
  static const std::array<std::pair<const char*, const char*>, 16> refused = {{
      {".hada_w1_a", "LyCORIS LoHa"},   {".hada_w1_b", "LyCORIS LoHa"},
      {".hada_w2_a", "LyCORIS LoHa"},   {".hada_w2_b", "LyCORIS LoHa"},
      {".hada_t1", "LyCORIS LoHa"},     {".hada_t2", "LyCORIS LoHa"},
      {".lokr_w1", "LyCORIS LoKr"},     {".lokr_w2", "LyCORIS LoKr"},
      {".lokr_w1_a", "LyCORIS LoKr"},   {".lokr_w1_b", "LyCORIS LoKr"},
      {".lokr_w2_a", "LyCORIS LoKr"},   {".lokr_w2_b", "LyCORIS LoKr"},
      {".lokr_t2", "LyCORIS LoKr"},     {".lora_mid.weight", "LyCORIS LoCon with a Tucker core"},
      {".dora_scale", "DoRA"},          {".lora_magnitude_vector", "DoRA"},
  }};
  for (const auto& [suffix, format] : refused) {
    if (lora_has_suffix(key, suffix) ||
        key.find(std::string(suffix) + ".") != std::string::npos) {
      out.part = LoRAKey::Part::unsupported;
      out.unsupported = std::string(format) + " (" + std::string(suffix).substr(1) + ")";
      return out;
    }
  }
  // The suffix: which part, and which family of layouts.
  enum class Family { kohya, peft, legacy, processor, linear_layer };
  struct Suffix {
    const char* text;
    LoRAKey::Part part;
    Family family;
  };
  static const std::array<Suffix, 11> suffixes = {{
      {".lora_down.weight", LoRAKey::Part::down, Family::kohya},
      {".lora_up.weight", LoRAKey::Part::up, Family::kohya},
      {".lora_A.weight", LoRAKey::Part::down, Family::peft},
      {".lora_B.weight", LoRAKey::Part::up, Family::peft},
      {"_lora.down.weight", LoRAKey::Part::down, Family::processor},
      {"_lora.up.weight", LoRAKey::Part::up, Family::processor},
      {".lora_linear_layer.down.weight", LoRAKey::Part::down, Family::linear_layer},
      {".lora_linear_layer.up.weight", LoRAKey::Part::up, Family::linear_layer},
      {".lora.down.weight", LoRAKey::Part::down, Family::legacy},
      {".lora.up.weight", LoRAKey::Part::up, Family::legacy},
      {".alpha", LoRAKey::Part::alpha, Family::kohya},
  }};
  const Suffix* found = nullptr;
  for (const auto& s : suffixes) {
    if (lora_has_suffix(key, s.text)) {
      found = &s;
      break;
    }
  }
  if (found == nullptr) return out;
  std::string name = key.substr(0, key.size() - std::string(found->text).size());

  // The prefix: which model, and whether the names are underscored.
  struct Prefix {
    const char* text;
    LoRARole role;
    int kind;  // 0 Kohya (underscored), 1 diffusers, 2 ComfyUI, 3 peft
  };
  static const std::array<Prefix, 10> prefixes = {{
      {"lora_unet_", LoRARole::unet, 0},
      {"lora_te1_", LoRARole::text_encoder, 0},
      {"lora_te2_", LoRARole::text_encoder_2, 0},
      {"lora_te_", LoRARole::text_encoder, 0},
      {"unet.", LoRARole::unet, 1},
      {"text_encoder.", LoRARole::text_encoder, 1},
      {"text_encoder_2.", LoRARole::text_encoder_2, 1},
      {"diffusion_model.", LoRARole::unet, 2},
      {"text_encoders.clip_l.transformer.", LoRARole::text_encoder, 2},
      {"text_encoders.clip_g.transformer.", LoRARole::text_encoder_2, 2},
  }};
  int kind = 3;
  for (const auto& p : prefixes) {
    if (lora_starts_with(name, p.text)) {
      kind = p.kind;
      out.role = p.role;
      name = name.substr(std::string(p.text).size());
      break;
    }
  }
  if (kind == 3) {
    if (lora_starts_with(name, "base_model.model.")) name = name.substr(17);
    if (lora_starts_with(name, "text_model.")) out.role = LoRARole::text_encoder;
  }
  out.part = found->part;
  switch (kind) {
    case 0:
      out.underscored = true;
      out.format = out.role == LoRARole::unet &&
                           (lora_starts_with(name, "input_blocks_") ||
                            lora_starts_with(name, "middle_block_") ||
                            lora_starts_with(name, "output_blocks_"))
                       ? LoRAFormat::kohya_ldm
                       : LoRAFormat::kohya;
      break;
    case 2: out.format = LoRAFormat::comfyui; break;
    default:
      switch (found->family) {
        case Family::peft:
          out.format = kind == 1 ? LoRAFormat::diffusers : LoRAFormat::peft;
          break;
        case Family::processor: out.format = LoRAFormat::diffusers_processor; break;
        case Family::legacy:
        case Family::linear_layer: out.format = LoRAFormat::diffusers_legacy; break;
        case Family::kohya:  // `<name>.lora_down.weight` with dots: Kohya's suffixes, no prefix
          out.format = kind == 1 ? LoRAFormat::diffusers_legacy : LoRAFormat::kohya;
          out.underscored = kind != 1 && name.find('.') == std::string::npos;
          break;
      }
  }
  if (found->family == Family::processor) name = detail::lora_processor_module(name, out.role);
  out.module = name;
  return out;
}

/// What a file's keys say: per model, the format of its LoRA weights; the unsupported formats
/// and the keys of no LoRA layout. `classify_lora_key` on every key.
struct LoRAKeySummary {
  /// Per model, the formats of its weight keys (more than one: a mixed file).
  std::map<LoRARole, std::set<LoRAFormat>> formats;
  /// "LyCORIS LoHa (hada_w1_a)", ... with the first key of each.
  std::map<std::string, std::string> unsupported;
  /// Keys of no LoRA layout.
  std::vector<std::string> not_lora;

  /// Whether any key is a LoRA key (weights of a readable or of an unsupported format).
  bool any() const { return !formats.empty() || !unsupported.empty(); }

  /// E.g. "Kohya (unet, text_encoder)" or "diffusers (unet); Kohya (text_encoder)".
  std::string describe() const {
    std::map<std::string, std::vector<std::string>> by_format;
    std::vector<std::string> order;
    for (const auto& [role, set] : formats) {
      for (const auto format : set) {
        const std::string name = lora_format_name(format);
        if (!by_format.count(name)) order.push_back(name);
        by_format[name].push_back(lora_role_name(role));
      }
    }
    std::ostringstream out;
    for (size_t i = 0; i < order.size(); ++i) {
      out << (i ? "; " : "") << order[i] << " (";
      const auto& roles = by_format[order[i]];
      for (size_t j = 0; j < roles.size(); ++j) out << (j ? ", " : "") << roles[j];
      out << ")";
    }
    for (const auto& [format, key] : unsupported) {
      out << (out.tellp() > 0 ? "; " : "") << format << " (not supported)";
    }
    return out.str();
  }
};

/// Summarises the keys of a file (see `LoRAKeySummary`).
inline LoRAKeySummary summarize_lora_keys(const std::vector<std::string>& keys) {
  LoRAKeySummary summary;
  for (const auto& key : keys) {
    const auto k = classify_lora_key(key);
    switch (k.part) {
      case LoRAKey::Part::down:
      case LoRAKey::Part::up: summary.formats[k.role].insert(k.format); break;
      case LoRAKey::Part::alpha: break;
      case LoRAKey::Part::unsupported: summary.unsupported.emplace(k.unsupported, key); break;
      case LoRAKey::Part::not_lora: summary.not_lora.push_back(key); break;
    }
  }
  return summary;
}

/// One model's LoRA layers, for writing a file that holds several models.
struct LoRAPart {
  LoRARole role = LoRARole::unet;       ///< Which model (its key prefix in the file).
  const LoRALayers* layers = nullptr;   ///< Its layers, by module path.
};

namespace detail {

/// `a.b.c` -> `a_b_c` (Kohya names).
inline std::string lora_underscored(std::string path) {
  std::replace(path.begin(), path.end(), '.', '_');
  return path;
}

/// The name other tools give module `path` of a model in `role`: transformers puts a text
/// encoder's modules under `text_model.`.
inline std::string lora_tool_name(LoRARole role, const std::string& path) {
  return lora_is_text_role(role) && path.rfind("text_model.", 0) != 0 ? "text_model." + path
                                                                       : path;
}

/// peft's LoraConfig (adapter_config.json, or a model's part of diffusers'
/// `lora_adapter_metadata`), the parts that matter here.
struct LoRAPeftConfig {
  int64_t r = 0;
  double alpha = 8;
  bool use_rslora = false;
  double dropout = 0;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  /// alpha for module `path` (alpha_pattern first, matched as peft does: `(.*\.)?key$`).
  double alpha_for(const std::string& path) const {
    for (const auto& [pattern, value] : alpha_pattern) {
      if (std::regex_match(path, std::regex("(.*\\.)?(" + pattern + ")"))) return value;
    }
    return alpha;
  }
};

/// Checks and reads a LoraConfig as JSON; `source` names it in messages.
inline LoRAPeftConfig lora_peft_config_from(const nlohmann::json& j, const std::string& source) {
  LoRAPeftConfig config;
  try {
    if (j.contains("peft_type") && !j["peft_type"].is_null()) {
      TORCH_CHECK(j["peft_type"].get<std::string>() == "LORA", "load_lora: ", source,
                  " has peft_type '", j["peft_type"].get<std::string>(), "', expected 'LORA'");
    }
    TORCH_CHECK(!j.value("use_dora", false), "load_lora: ", source,
                " is a DoRA adapter (use_dora true), which is not supported");
    TORCH_CHECK(j.contains("lora_alpha") && j["lora_alpha"].is_number(), "load_lora: ", source,
                " has no numeric 'lora_alpha'");
    config.alpha = j["lora_alpha"].get<double>();
    config.r = j.value("r", int64_t{0});
    config.use_rslora = j.value("use_rslora", false);
    if (j.contains("lora_dropout") && j["lora_dropout"].is_number()) {
      config.dropout = j["lora_dropout"].get<double>();
    }
    if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object()) {
      for (const auto& [key, value] : j["alpha_pattern"].items()) {
        config.alpha_pattern.emplace_back(key, value.get<double>());
      }
    }
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "load_lora: ", source, ": bad field: ", e.what());
  }
  return config;
}

/// Reads and checks adapter_config.json.
inline LoRAPeftConfig lora_read_peft_config(const std::filesystem::path& path) {
  const std::string file = path.string();
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "load_lora_peft: cannot open '", file, "'");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "load_lora_peft: '", file, "' is not valid JSON: ", e.what());
  }
  return lora_peft_config_from(j, "'" + file + "'");
}

/// diffusers' `lora_adapter_metadata` of a safetensors file (null when absent): one JSON object,
/// each model's LoraConfig fields under `<model>.` (`unet.lora_alpha`, `text_encoder.r`, ...).
inline nlohmann::json lora_adapter_metadata(const std::string& file) {
  if (tensor_file_format(file) != TensorFileFormat::safetensors) return nullptr;
  const auto metadata = safetensors::load_metadata(file);
  const auto it = metadata.find("lora_adapter_metadata");
  if (it == metadata.end()) return nullptr;
  try {
    auto j = nlohmann::json::parse(it->second);
    TORCH_CHECK(j.is_object(), "load_lora: '", file, "': lora_adapter_metadata is no JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "load_lora: '", file, "': lora_adapter_metadata is not valid JSON: ",
                e.what());
  }
}

/// The LoraConfig of the model under `prefix` ("unet", ...; "" for unprefixed fields) in
/// diffusers' metadata, if it has one.
inline std::optional<LoRAPeftConfig> lora_metadata_config(const nlohmann::json& metadata,
                                                          const std::string& prefix,
                                                          const std::string& file) {
  if (!metadata.is_object()) return std::nullopt;
  nlohmann::json part = nlohmann::json::object();
  for (const auto& [key, value] : metadata.items()) {
    if (prefix.empty()) {
      if (key.find('.') == std::string::npos) part[key] = value;
    } else if (key.rfind(prefix + ".", 0) == 0) {
      part[key.substr(prefix.size() + 1)] = value;
    }
  }
  if (!part.contains("lora_alpha")) return std::nullopt;
  return lora_peft_config_from(
      part, "'" + file + "' (lora_adapter_metadata" + (prefix.empty() ? "" : " of " + prefix) + ")");
}

/// Equal shapes, or equal once trailing 1-sized dimensions are dropped (a 1×1 conv's
/// `[r, in, 1, 1]` against a Linear's `[r, in]`).
inline bool lora_shapes_fit(at::IntArrayRef got, const std::vector<int64_t>& expected) {
  auto trim = [](std::vector<int64_t> s) {
    while (s.size() > 1 && s.back() == 1) s.pop_back();
    return s;
  };
  return trim(got.vec()) == trim(expected);
}

/// The A and B shapes of rank r on a plain Linear / Conv2d module (nullopt for other modules).
inline std::optional<std::pair<std::vector<int64_t>, std::vector<int64_t>>> lora_module_shapes(
    const std::shared_ptr<torch::nn::Module>& module, int64_t r) {
  if (auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module)) {
    using T = LoRATraits<torch::nn::LinearImpl>;
    return std::make_pair(T::a_shape(T::options_of(*l), r), T::b_shape(T::options_of(*l), r));
  }
  if (auto c = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module)) {
    using T = LoRATraits<torch::nn::Conv2dImpl>;
    return std::make_pair(T::a_shape(T::options_of(*c), r), T::b_shape(T::options_of(*c), r));
  }
  return std::nullopt;
}

/// Where one model's keys go: its layers, and (to inject into) its injection and model.
struct LoRASink {
  LoRARole role = LoRARole::unet;
  const LoRALayers* layers = nullptr;
  LoRAInjection* injection = nullptr;
  torch::nn::Module* model = nullptr;
  const std::map<std::string, std::string>* aliases = nullptr;
};

/// Finds the module path a file's module name means in one model (see `LoRATarget::aliases`).
class LoRAResolver {
 public:
  LoRAResolver(const LoRASink& sink, const char* where) : sink_(&sink), where_(where) {}

  /// The module path `key.module` names, or "" when none can receive LoRA weights.
  std::string resolve(const LoRAKey& key) {
    if (key.underscored) {
      build();
      const auto it = underscored_.find(key.module);
      return it == underscored_.end() ? "" : it->second;
    }
    std::vector<std::string> candidates{key.module};
    if (sink_->aliases != nullptr) {
      const auto it = sink_->aliases->find(key.module);
      if (it != sink_->aliases->end()) candidates.push_back(it->second);
    }
    if (lora_is_text_role(sink_->role) && key.module.rfind("text_model.", 0) == 0) {
      candidates.push_back(key.module.substr(11));
    }
    for (const auto& c : candidates) {
      if (receives(c)) return c;
    }
    return "";
  }

  /// Whether module `path` is a LoRA layer here or a Linear / Conv2d of the model.
  bool receives(const std::string& path) const {
    if (sink_->layers->find(path) != nullptr) return true;
    if (sink_->model == nullptr || lora_in_adapter_path(path)) return false;
    const auto module = lora_find_module(*sink_->model, path);
    return module != nullptr && lora_module_shapes(module, 1).has_value();
  }

 private:
  void note(const std::string& name, const std::string& path) {
    const auto [it, fresh] = underscored_.emplace(name, path);
    TORCH_CHECK(fresh || it->second == path, where_, ": module paths '", it->second, "' and '",
                path, "' have the same Kohya name '", name, "'");
  }
  void build() {
    if (built_) return;
    built_ = true;
    std::vector<std::string> paths = sink_->layers->paths();
    if (sink_->model != nullptr) {
      for (const auto& item : sink_->model->named_modules("", false)) {
        if (!lora_in_adapter_path(item.key()) && lora_module_shapes(item.value(), 1))
          paths.push_back(item.key());
      }
    }
    for (const auto& p : paths) {
      note(lora_underscored(p), p);
      if (lora_is_text_role(sink_->role)) note(lora_underscored(lora_tool_name(sink_->role, p)), p);
    }
    if (sink_->aliases == nullptr) return;
    for (const auto& [name, path] : *sink_->aliases) {
      if (receives(path)) note(lora_underscored(name), path);
    }
  }

  const LoRASink* sink_;
  const char* where_;
  bool built_ = false;
  std::map<std::string, std::string> underscored_;
};

}  // namespace detail

}  // namespace scedit
