#pragma once
/// @file tuner_io.hpp
/// @brief Saving and loading SC- and CSC-Tuners with scepter's key names.
///
/// Files are safetensors. SC-Tuners are stored as `lsc_identity.{i}.tuner_op.ln{1,2}.*` (i in
/// site order, the decoder order for a UNet), a CSC-Tuner as `pre_hint_blocks.*`,
/// `dense_hint_blocks.{i}.1.*` and `lsc_tuner_blocks.{k}.tuner_op.*`. The options travel twice:
/// in the file's metadata (`scedit.kind`, `scedit.options`), so one file is self-describing,
/// and in a JSON sidecar beside it (`tuners.safetensors` → `tuners.json`) for people and tools.
/// Files written by scepter (no metadata, keys perhaps prefixed by `model.`) load too; a
/// CSC-Tuner's stride flags are then taken from the caller.

#include <scedit/atomic_file.hpp>
#include <scedit/csctuner.hpp>
#include <scedit/lora_formats.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/state_dict.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace scedit {

/// What a tuner file holds.
enum class TunerKind {
  kSC,       ///< SC-Tuners (`lsc_identity.*`).
  kCSC,      ///< One CSC-Tuner (`pre_hint_blocks.*`, ...).
  kLoRA,     ///< LoRA weights (any layout of lora_formats.hpp).
  kUnknown,  ///< None of the above.
};

/// The JSON sidecar path of a tuner file: the same path with the extension `.json`.
inline std::string sidecar_path(const std::string& path) {
  return std::filesystem::path(path).replace_extension(".json").string();
}

namespace detail {

inline std::string strip_prefix(const std::string& key, const std::string& prefix) {
  return key.compare(0, prefix.size(), prefix) == 0 ? key.substr(prefix.size()) : std::string();
}

/// The tensors of `file` under `prefix` with the prefix removed; a scepter `model.` prefix is
/// accepted on top of it.
inline TensorMap tensors_under(const TensorMap& file, const std::string& prefix) {
  TensorMap out;
  for (const auto& [key, value] : file) {
    std::string rest = strip_prefix(key, prefix);
    if (rest.empty()) continue;
    if (rest.rfind("model.", 0) == 0) rest = rest.substr(6);
    out[rest] = value;
  }
  return out;
}

/// The tensors of the tuner file at `path`, refused (naming the file and the tensor) where one
/// holds NaN or Inf.
inline TensorMap load_finite(const std::string& path) {
  auto tensors = safetensors::load(path);
  check_finite(tensors, "tuner file '" + path + "'");
  return tensors;
}

inline nlohmann::json options_json(const std::string& path, const std::string& key) {
  const auto metadata = safetensors::load_metadata(path);
  auto it = metadata.find(key);
  if (it == metadata.end()) return nullptr;
  try {
    return nlohmann::json::parse(it->second);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "tuner file '", path, "': metadata '", key, "' is not valid JSON: ", e.what());
  }
}

inline void save_with_sidecar(const std::string& path, const TensorMap& tensors,
                              const std::string& kind, const nlohmann::json& options) {
  safetensors::save(path, tensors,
                    {{"format", "pt"}, {"scedit.kind", kind}, {"scedit.options", options.dump()}});
  write_text_file(sidecar_path(path),
                  nlohmann::json{{"kind", kind}, {"options", options}}.dump(2) + "\n");
}

}  // namespace detail

/// The kind of tuner a safetensors file holds, judged from its metadata or its key names. For
/// LoRA (any layout `classify_lora_key` knows, LyCORIS and DoRA included so that loading can
/// refuse them by name), `lora_format`, when given, receives the formats seen
/// (`LoRAKeySummary::describe`, e.g. "Kohya (unet, text_encoder)").
inline TunerKind detect_tuner_file(const std::string& path, std::string* lora_format = nullptr) {
  const auto metadata = safetensors::load_metadata(path);
  if (auto it = metadata.find("scedit.kind"); it != metadata.end()) {
    if (it->second == "sc_tuner") return TunerKind::kSC;
    if (it->second == "csc_tuner") return TunerKind::kCSC;
  }
  safetensors::File file(path);
  for (const auto& info : file.tensors()) {
    const auto& key = info.name;
    const auto part = classify_lora_key(key).part;
    if (part == LoRAKey::Part::down || part == LoRAKey::Part::up ||
        part == LoRAKey::Part::unsupported) {
      if (lora_format != nullptr) {
        std::vector<std::string> keys;
        for (const auto& other : file.tensors()) keys.push_back(other.name);
        *lora_format = summarize_lora_keys(keys).describe();
      }
      return TunerKind::kLoRA;
    }
    if (key.find("pre_hint_blocks.") != std::string::npos) return TunerKind::kCSC;
    if (key.find("lsc_identity.") != std::string::npos) return TunerKind::kSC;
  }
  return TunerKind::kUnknown;
}

