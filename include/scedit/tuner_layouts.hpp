#pragma once
/// @file tuner_layouts.hpp
/// @brief The key layouts of SCEdit weights — this library's, scepter's and SWIFT's — told apart
/// by their key names, the config files that travel with them, and where a folder keeps them.
///
/// | layout | SC-Tuners | CSC-Tuner | config beside the weights |
/// |---|---|---|---|
/// | scedit  | `lsc_identity.{i}.tuner_op.ln{1,2}.*` | `pre_hint_blocks.*`, `dense_hint_blocks.{j}.1.*`, `lsc_tuner_blocks.{k}.tuner_op.*` | safetensors metadata + `<name>.json` |
/// | scepter | `model.lsc_identity.{i}.tuner_op.*` | the CSC keys after `0.`, `model.0.` or `model.` | `configuration.json` |
/// | swift   | `model.lsc_identity.{i}.scetuner_{adapter}.tuner_op.*` (`model.` optional) | — | `adapter_config.json` |
///
/// `i` is the skip site in decoder order; indices may have gaps (scepter's `USE_LAYERS`, a SWIFT
/// `target_modules` that leaves sites out): a missing index leaves its site alone. The facts
/// behind the table, with the files of scepter and SWIFT they come from, are in
/// docs/FILE_FORMATS.md.
///
/// Example:
/// @code
/// auto seen = scedit::detect_scedit_layout({"model.lsc_identity.3.tuner_op.ln1.weight"});
/// // seen.kind == TunerKind::kSC, seen.layout == SceditLayout::kScepter, seen.prefix == "model."
/// @endcode

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace scedit {

/// What a tuner file holds.
enum class TunerKind {
  kSC,       ///< SC-Tuners (`lsc_identity.*`).
  kCSC,      ///< One CSC-Tuner (`pre_hint_blocks.*`, ...).
  kLoRA,     ///< LoRA weights (peft, diffusers or Kohya layout; see lora_io.hpp).
  kUnknown,  ///< None of the above.
};

/// Whose key names a file of SCEdit weights uses.
enum class SceditLayout {
  kScedit,   ///< This library's: the module's own names, no prefix.
  kScepter,  ///< scepter's: `model.` before SC keys; `0.`, `model.0.` or `model.` before CSC keys.
  kSwift,    ///< SWIFT's SCETuning: `[model.]lsc_identity.{i}.scetuner_{adapter}.tuner_op.*`.
  kUnknown,  ///< No SCEdit keys.
};

/// "scedit", "scepter", "swift" or "unknown".
inline const char* layout_name(SceditLayout layout) {
  switch (layout) {
    case SceditLayout::kScedit: return "scedit";
    case SceditLayout::kScepter: return "scepter";
    case SceditLayout::kSwift: return "swift";
    case SceditLayout::kUnknown: break;
  }
  return "unknown";
}

/// What `detect_scedit_layout` saw in a list of keys.
struct SceditKeys {
  TunerKind kind = TunerKind::kUnknown;           ///< kSC, kCSC, or kUnknown (no SCEdit key).
  SceditLayout layout = SceditLayout::kUnknown;   ///< Whose names.
  std::string prefix;   ///< What comes before the module's names ("", "model.", "0.", "model.0.").
  std::string adapter;  ///< The SWIFT adapter name (`scetuner_{adapter}`); "" for the others.
  std::map<std::string, std::string> renamed;     ///< File key → this library's key.
  /// Keys that fit no tuner of the layout, prefix and adapter that the first SCEdit key set.
  std::vector<std::string> unmatched;

  /// E.g. "scepter layout of SC-Tuners (keys 'model.lsc_identity.{i}.tuner_op.*')".
  std::string name() const {
    if (kind == TunerKind::kUnknown) return "no SCEdit keys";
    std::string out = std::string(layout_name(layout)) + " layout of " +
                      (kind == TunerKind::kSC ? "SC-Tuners" : "a CSC-Tuner") + " (keys '" + prefix;
    if (kind == TunerKind::kCSC) return out + "pre_hint_blocks.*', ...)";
    out += "lsc_identity.{i}.";
    if (layout == SceditLayout::kSwift) out += "scetuner_" + adapter + ".";
    return out + "tuner_op.*')";
  }
};

namespace detail {

/// One key read as SCEdit's: its kind, layout, prefix, adapter and this library's name for it.
struct SceditKey {
  TunerKind kind = TunerKind::kUnknown;
  SceditLayout layout = SceditLayout::kUnknown;
  std::string prefix, adapter, ours;
};

inline std::optional<SceditKey> parse_scedit_key(const std::string& key) {
  static const std::regex sc(R"(^((?:model\.)?)lsc_identity\.(\d+)\.tuner_op\.(ln[12]\.(?:weight|bias))$)");
  static const std::regex swift(
      R"(^((?:model\.)?)lsc_identity\.(\d+)\.scetuner_([^.]+)\.tuner_op\.(ln[12]\.(?:weight|bias))$)");
  static const std::regex csc(
      R"(^((?:model\.)?(?:0\.)?)((?:pre_hint_blocks\.\d+|dense_hint_blocks\.\d+\.1|lsc_tuner_blocks\.\d+\.tuner_op\.ln[12])\.(?:weight|bias))$)");
  std::smatch m;
  SceditKey out;
  if (std::regex_match(key, m, sc)) {
    out.kind = TunerKind::kSC;
    out.prefix = m[1];
    out.layout = out.prefix.empty() ? SceditLayout::kScedit : SceditLayout::kScepter;
    out.ours = "lsc_identity." + m[2].str() + ".tuner_op." + m[3].str();
  } else if (std::regex_match(key, m, swift)) {
    out.kind = TunerKind::kSC;
    out.layout = SceditLayout::kSwift;
    out.prefix = m[1];
    out.adapter = m[3];
    out.ours = "lsc_identity." + m[2].str() + ".tuner_op." + m[4].str();
  } else if (std::regex_match(key, m, csc)) {
    out.kind = TunerKind::kCSC;
    out.prefix = m[1];
    out.layout = out.prefix.empty() ? SceditLayout::kScedit : SceditLayout::kScepter;
    out.ours = m[2];
  } else {
    return std::nullopt;
  }
  return out;
}

}  // namespace detail

/// The one place that decides which SCEdit layout `keys` are in: the first SCEdit key sets kind,
/// layout, prefix and adapter; every key is renamed to this library's names, and a key that fits
/// no tuner of that kind, layout, prefix and adapter is listed in `unmatched`. Keys with no SCEdit
/// key among them give `kind == TunerKind::kUnknown` (LoRA files, for example).
inline SceditKeys detect_scedit_layout(const std::vector<std::string>& keys) {
  SceditKeys out;
  for (const auto& key : keys) {
    const auto parsed = detail::parse_scedit_key(key);
    if (parsed && out.kind == TunerKind::kUnknown) {
      out.kind = parsed->kind;
      out.layout = parsed->layout;
      out.prefix = parsed->prefix;
      out.adapter = parsed->adapter;
    }
    if (parsed && parsed->kind == out.kind && parsed->layout == out.layout &&
        parsed->prefix == out.prefix && parsed->adapter == out.adapter) {
      out.renamed[key] = parsed->ours;
    } else {
      out.unmatched.push_back(key);
    }
  }
  if (out.kind == TunerKind::kUnknown) out.unmatched.clear();
  return out;
}

/// Where the weights of one set of SCEdit tuners are, and the config file that came with them.
struct SceditFiles {
  std::string weights;  ///< safetensors or torch.save file.
  std::string config;   ///< scepter's `configuration.json`, SWIFT's `adapter_config.json`, or "".
};

namespace detail {

inline nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "cannot open '", path, "'");
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "'", path, "' is not valid JSON: ", e.what());
  }
}

