#pragma once
/// @file tuner_io.hpp
/// @brief Saving and loading SC- and CSC-Tuners, in this library's layout (the default), scepter's
/// or SWIFT's (tuner_layouts.hpp).
///
/// In this library's layout SC-Tuners are stored as `lsc_identity.{i}.tuner_op.ln{1,2}.*` (i = the
/// skip site, decoder order for a UNet), a CSC-Tuner as `pre_hint_blocks.*`,
/// `dense_hint_blocks.{j}.1.*` and `lsc_tuner_blocks.{k}.tuner_op.*`, in safetensors. The options
/// travel twice: in the file's metadata (`scedit.kind`, `scedit.options`), so one file is
/// self-describing, and in a JSON sidecar beside it (`tuners.safetensors` → `tuners.json`) for
/// people and tools. scepter's and SWIFT's files load too — safetensors or `torch.save` files
/// (`scedit::load_tensor_file`), or the folders those tools write — and can be written, with the
/// config file each tool writes beside its weights.
///
/// Example:
/// @code
/// auto tuners = scedit::attach_sc_tuners(*unet);
/// scedit::save_sc_tuners("style.safetensors", tuners);
/// scedit::save_sc_tuners("style/pytorch_model.bin", tuners,
///                        scedit::SCTunerSaveOptions().layout(scedit::SceditLayout::kScepter));
/// for (auto& [site, tuner] : scedit::read_sc_tuners("style")) { ... }  // each with its site
/// @endcode

#include <scedit/atomic_file.hpp>
#include <scedit/csctuner.hpp>
#include <scedit/lora_formats.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/tensor_file.hpp>
#include <scedit/tuner_layouts.hpp>

#include <nlohmann/json.hpp>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace scedit {

/// The JSON sidecar path of a tuner file: the same path with the extension `.json`.
inline std::string sidecar_path(const std::string& path) {
  return std::filesystem::path(path).replace_extension(".json").string();
}

namespace detail {

inline std::string strip_prefix(const std::string& key, const std::string& prefix) {
  return key.compare(0, prefix.size(), prefix) == 0 ? key.substr(prefix.size()) : std::string();
}

/// The tensors of `file` under `prefix` with the prefix removed.
inline TensorMap tensors_under(const TensorMap& file, const std::string& prefix) {
  TensorMap out;
  for (const auto& [key, value] : file) {
    std::string rest = strip_prefix(key, prefix);
    if (!rest.empty()) out[rest] = value;
  }
  return out;
}

/// SCEdit weights read from a file or folder, renamed to this library's keys.
struct SceditTensors {
  SceditFiles files;      ///< Where they came from.
  SceditKeys keys;        ///< The layout seen.
  TensorMap tensors;      ///< This library's key → tensor.
  nlohmann::json config;  ///< scedit: `scedit.options` metadata; scepter / SWIFT: their config file.
};

/// Reads the SCEdit weights of `path` (a file or a folder) under `prefix`, refusing (naming the
/// file) a file that holds no `kind` weights, a key that fits no tuner, and NaN or Inf.
inline SceditTensors read_scedit_tensors(const std::string& path, const std::string& prefix,
                                         TunerKind kind, const char* what) {
  SceditTensors out;
  TORCH_CHECK(std::filesystem::exists(path), what, ": tuner file '", path, "' does not exist");
  auto files = find_scedit_files(path);
  TORCH_CHECK(files.has_value(), what, ": folder '", path, "' holds no SCEdit weights (neither "
              "configuration.json + pytorch_model.bin from scepter nor a SWIFT SCETuning adapter)");
  out.files = *files;
  const auto& file = out.files.weights;
  const auto all = load_tensor_file(file);
  check_finite(all, "tuner file '" + file + "'");
  const auto mine = tensors_under(all, prefix);
  std::vector<std::string> names;
  for (const auto& item : mine) names.push_back(item.first);
  out.keys = detect_scedit_layout(names);
  const char* wanted = kind == TunerKind::kSC ? "SC-Tuners (lsc_identity.{i}.*)" : "CSC-Tuner (pre_hint_blocks.*, ...)";
  TORCH_CHECK(out.keys.kind == kind, what, ": tuner file '", file, "' holds no ", wanted,
              out.keys.kind == TunerKind::kUnknown ? "" : "; it holds the " + out.keys.name(),
              prefix.empty() ? "" : " under '" + prefix + "'");
  TORCH_CHECK(out.keys.unmatched.empty(), what, ": tuner file '", file, "': key '", prefix,
              out.keys.unmatched.front(), "' (shape ", mine.at(out.keys.unmatched.front()).sizes(),
              ") fits no tuner of the ", out.keys.name());
  for (const auto& [key, ours] : out.keys.renamed) out.tensors[ours] = mine.at(key);
  if (!out.files.config.empty()) {
    out.config = read_json_file(out.files.config);
  } else if (tensor_file_format(file) == TensorFileFormat::safetensors) {
    const auto metadata = safetensors::load_metadata(file);
    if (auto it = metadata.find("scedit.options"); it != metadata.end()) {
      try {
        out.config = nlohmann::json::parse(it->second);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, what, ": tuner file '", file, "': metadata 'scedit.options' is not valid JSON: ", e.what());
      }
    }
  }
  return out;
}