/// Saves SC-Tuners as `lsc_identity.{i}.tuner_op.*` (i = position in `tuners`) plus options.
inline void save_sc_tuners(const std::string& path, const std::vector<SCTuner>& tuners) {
  TORCH_CHECK(!tuners.empty(), "save_sc_tuners: no tuners to save to '", path, "'");
  TensorMap tensors;
  nlohmann::json options = nlohmann::json::array();
  for (size_t i = 0; i < tuners.size(); ++i) {
    for (const auto& p : tuners[i]->named_parameters()) {
      tensors["lsc_identity." + std::to_string(i) + "." + p.key()] = p.value().detach();
    }
    const auto& o = tuners[i]->options;
    options.push_back({{"channels", o.channels()}, {"down_ratio", o.down_ratio()},
                       {"bias", o.bias()}, {"scale", o.scale()}});
  }
  detail::save_with_sidecar(path, tensors, "sc_tuner", options);
}

/// Loads SC-Tuner weights from `path` into `tuners` (strict: every tuner's keys must be there
/// with the same shapes; a NaN or Inf anywhere in the file is refused, naming the tensor).
/// `prefix` selects keys (e.g. `"sc."`); scepter's `model.` is accepted.
inline void load_sc_tuners(const std::string& path, std::vector<SCTuner>& tuners,
                           const std::string& prefix = "") {
  const auto all = detail::tensors_under(detail::load_finite(path), prefix);
  for (size_t i = 0; i < tuners.size(); ++i) {
    const auto mine = detail::tensors_under(all, "lsc_identity." + std::to_string(i) + ".");
    TORCH_CHECK(!mine.empty(), "load_sc_tuners: '", path, "' has no tensors for tuner ", i,
                " (keys '", prefix, "lsc_identity.", i, ".*')");
    LoadOptions options;
    options.source = path + " [" + prefix + "lsc_identity." + std::to_string(i) + "]";
    load_state_dict(*tuners[i], mine, options);
  }
  const auto extra = detail::tensors_under(all, "lsc_identity." + std::to_string(tuners.size()) + ".");
  TORCH_CHECK(extra.empty(), "load_sc_tuners: '", path, "' holds more tuners than the ",
              tuners.size(), " given");
}

/// Creates SC-Tuners from a file: options from its metadata, or (scepter files) from the shapes.
inline std::vector<SCTuner> read_sc_tuners(const std::string& path, const std::string& prefix = "") {
  const auto all = detail::tensors_under(safetensors::load(path), prefix);
  const auto options = detail::options_json(path, "scedit.options");
  std::vector<SCTuner> tuners;
  for (size_t i = 0;; ++i) {
    const std::string key = "lsc_identity." + std::to_string(i) + ".tuner_op.ln1.weight";
    auto it = all.find(key);
    if (it == all.end()) break;
    TORCH_CHECK(it->second.dim() == 2, "read_sc_tuners: '", path, "' key ", prefix, key,
                " has shape ", it->second.sizes(), ", expected [L, C]");
    SCTunerOptions o(it->second.size(1));
    o.down_ratio(static_cast<double>(it->second.size(0)) / static_cast<double>(it->second.size(1)));
    o.bias(all.count("lsc_identity." + std::to_string(i) + ".tuner_op.ln1.bias") > 0);
    if (options.is_array() && i < options.size()) {
      o.down_ratio(options[i].value("down_ratio", o.down_ratio()));
      o.scale(options[i].value("scale", 1.0));
    }
    tuners.emplace_back(o);
  }
  TORCH_CHECK(!tuners.empty(), "read_sc_tuners: '", path, "' holds no '", prefix,
              "lsc_identity.{i}.tuner_op.ln1.weight' keys");
  load_sc_tuners(path, tuners, prefix);
  return tuners;
}