/// The SCEdit weights directly in `folder`: a SWIFT SCETuning adapter folder (`adapter_config.json`
/// with `swift_type` "SCETuning" + `adapter_model.{safetensors,bin}`) or a scepter folder
/// (`configuration.json` + `pytorch_model.{bin,safetensors}`).
inline std::optional<SceditFiles> scedit_files_in(const std::filesystem::path& folder) {
  auto first_file = [&](std::initializer_list<const char*> names) -> std::string {
    for (const char* name : names) {
      if (std::filesystem::is_regular_file(folder / name)) return (folder / name).string();
    }
    return "";
  };
  const auto adapter_config = folder / "adapter_config.json";
  if (std::filesystem::is_regular_file(adapter_config)) {
    const auto config = read_json_file(adapter_config.string());
    const auto weights = first_file({"adapter_model.safetensors", "adapter_model.bin"});
    if (config.is_object() && config.value("swift_type", "") == "SCETuning" && !weights.empty()) {
      return SceditFiles{weights, adapter_config.string()};
    }
    return std::nullopt;
  }
  const auto configuration = folder / "configuration.json";
  const auto weights = first_file({"pytorch_model.bin", "pytorch_model.safetensors"});
  if (std::filesystem::is_regular_file(configuration) && !weights.empty()) {
    return SceditFiles{weights, configuration.string()};
  }
  return std::nullopt;
}

}  // namespace detail

/// Where the SCEdit weights of `path` are. A file is its own weights; its config is the
/// `configuration.json` (scepter) or `adapter_config.json` (SWIFT) beside it when the file has
/// those tools' names (`pytorch_model.*`, `adapter_model.*`). A folder holds them itself or in
/// exactly one subfolder (scepter's control releases keep them in `0_SwiftSCETuning/`; a SWIFT
/// output folder has one subfolder per adapter, and adapters that are not SCETuning, such as a
/// text encoder's LoRA, are passed over). Empty when the folder holds none; throws, naming them,
/// when several subfolders do.
inline std::optional<SceditFiles> find_scedit_files(const std::string& path) {
  const std::filesystem::path p(path);
  if (!std::filesystem::is_directory(p)) {
    SceditFiles files{path, ""};
    const auto stem = p.stem().string();
    const auto config = p.parent_path() / (stem == "adapter_model" ? "adapter_config.json" : "configuration.json");
    if ((stem == "adapter_model" || stem == "pytorch_model") && std::filesystem::is_regular_file(config)) {
      files.config = config.string();
    }
    return files;
  }
  if (auto here = detail::scedit_files_in(p)) return here;
  std::vector<SceditFiles> found;
  std::vector<std::filesystem::path> subfolders;
  for (const auto& entry : std::filesystem::directory_iterator(p)) {
    if (entry.is_directory()) subfolders.push_back(entry.path());
  }
  std::sort(subfolders.begin(), subfolders.end());
  for (const auto& sub : subfolders) {
    if (auto files = detail::scedit_files_in(sub)) found.push_back(*files);
  }
  if (found.empty()) return std::nullopt;
  std::string names;
  for (const auto& files : found) names += " '" + files.weights + "'";
  TORCH_CHECK(found.size() == 1, "tuner folder '", path, "' holds several sets of SCEdit weights:", names,
              "; pass the folder of the one to use");
  return found.front();
}

}  // namespace scedit