/// The site indices of `lsc_identity.{i}.*` keys, ascending.
inline std::vector<int64_t> sc_sites(const TensorMap& tensors) {
  std::set<int64_t> sites;
  for (const auto& item : tensors) {
    const auto& key = item.first;
    const auto dot = key.find('.', 13);  // after "lsc_identity."
    sites.insert(std::stoll(key.substr(13, dot - 13)));
  }
  return {sites.begin(), sites.end()};
}

/// Whether `path` names a `torch.save` file (`.bin`, `.pt`, `.pth`, `.ckpt`) rather than safetensors.
inline bool is_torch_save_name(const std::string& path) {
  const auto ext = std::filesystem::path(path).extension().string();
  return ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".ckpt";
}

/// Writes `tensors` to `path` atomically: a `torch.save` zip (a dict, as `torch.load` returns it)
/// where the name says so, else safetensors with `metadata`.
inline void write_tensors(const std::string& path, const TensorMap& tensors,
                          const std::map<std::string, std::string>& metadata) {
  const auto folder = std::filesystem::path(path).parent_path();
  if (!folder.empty()) std::filesystem::create_directories(folder);
  if (!is_torch_save_name(path)) {
    safetensors::save(path, tensors, metadata);
    return;
  }
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [key, value] : tensors) dict.insert(key, value.detach().cpu().contiguous());
  const auto bytes = torch::jit::pickle_save(dict);
  write_file_atomically(path, {{bytes.data(), bytes.size()}}, "saving '" + path + "': ");
}

/// The config file written beside `weights`: `name` in its folder.
inline void write_config_beside(const std::string& weights, const std::string& name, const nlohmann::json& config) {
  write_text_file((std::filesystem::path(weights).parent_path() / name).string(), config.dump(2) + "\n");
}

}  // namespace detail