/// Saves a CSC-Tuner with scepter's keys plus its options.
inline void save_csc_tuner(const std::string& path, const CSCTuner& tuner) {
  TensorMap tensors;
  for (const auto& p : tuner->named_parameters()) tensors[p.key()] = p.value().detach();
  const auto& o = tuner->options;
  nlohmann::json options = {{"skip_channels", o.skip_channels()}, {"down_flags", o.down_flags()},
                            {"in_channels", o.in_channels()},     {"hint_ratio", o.hint_ratio()},
                            {"hint_channels", o.hint_channels()}, {"kernel_size", o.kernel_size()},
                            {"down_ratio", o.down_ratio()},       {"scale", o.scale()},
                            {"control_scale", o.control_scale()}};
  if (!o.edited_skips().empty()) options["edited_skips"] = o.edited_skips();
  detail::save_with_sidecar(path, tensors, "csc_tuner", options);
}

/// Loads CSC-Tuner weights from `path` (keys under `prefix`) into `tuner`, strictly (a NaN or
/// Inf anywhere in the file is refused, naming the tensor).
inline void load_csc_tuner(const std::string& path, CSCTuner& tuner, const std::string& prefix = "") {
  LoadOptions options;
  options.source = path + (prefix.empty() ? "" : " [" + prefix + "*]");
  load_state_dict(*tuner, detail::tensors_under(detail::load_finite(path), prefix), options);
}

/// Creates a CSC-Tuner from a file: options from its metadata, or (scepter files) from the
/// shapes plus `down_flags` (encoder order), which shapes cannot tell.
inline CSCTuner read_csc_tuner(const std::string& path, const std::string& prefix = "",
                               std::optional<std::vector<bool>> down_flags = std::nullopt) {
  const auto all = detail::tensors_under(safetensors::load(path), prefix);
  const auto saved = detail::options_json(path, "scedit.options");
  auto shape_of = [&](const std::string& key) {
    auto it = all.find(key);
    TORCH_CHECK(it != all.end(), "read_csc_tuner: '", path, "' lacks key '", prefix, key, "'");
    return it->second.sizes().vec();
  };
  std::vector<int64_t> channels;
  int64_t kernel = 3;
  for (size_t i = 0; all.count("dense_hint_blocks." + std::to_string(i) + ".1.weight"); ++i) {
    const auto shape = shape_of("dense_hint_blocks." + std::to_string(i) + ".1.weight");
    channels.push_back(shape[0]);
    kernel = shape[2];
  }
  TORCH_CHECK(!channels.empty(), "read_csc_tuner: '", path, "' holds no '", prefix,
              "dense_hint_blocks.{i}.1.weight' keys");
  std::vector<bool> flags;
  if (saved.is_object()) {
    flags = saved.at("down_flags").get<std::vector<bool>>();
  } else {
    TORCH_CHECK(down_flags.has_value(), "read_csc_tuner: '", path, "' has no scedit options; "
                "pass the model's skip down flags");
    flags = *down_flags;
  }
  CSCTunerOptions o(channels, flags);
  const auto first = shape_of("pre_hint_blocks.0.weight");
  o.in_channels(first[1]).hint_ratio(first[0] / 16).hint_channels(shape_of("pre_hint_blocks.12.weight")[0]);
  o.kernel_size(kernel);
  const auto mlp = shape_of("lsc_tuner_blocks.0.tuner_op.ln1.weight");
  o.down_ratio(static_cast<double>(mlp[0]) / static_cast<double>(mlp[1]));
  if (saved.is_object()) {
    o.down_ratio(saved.value("down_ratio", o.down_ratio()));
    o.scale(saved.value("scale", 1.0)).control_scale(saved.value("control_scale", 1.0));
    if (saved.contains("edited_skips")) o.edited_skips(saved.at("edited_skips").get<std::vector<bool>>());
  }
  CSCTuner tuner(o);
  load_csc_tuner(path, tuner, prefix);
  return tuner;
}

}  // namespace scedit