/// The kind of tuner a file holds (safetensors or `torch.save`), judged from its metadata or its
/// key names: LoRA in any layout `classify_lora_key` knows (LyCORIS and DoRA included, so that
/// loading can refuse them by name), SCEdit layouts as `detect_scedit_layout` tells them.
/// `format`, when given, receives what was seen: for LoRA the formats per model
/// (`LoRAKeySummary::describe`, e.g. "Kohya (unet, text_encoder)"), for SCEdit the layout
/// (`SceditKeys::name`, e.g. "scepter layout of SC-Tuners (keys 'model.lsc_identity.{i}.tuner_op.*')").
inline TunerKind detect_tuner_file(const std::string& path, std::string* format = nullptr) {
  std::vector<std::string> keys;
  if (tensor_file_format(path) == TensorFileFormat::safetensors) {
    const auto metadata = safetensors::load_metadata(path);
    if (auto it = metadata.find("scedit.kind"); it != metadata.end()) {
      const bool sc = it->second == "sc_tuner", csc = it->second == "csc_tuner";
      if (format != nullptr && (sc || csc)) *format = "scedit layout (with its options)";
      if (sc) return TunerKind::kSC;
      if (csc) return TunerKind::kCSC;
    }
    const safetensors::File file(path);
    for (const auto& info : file.tensors()) keys.push_back(info.name);
  } else {
    for (const auto& item : load_tensor_file(path)) keys.push_back(item.first);
  }
  for (const auto& key : keys) {
    const auto part = classify_lora_key(key).part;
    if (part == LoRAKey::Part::down || part == LoRAKey::Part::up ||
        part == LoRAKey::Part::unsupported) {
      if (format != nullptr) *format = summarize_lora_keys(keys).describe();
      return TunerKind::kLoRA;
    }
  }
  const auto scedit = detect_scedit_layout(keys);
  if (format != nullptr && scedit.kind != TunerKind::kUnknown) *format = scedit.name();
  return scedit.kind;
}

/// How `save_sc_tuners` writes.
struct SCTunerSaveOptions {
  /// Whose key names and config file: this library's (safetensors + metadata + `<name>.json`),
  /// scepter's (`configuration.json` beside the file) or SWIFT's (`adapter_config.json` beside it).
  TORCH_ARG(SceditLayout, layout) = SceditLayout::kScedit;
  /// The skip site of each tuner, strictly increasing; empty: 0, 1, ... (one tuner per site).
  TORCH_ARG(std::vector<int64_t>, sites) = {};
  /// SWIFT's adapter name (`scetuner_{adapter_name}` in the keys). SWIFT keeps an adapter in a
  /// folder of that name; scepter names its first SWIFT adapter `0_SwiftSCETuning`.
  TORCH_ARG(std::string, adapter_name) = "default";
};

/// Saves SC-Tuners to `path`, tuner n at site `options.sites()[n]` (default n). The container
/// follows the name: `.bin` / `.pt` / `.pth` / `.ckpt` a `torch.save` zip, anything else
/// safetensors. scepter's and SWIFT's layouts keep neither per-tuner scales nor bias-free tuners
/// and one down_ratio for all; those are refused there. A SWIFT folder is read by SWIFT when the
/// file is `<adapter_name>/adapter_model.safetensors` (or `.bin`), a scepter one when it is
/// `pytorch_model.bin`.
inline void save_sc_tuners(const std::string& path, const std::vector<SCTuner>& tuners,
                           const SCTunerSaveOptions& options = {}) {
  TORCH_CHECK(!tuners.empty(), "save_sc_tuners: no tuners to save to '", path, "'");
  std::vector<int64_t> sites = options.sites();
  if (sites.empty()) {
    for (size_t i = 0; i < tuners.size(); ++i) sites.push_back(static_cast<int64_t>(i));
  }
  TORCH_CHECK(sites.size() == tuners.size(), "save_sc_tuners: ", sites.size(), " sites for ",
              tuners.size(), " tuners ('", path, "')");
  for (size_t n = 0; n < sites.size(); ++n) {
    TORCH_CHECK(sites[n] >= 0 && (n == 0 || sites[n] > sites[n - 1]), "save_sc_tuners: sites must be "
                "non-negative and strictly increasing, got ", sites[n], " at position ", n, " ('", path, "')");
  }
  const auto layout = options.layout();
  TORCH_CHECK(layout != SceditLayout::kUnknown, "save_sc_tuners: no layout given for '", path, "'");
  const auto& first = tuners.front()->options;
  if (layout != SceditLayout::kScedit) {
    for (size_t n = 0; n < tuners.size(); ++n) {
      const auto& o = tuners[n]->options;
      TORCH_CHECK(o.bias() && o.down_ratio() == first.down_ratio(), "save_sc_tuners: ",
                  layout_name(layout), "'s layout has one down_ratio for all tuners and always "
                  "biases; tuner ", n, " has down_ratio ", o.down_ratio(), " (tuner 0: ",
                  first.down_ratio(), ") and bias ", o.bias(), " ('", path, "')");
    }
  }
  const std::string before = layout == SceditLayout::kScedit ? "" : "model.";
  const std::string after = layout == SceditLayout::kSwift ? "scetuner_" + options.adapter_name() + "." : "";
  TensorMap tensors;
  nlohmann::json saved = nlohmann::json::array(), dims = nlohmann::json::array();
  std::string alternatives;
  for (size_t n = 0; n < tuners.size(); ++n) {
    const auto site = std::to_string(sites[n]);
    for (const auto& p : tuners[n]->named_parameters()) {
      tensors[before + "lsc_identity." + site + "." + after + p.key()] = p.value().detach();
    }
    const auto& o = tuners[n]->options;
    saved.push_back({{"site", sites[n]}, {"channels", o.channels()}, {"down_ratio", o.down_ratio()},
                     {"bias", o.bias()}, {"scale", o.scale()}});
    dims.push_back(o.channels());
    alternatives += (n ? "|" : "") + site;
  }
  switch (layout) {
    case SceditLayout::kScedit:
      detail::write_tensors(path, tensors, {{"format", "pt"}, {"scedit.kind", "sc_tuner"},
                                            {"scedit.options", saved.dump()}});
      write_text_file(sidecar_path(path), nlohmann::json{{"kind", "sc_tuner"}, {"options", saved}}.dump(2) + "\n");
      break;
    case SceditLayout::kScepter: {
      // LatentDiffusionSCETuning.save_pretrained_config: the TUNER_MODEL section.
      nlohmann::json config = {{"SC_TUNER_CFG", {{"NAME", "SCTuner"}, {"TUNER_NAME", "SCEAdapter"},
                                                 {"DOWN_RATIO", first.down_ratio()}}}};
      if (!options.sites().empty()) config["USE_LAYERS"] = sites;
      detail::write_tensors(path, tensors, {{"format", "pt"}});
      detail::write_config_beside(path, "configuration.json", config);
      break;
    }
    case SceditLayout::kSwift: {
      // SCETuningConfig as SwiftConfig.save_pretrained writes it (`model.` unescaped, as scepter's
      // configs spell it and its tuner loader looks for).
      nlohmann::json config = {{"swift_type", "SCETuning"}, {"model_key_mapping", nullptr},
                               {"dims", dims},
                               {"target_modules", "model.lsc_identity\\.(" + alternatives + ")$"},
                               {"hint_modules", nullptr}, {"tuner_mode", "identity"},
                               {"tuner_op", "SCEAdapter"}, {"down_ratio", first.down_ratio()}};
      detail::write_tensors(path, tensors, {{"format", "pt"}});
      detail::write_config_beside(path, "adapter_config.json", config);
      break;
    }
    case SceditLayout::kUnknown: break;
  }
}

/// Loads SC-Tuner weights from `path` (a file or folder, any layout) into `tuners`, tuner i from
/// site i's keys (strict: every tuner's keys must be there with the same shapes, and no others; a
/// NaN or Inf anywhere in the file is refused, naming the tensor). `prefix` selects keys (e.g. `"sc."`).
inline void load_sc_tuners(const std::string& path, std::vector<SCTuner>& tuners,
                           const std::string& prefix = "") {
  const auto read = detail::read_scedit_tensors(path, prefix, TunerKind::kSC, "load_sc_tuners");
  const auto& file = read.files.weights;
  for (size_t i = 0; i < tuners.size(); ++i) {
    const auto mine = detail::tensors_under(read.tensors, "lsc_identity." + std::to_string(i) + ".");
    TORCH_CHECK(!mine.empty(), "load_sc_tuners: '", file, "' has no tensors for tuner ", i, " (",
                read.keys.name(), ")");
    LoadOptions options;
    options.source = file + " [" + prefix + read.keys.prefix + "lsc_identity." + std::to_string(i) + "]";
    load_state_dict(*tuners[i], mine, options);
  }
  const auto sites = detail::sc_sites(read.tensors);
  TORCH_CHECK(sites.back() < static_cast<int64_t>(tuners.size()), "load_sc_tuners: '", file,
              "' holds a tuner for site ", sites.back(), " but only ", tuners.size(), " tuners were given");
}

/// One SC-Tuner read from a file and the skip site it edits (decoder order for a UNet).
struct SiteSCTuner {
  int64_t site = 0;          ///< `i` of its `lsc_identity.{i}` keys.
  SCTuner tuner{nullptr};    ///< The tuner, its weights loaded.
};

/// Creates the SC-Tuners of `path` — a file or folder in any layout — each with its site, in
/// ascending site order. Sites missing from the file (scepter's `USE_LAYERS`, a SWIFT adapter on
/// some sites) get no tuner. Options come from the file's metadata (this library's files) or from
/// the shapes. `prefix` selects keys (e.g. `"sc."`).
inline std::vector<SiteSCTuner> read_sc_tuners(const std::string& path, const std::string& prefix = "") {
  const auto read = detail::read_scedit_tensors(path, prefix, TunerKind::kSC, "read_sc_tuners");
  const auto& file = read.files.weights;
  if (read.keys.layout == SceditLayout::kSwift && read.config.is_object()) {
    const auto mode = read.config.value("tuner_mode", "identity");
    TORCH_CHECK(mode == "identity" || mode == "encoder", "read_sc_tuners: '", read.files.config,
                "' has tuner_mode '", mode, "'; only 'identity' and 'encoder' edit the skip itself");
  }
  std::vector<SiteSCTuner> out;
  const auto sites = detail::sc_sites(read.tensors);
  for (size_t n = 0; n < sites.size(); ++n) {
    const std::string ours = "lsc_identity." + std::to_string(sites[n]) + ".tuner_op.";
    const auto where = prefix + read.keys.prefix + "lsc_identity." + std::to_string(sites[n]) + "." +
                       (read.keys.adapter.empty() ? "" : "scetuner_" + read.keys.adapter + ".") + "tuner_op.";
    auto it = read.tensors.find(ours + "ln1.weight");
    TORCH_CHECK(it != read.tensors.end(), "read_sc_tuners: '", file, "' lacks key '", where, "ln1.weight'");
    TORCH_CHECK(it->second.dim() == 2, "read_sc_tuners: '", file, "' key '", where, "ln1.weight' has shape ",
                it->second.sizes(), ", expected [L, C]");
    SCTunerOptions o(it->second.size(1));
    o.down_ratio(static_cast<double>(it->second.size(0)) / static_cast<double>(it->second.size(1)));
    o.bias(read.tensors.count(ours + "ln1.bias") > 0);
    if (read.keys.layout == SceditLayout::kScedit && read.config.is_array() && n < read.config.size()) {
      o.down_ratio(read.config[n].value("down_ratio", o.down_ratio()));
      o.scale(read.config[n].value("scale", 1.0));
    }
    SiteSCTuner tuner{sites[n], SCTuner(o)};
    LoadOptions options;
    options.source = file + " [" + where + "*]";
    load_state_dict(*tuner.tuner, detail::tensors_under(read.tensors, "lsc_identity." + std::to_string(sites[n]) + "."),
                    options);
    out.push_back(std::move(tuner));
  }
  return out;
}

/// Saves a CSC-Tuner with its options: in this library's layout (safetensors + metadata + sidecar),
/// or scepter's (keys after `0.`, as scepter's `control_blocks` ModuleList saves them, and
/// `configuration.json` beside the file, as scepter's control releases have it). SWIFT has no
/// CSC-Tuner layout. A tuner that edits only some skips (`edited_skips`) has no scepter form.
inline void save_csc_tuner(const std::string& path, const CSCTuner& tuner,
                           SceditLayout layout = SceditLayout::kScedit) {
  const auto& o = tuner->options;
  TORCH_CHECK(layout == SceditLayout::kScedit || layout == SceditLayout::kScepter, "save_csc_tuner: ",
              layout_name(layout), " has no CSC-Tuner layout; use scedit's or scepter's ('", path, "')");
  TensorMap tensors;
  const std::string before = layout == SceditLayout::kScepter ? "0." : "";
  for (const auto& p : tuner->named_parameters()) tensors[before + p.key()] = p.value().detach();
  if (layout == SceditLayout::kScepter) {
    for (size_t k = 0; k < o.edited_skips().size(); ++k) {
      TORCH_CHECK(o.edited_skips()[k], "save_csc_tuner: the tuner leaves decoder skip ", k,
                  " alone, which scepter's layout cannot say ('", path, "')");
    }
    // CSCTuners' configuration (scepter's control releases wrap it in CONTROL_MODEL).
    nlohmann::json control = {{"NAME", "CSCTuners"}, {"PRE_HINT_IN_CHANNELS", o.in_channels()},
                              {"PRE_HINT_OUT_CHANNELS", o.hint_channels()},
                              {"PRE_HINT_DIM_RATIO", static_cast<double>(o.hint_ratio())},
                              {"DENSE_HINT_KERNAL", o.kernel_size()}, {"SCALE", o.scale()},
                              {"DOWN_RATIO", o.down_ratio()}, {"INPUT_BLOCK_CHANS", o.skip_channels()},
                              {"INPUT_DOWN_FLAG", o.down_flags()},
                              {"SC_TUNER_CFG", {{"NAME", "SCTuner"}, {"TUNER_NAME", "SCEAdapter"},
                                                {"DOWN_RATIO", o.down_ratio()}}}};
    detail::write_tensors(path, tensors, {{"format", "pt"}});
    detail::write_config_beside(path, "configuration.json", {{"CONTROL_MODEL", control}});
    return;
  }
  nlohmann::json options = {{"skip_channels", o.skip_channels()}, {"down_flags", o.down_flags()},
                            {"in_channels", o.in_channels()},     {"hint_ratio", o.hint_ratio()},
                            {"hint_channels", o.hint_channels()}, {"kernel_size", o.kernel_size()},
                            {"down_ratio", o.down_ratio()},       {"scale", o.scale()},
                            {"control_scale", o.control_scale()}};
  if (!o.edited_skips().empty()) options["edited_skips"] = o.edited_skips();
  detail::write_tensors(path, tensors, {{"format", "pt"}, {"scedit.kind", "csc_tuner"},
                                        {"scedit.options", options.dump()}});
  write_text_file(sidecar_path(path), nlohmann::json{{"kind", "csc_tuner"}, {"options", options}}.dump(2) + "\n");
}

/// Loads CSC-Tuner weights from `path` (a file or folder, this library's or scepter's layout; keys
/// under `prefix`) into `tuner`, strictly (a NaN or Inf anywhere in the file is refused, naming
/// the tensor).
inline void load_csc_tuner(const std::string& path, CSCTuner& tuner, const std::string& prefix = "") {
  const auto read = detail::read_scedit_tensors(path, prefix, TunerKind::kCSC, "load_csc_tuner");
  LoadOptions options;
  options.source = read.files.weights + (prefix.empty() && read.keys.prefix.empty()
                                             ? "" : " [" + prefix + read.keys.prefix + "*]");
  load_state_dict(*tuner, read.tensors, options);
}

/// Creates a CSC-Tuner from `path` (a file or folder, this library's or scepter's layout): options
/// from its metadata or scepter's `configuration.json`, else from the shapes plus `down_flags`
/// (encoder order), which shapes cannot tell. Index gaps (scepter's `USE_LAYERS`) are refused:
/// scepter puts an identity in the hint cascade there and cannot run its tuner blocks.
inline CSCTuner read_csc_tuner(const std::string& path, const std::string& prefix = "",
                               std::optional<std::vector<bool>> down_flags = std::nullopt) {
  const auto read = detail::read_scedit_tensors(path, prefix, TunerKind::kCSC, "read_csc_tuner");
  const auto& file = read.files.weights;
  const auto& all = read.tensors;
  const auto where = prefix + read.keys.prefix;
  auto shape_of = [&](const std::string& key) {
    auto it = all.find(key);
    TORCH_CHECK(it != all.end(), "read_csc_tuner: '", file, "' lacks key '", where, key, "'");
    return it->second.sizes().vec();
  };
  // The highest index of `block.{i}.` keys, or -1.
  auto last_index = [&](const std::string& block) {
    int64_t last = -1;
    for (const auto& item : all) {
      const auto rest = detail::strip_prefix(item.first, block);
      if (!rest.empty()) last = std::max<int64_t>(last, std::stoll(rest.substr(0, rest.find('.'))));
    }
    return last;
  };
  std::vector<int64_t> channels;
  int64_t kernel = 3;
  const auto dense = last_index("dense_hint_blocks.");
  for (int64_t i = 0; i <= dense; ++i) {
    TORCH_CHECK(all.count("dense_hint_blocks." + std::to_string(i) + ".1.weight"), "read_csc_tuner: '",
                file, "' lacks key '", where, "dense_hint_blocks.", i, ".1.weight' (it has block ", dense,
                "); a CSC-Tuner with scepter's USE_LAYERS gaps cannot be read");
    const auto shape = shape_of("dense_hint_blocks." + std::to_string(i) + ".1.weight");
    channels.push_back(shape[0]);
    kernel = shape[2];
  }
  TORCH_CHECK(!channels.empty(), "read_csc_tuner: '", file, "' holds no '", where, "dense_hint_blocks.{i}.1.weight' keys");
  for (size_t k = 0; k < channels.size(); ++k) {
    shape_of("lsc_tuner_blocks." + std::to_string(k) + ".tuner_op.ln1.weight");  // no gaps here either
  }
  TORCH_CHECK(last_index("lsc_tuner_blocks.") < static_cast<int64_t>(channels.size()), "read_csc_tuner: '",
              file, "' has lsc_tuner_blocks up to ", last_index("lsc_tuner_blocks."), " but ", channels.size(),
              " dense_hint_blocks");
  // The options that came with the file: ours in the metadata, scepter's CSCTuners configuration
  // (bare as training writes it, or in CONTROL_MODEL as the releases have it).
  nlohmann::json saved = read.keys.layout == SceditLayout::kScedit ? read.config : nlohmann::json();
  nlohmann::json scepter = read.keys.layout == SceditLayout::kScepter && read.config.is_object()
                               ? read.config.value("CONTROL_MODEL", read.config) : nlohmann::json();
  if (scepter.is_array() && scepter.size() == 1) scepter = scepter.front();
  if (scepter.is_object()) {
    TORCH_CHECK(!scepter.contains("USE_LAYERS") || scepter["USE_LAYERS"].is_null(), "read_csc_tuner: '",
                read.files.config, "' sets USE_LAYERS, which scepter's CSC-Tuners cannot run");
  }
  std::vector<bool> flags;
  if (saved.is_object()) {
    flags = saved.at("down_flags").get<std::vector<bool>>();
  } else if (scepter.is_object() && scepter.contains("INPUT_DOWN_FLAG")) {
    flags = scepter.at("INPUT_DOWN_FLAG").get<std::vector<bool>>();
  } else {
    TORCH_CHECK(down_flags.has_value(), "read_csc_tuner: '", file, "' has no scedit options; "
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
  } else if (scepter.is_object()) {
    o.down_ratio(scepter.value("DOWN_RATIO", o.down_ratio()));
    o.scale(scepter.value("SCALE", 1.0));
  }
  CSCTuner tuner(o);
  LoadOptions options;
  options.source = file + (where.empty() ? "" : " [" + where + "*]");
  load_state_dict(*tuner, all, options);
  return tuner;
}

}  // namespace scedit
