#pragma once
/// @file lora_io.hpp
/// @brief LoRA files: reading every layout of lora_formats.hpp into one or several models (the
/// UNet, its text encoders), writing Kohya's, diffusers' and peft's.
///
/// - **Kohya** (sd-scripts): `lora_unet_<path, dots as underscores>.lora_down.weight`,
///   `.lora_up.weight` and `.alpha` (scalar; scale = alpha / r; an rsLoRA adapter is written
///   with alpha·√r so the scale survives); text encoders under `lora_te_` (`lora_te1_` /
///   `lora_te2_` with two), their modules named as transformers does (`text_model.…`).
/// - **diffusers** (`save_lora_weights`): `unet.<path>.lora_A.weight` / `.lora_B.weight`,
///   `text_encoder.text_model.<path>.…`, and in the safetensors header `lora_adapter_metadata`:
///   JSON of each model's peft `LoraConfig` with the model's prefix on every field
///   (`"unet.r"`, `"unet.lora_alpha"`, `"unet.rank_pattern"`, …; diffusers'
///   `_pack_dict_with_prefix`). The export bakes each adapter's scale into B and writes
///   `lora_alpha` = r, so a reader that ignores the metadata (ComfyUI, A1111: scale 1) gets the
///   same weights as diffusers.
/// - **peft** (`PeftModel.save_pretrained`): `adapter_model.safetensors` with
///   `base_model.model.<path>.lora_A.weight` / `.lora_B.weight` and `adapter_config.json`.
///
/// Loading classifies every key (`classify_lora_key`), sends it to the target of its model
/// (`LoRATarget`), matches its module by path, by the target's aliases (LDM names, transformers'
/// names) or, for Kohya, by underscored path, and checks every shape and value (no NaN or Inf)
/// before changing anything; errors name the file and the key at fault. A key of no module, or
/// of a model no target was given for, is an error — or, with `lenient`, a warning and an entry
/// of `LoRALoadResult::ignored`. Saves are atomic.
///
/// Example:
/// @code
/// scedit::save_lora_peft("out/lora", injection);                      // peft folder
/// scedit::export_lora_kohya("out/style.safetensors", {{scedit::LoRARole::unet, &unet_lora},
///                                                     {scedit::LoRARole::text_encoder, &te_lora}});
/// scedit::LoRAInjection unet_lora2, te_lora2;
/// scedit::load_lora("out/style.safetensors",
///                   {{scedit::LoRARole::unet, &unet_lora2, unet.get()},
///                    {scedit::LoRARole::text_encoder, &te_lora2, clip.get()}});
/// @endcode

#include <scedit/atomic_file.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_formats.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/tensor_file.hpp>
#include <scedit/lora_export.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace scedit {

/// The LoRA file layout families (coarser than `LoRAFormat`).
enum class LoRALayout {
  /// `<path>.lora_A.weight` / `.lora_B.weight`: peft, and diffusers' current files.
  peft,
  /// diffusers before peft: `unet.<path>.lora.down.weight`, attention processors.
  diffusers,
  /// `.lora_down.weight` / `.lora_up.weight` / `.alpha`: Kohya, ComfyUI.
  kohya,
};

/// "peft", "diffusers" or "kohya".
inline const char* lora_layout_name(LoRALayout layout) {
  switch (layout) {
    case LoRALayout::peft: return "peft";
    case LoRALayout::diffusers: return "diffusers";
    case LoRALayout::kohya: return "kohya";
  }
  return "?";
}

/// The family of a format.
inline LoRALayout lora_layout_of(LoRAFormat format) {
  switch (format) {
    case LoRAFormat::peft: return LoRALayout::peft;
    case LoRAFormat::diffusers:
    case LoRAFormat::diffusers_legacy:
    case LoRAFormat::diffusers_processor: return LoRALayout::diffusers;
    case LoRAFormat::kohya:
    case LoRAFormat::kohya_ldm:
    case LoRAFormat::comfyui: return LoRALayout::kohya;
  }
  return LoRALayout::peft;
}

/// How `load_lora` / `load_lora_peft` read a file.
struct LoRALoadOptions {
  /// Adapter to fill (created on layers that lack it).
  TORCH_ARG(std::string, adapter_name) = "default";
  /// Key prefix of the file's own, e.g. "lora" for `lora.<path>.lora_A.weight` (the separator,
  /// '.' or '_', may be included or left out). Keys without it are skipped; after it, a key is
  /// read as if it had no prefix. Unset: every key is read.
  TORCH_ARG(std::optional<std::string>, prefix) = std::nullopt;
  /// alpha for every layer, overriding what the file and config say.
  TORCH_ARG(std::optional<double>, alpha) = std::nullopt;
  /// Skip, with a warning, the keys of no module of their target and those of models no target
  /// was given for (listed in `LoRALoadResult::ignored`), instead of refusing the file.
  TORCH_ARG(bool, lenient) = false;
};

/// A model that may receive a file's LoRA weights.
struct LoRATarget {
  LoRARole role = LoRARole::unet;  ///< The keys it takes.
  /// Receives the layers; injects into the plain Linear / Conv2d of `model` where needed.
  LoRAInjection* injection = nullptr;
  /// The model (null: only the layers `injection` holds already can receive weights).
  torch::nn::Module* model = nullptr;
  /// Other names of the model's modules (e.g. LDM `input_blocks.1.1.proj_in`, transformers'
  /// `text_model.encoder.layers.0.self_attn.q_proj`) -> the model's module path. Kohya names are
  /// matched underscored. For a text encoder, `text_model.<path>` finds `<path>` without one.
  std::map<std::string, std::string> aliases;
};

/// What a load did for one model.
struct LoRARoleResult {
  LoRARole role = LoRARole::unet;        ///< The model.
  LoRAFormat format = LoRAFormat::peft;  ///< The layout of its keys.
  std::vector<std::string> paths;        ///< Module paths that received weights, in file order.
  std::vector<std::string> created;      ///< Of those, where the adapter was created / injected.
};

/// What a load did.
struct LoRALoadResult {
  /// The layout family of the first model loaded (the UNet's when it has keys).
  LoRALayout layout = LoRALayout::peft;
  /// The format of the first model loaded (the UNet's when it has keys).
  LoRAFormat format = LoRAFormat::peft;
  /// Module paths that received weights (every model's, in file order).
  std::vector<std::string> paths;
  /// Of those, the paths where the adapter was created (or injected).
  std::vector<std::string> created;
  /// Per model that received weights, in role order.
  std::vector<LoRARoleResult> roles;
  /// Keys skipped under `lenient`.
  std::vector<std::string> ignored;

  /// The result for `role`, or nullptr when it received nothing.
  const LoRARoleResult* role(LoRARole r) const {
    for (const auto& x : roles) {
      if (x.role == r) return &x;
    }
    return nullptr;
  }

  /// E.g. "unet: 160 layers (Kohya (LDM names)); text_encoder: 72 layers (Kohya)".
  std::string describe() const {
    std::ostringstream out;
    for (size_t i = 0; i < roles.size(); ++i) {
      out << (i ? "; " : "") << lora_role_name(roles[i].role) << ": " << roles[i].paths.size()
          << " layers (" << lora_format_name(roles[i].format) << ")";
    }
    if (!ignored.empty()) out << (roles.empty() ? "" : "; ") << ignored.size() << " keys ignored";
    return out.str();
  }
};

namespace detail {

/// One adapted module's tensors in a file.
struct LoRAFileGroup {
  LoRAKey key;           // the down key's classification (module, role, format)
  std::string down_key;  // for messages
  std::string up_key;
  torch::Tensor down, up;
  std::optional<double> alpha;
  std::string alpha_key;
};

/// The loader behind every `load_lora` and `load_lora_peft`.
inline LoRALoadResult lora_load(const std::string& path, const std::vector<LoRASink>& sinks,
                                const LoRALoadOptions& options, bool peft_only) {
  namespace fs = std::filesystem;
  const char* where = peft_only ? "load_lora_peft" : "load_lora";
  fs::path file = path;
  std::optional<LoRAPeftConfig> config;
  if (fs::is_directory(file)) {
    const fs::path json = file / "adapter_config.json";
    if (fs::exists(json)) {
      config = lora_read_peft_config(json);
      file = file / "adapter_model.safetensors";
      if (!fs::exists(file) && fs::exists(file.parent_path() / "adapter_model.bin")) {
        file = file.parent_path() / "adapter_model.bin";
      }
    } else if (!peft_only && fs::exists(file / "pytorch_lora_weights.safetensors")) {
      file = file / "pytorch_lora_weights.safetensors";  // diffusers' save_lora_weights
    } else {
      TORCH_CHECK(false, where, ": missing '", json.string(),
                  "' (a peft adapter folder holds adapter_config.json and "
                  "adapter_model.safetensors",
                  peft_only ? "" : "; a diffusers one pytorch_lora_weights.safetensors", ")");
    }
  }
  TORCH_CHECK(fs::is_regular_file(file), where, ": no file '", file.string(), "'");
  const std::string file_name = file.string();
  const TensorMap tensors = load_tensor_file(file_name);
  check_finite(tensors, std::string(where) + ": '" + file_name + "'");
  const nlohmann::json metadata = lora_adapter_metadata(file_name);
  const std::string at_file = std::string(where) + ": file '" + file_name + "'";

  // Classify every key and group them by (model, module).
  using Id = std::pair<int, std::string>;
  std::map<Id, LoRAFileGroup> groups;
  std::vector<Id> order;
  std::vector<std::string> not_lora, ignored;
  for (const auto& [key, tensor] : tensors) {
    std::string rest = key;
    if (options.prefix() && !options.prefix()->empty()) {
      const std::string& p = *options.prefix();
      if (key.rfind(p, 0) != 0) continue;
      rest = key.substr(p.size());
      if (p.back() != '.' && p.back() != '_') {
        if (rest.empty() || (rest[0] != '.' && rest[0] != '_')) continue;
        rest = rest.substr(1);
      }
    }
    const LoRAKey k = classify_lora_key(rest);
    TORCH_CHECK(k.part != LoRAKey::Part::unsupported, at_file, ", key '", key, "': ",
                k.unsupported, " is not supported (only LoRA's down/up or A/B weights are)");
    if (k.part == LoRAKey::Part::not_lora) {
      not_lora.push_back(key);
      continue;
    }
    const Id id{static_cast<int>(k.role), k.module};
    auto it = groups.find(id);
    if (it == groups.end()) {
      order.push_back(id);
      it = groups.emplace(id, LoRAFileGroup{k, "", "", {}, {}, std::nullopt, ""}).first;
    }
    auto& g = it->second;
    if (k.part == LoRAKey::Part::down) {
      g.key = k;
      g.down = tensor;
      g.down_key = key;
    } else if (k.part == LoRAKey::Part::up) {
      if (!g.down.defined()) g.key = k;
      g.up = tensor;
      g.up_key = key;
    } else {
      TORCH_CHECK(tensor.numel() == 1, at_file, ", key '", key,
                  "': alpha must hold one value, got shape ", tensor.sizes());
      g.alpha = tensor.to(torch::kFloat64).item<double>();
      g.alpha_key = key;
    }
  }
  TORCH_CHECK(!order.empty(), at_file, " holds no LoRA keys (none ends in .lora_down.weight, "
              ".lora_A.weight, .lora.down.weight or _lora.down.weight; ", tensors.size(),
              " tensors, first '", tensors.empty() ? "" : tensors.begin()->first, "')");
  TORCH_CHECK(not_lora.empty() || options.lenient(), at_file, ", key '",
              not_lora.empty() ? "" : not_lora.front(), "' is no LoRA key of a known layout (",
              not_lora.size(), " such keys; LoRALoadOptions().lenient(true) skips them)");
  ignored = not_lora;

  // One format per model (Kohya's diffusers and LDM names may mix: `time_embed` is in both).
  std::map<int, LoRAFormat> formats;
  bool any_peft = false;
  for (const auto& id : order) {
    const auto& g = groups.at(id);
    TORCH_CHECK(g.down.defined() && g.up.defined(), at_file, ": '", g.key.module, "' has ",
                g.down.defined() ? g.down_key + " but no up/B key"
                : g.up.defined() ? g.up_key + " but no down/A key"
                                 : g.alpha_key + " (an alpha) but no weights");
    const auto [it, fresh] = formats.emplace(id.first, g.key.format);
    const bool kohyas = (it->second == LoRAFormat::kohya || it->second == LoRAFormat::kohya_ldm) &&
                        (g.key.format == LoRAFormat::kohya || g.key.format == LoRAFormat::kohya_ldm);
    if (!fresh && it->second != g.key.format && kohyas) it->second = LoRAFormat::kohya_ldm;
    TORCH_CHECK(fresh || kohyas || it->second == g.key.format, at_file, " mixes LoRA layouts for ",
                lora_role_name(g.key.role), ": ", lora_format_name(it->second), " and ",
                lora_format_name(g.key.format), " (key '", g.down_key, "')");
    TORCH_CHECK(!peft_only || g.key.format == LoRAFormat::peft, where, ": '", file_name,
                "' is in ", lora_format_name(g.key.format), "'s layout, not peft's; use load_lora");
    any_peft |= g.key.format == LoRAFormat::peft;
  }
  const auto bare = lora_metadata_config(metadata, "", file_name);
  if (any_peft && !config) {
    const fs::path json = file.parent_path() / "adapter_config.json";
    if (fs::exists(json)) config = lora_read_peft_config(json);
    TORCH_CHECK(config || bare || options.alpha(), where, ": no adapter_config.json beside '",
                file_name, "' (looked for '", json.string(),
                "'); pass LoRALoadOptions().alpha(...) to load the tensors alone");
  }
  std::map<int, std::optional<LoRAPeftConfig>> role_configs;  // diffusers' metadata, per model
  for (const auto& [role, format] : formats) {
    if (format == LoRAFormat::diffusers) {
      role_configs[role] = lora_metadata_config(
          metadata, lora_role_name(static_cast<LoRARole>(role)), file_name);
    }
  }

  struct Plan {
    const LoRAFileGroup* group;
    size_t sink;
    std::string path;
    std::shared_ptr<LoRALayer> layer;  // null: inject into `module`
    std::shared_ptr<torch::nn::Module> module;
    LoRAOptions options;
  };
  std::vector<Plan> plans;
  std::vector<LoRAResolver> resolvers;
  for (const auto& sink : sinks) resolvers.emplace_back(sink, where);
  const std::string& adapter = options.adapter_name();
  for (const auto& id : order) {
    const auto& g = groups.at(id);
    auto keys_of = [&](const LoRAFileGroup& x) {
      std::vector<std::string> keys{x.down_key, x.up_key};
      if (!x.alpha_key.empty()) keys.push_back(x.alpha_key);
      return keys;
    };
    size_t s = 0;
    while (s < sinks.size() && sinks[s].role != g.key.role) ++s;
    if (s == sinks.size()) {
      const auto count = std::count_if(order.begin(), order.end(),
                                       [&](const Id& other) { return other.first == id.first; });
      TORCH_CHECK(options.lenient(), at_file, ", key '", g.down_key, "' is a ",
                  lora_role_name(g.key.role), " LoRA key, but no ", lora_role_name(g.key.role),
                  " model was given (", count, " such modules; give a LoRATarget for it, or "
                  "LoRALoadOptions().lenient(true) to skip them)");
      for (const auto& k : keys_of(g)) ignored.push_back(k);
      continue;
    }
    const LoRASink& sink = sinks[s];
    const std::string module_path = resolvers[s].resolve(g.key);
    std::shared_ptr<LoRALayer> layer =
        module_path.empty() ? nullptr : sink.layers->find(module_path);
    std::shared_ptr<torch::nn::Module> module;
    if (layer == nullptr && !module_path.empty()) {
      module = lora_find_module(*sink.model, module_path);
      const std::string problem = lora_injection_problem(module);
      TORCH_CHECK(problem.empty(), at_file, ", key '", g.down_key, "': module '", module_path,
                  "' ", problem);
    }
    if (layer == nullptr && module == nullptr) {
      TORCH_CHECK(options.lenient(), at_file, ", key '", g.down_key, "' names module '",
                  g.key.module, "', which ",
                  sink.model != nullptr ? "is no Linear or Conv2d of the " +
                                              std::string(lora_role_name(sink.role)) + " model"
                                        : std::string("is not a LoRA layer here"),
                  " (", sink.layers->size(), " LoRA layers",
                  sink.layers->empty() ? std::string()
                                       : ", e.g. '" + sink.layers->entries().front().first + "'",
                  "; LoRALoadOptions().lenient(true) skips such keys)");
      for (const auto& k : keys_of(g)) ignored.push_back(k);
      continue;
    }
    TORCH_CHECK(g.down.dim() >= 2 && g.up.dim() >= 2, at_file, ", key '", g.down_key,
                "': LoRA weights need 2+ dimensions, got ", g.down.sizes(), " and ",
                g.up.sizes());
    const int64_t r = g.down.size(0);
    std::vector<int64_t> want_a, want_b;
    if (layer != nullptr && layer->has_adapter(adapter)) {
      TORCH_CHECK(!layer->adapter(adapter).merged, at_file, ", key '", g.down_key,
                  "': adapter '", adapter, "' is merged on '", module_path,
                  "'; unmerge it before loading");
      want_a = layer->lora_A_weight(adapter).sizes().vec();
      want_b = layer->lora_B_weight(adapter).sizes().vec();
    } else if (layer != nullptr) {
      want_a = layer->expected_A_shape(r);
      want_b = layer->expected_B_shape(r);
    } else {
      std::tie(want_a, want_b) = *lora_module_shapes(module, r);
    }
    TORCH_CHECK(lora_shapes_fit(g.down.sizes(), want_a), at_file, ", key '", g.down_key,
                "': shape ", g.down.sizes(), " does not fit LoRA A on '", module_path,
                "' (expected ", at::IntArrayRef(want_a), ")");
    TORCH_CHECK(lora_shapes_fit(g.up.sizes(), want_b), at_file, ", key '", g.up_key, "': shape ",
                g.up.sizes(), " does not fit LoRA B on '", module_path, "' (expected ",
                at::IntArrayRef(want_b), ")");
    // Scale: the option, the file's alpha, the model's config; else alpha = r (scale 1), as
    // every tool does for a file that says nothing.
    const LoRAPeftConfig* c = nullptr;
    if (g.key.format == LoRAFormat::peft) {
      c = config ? &*config : bare ? &*bare : nullptr;
    } else if (g.key.format == LoRAFormat::diffusers && role_configs[id.first]) {
      c = &*role_configs[id.first];
    }
    double alpha = static_cast<double>(r);
    if (options.alpha()) {
      alpha = *options.alpha();
    } else if (g.alpha) {
      alpha = *g.alpha;
    } else if (c != nullptr) {
      alpha = c->alpha_for(g.key.module);
    }
    LoRAOptions lora(r);
    lora.alpha(alpha).use_rslora(c != nullptr && c->use_rslora);
    if (config && c == &*config && layer != nullptr && layer->supports_dropout()) {
      lora.dropout(config->dropout);
    }
    plans.push_back({&g, s, module_path, layer, module, lora});
  }

  LoRALoadResult result;
  std::map<int, LoRARoleResult> per_role;
  for (auto& p : plans) {
    const LoRASink& sink = sinks[p.sink];
    auto& role = per_role[static_cast<int>(sink.role)];
    role.role = sink.role;
    role.format = formats.at(static_cast<int>(sink.role));
    if (p.layer == nullptr) {
      p.layer = sink.injection->inject_at(*sink.model, p.path, p.options, adapter);
      role.created.push_back(p.path);
      result.created.push_back(p.path);
    } else if (!p.layer->has_adapter(adapter)) {
      p.layer->add_adapter(adapter, p.options);
      role.created.push_back(p.path);
      result.created.push_back(p.path);
    } else {
      p.layer->set_adapter_alpha(adapter, p.options.alpha(), p.options.use_rslora());
    }
    {
      torch::NoGradGuard no_grad;
      auto a = p.layer->lora_A_weight(adapter);
      auto b = p.layer->lora_B_weight(adapter);
      a.copy_(p.group->down.reshape(a.sizes()));
      b.copy_(p.group->up.reshape(b.sizes()));
    }
    p.layer->refresh();
    role.paths.push_back(p.path);
    result.paths.push_back(p.path);
  }
  for (auto& [role, r] : per_role) result.roles.push_back(std::move(r));
  result.format = result.roles.empty() ? formats.begin()->second : result.roles.front().format;
  result.layout = lora_layout_of(result.format);
  result.ignored = std::move(ignored);
  if (!result.ignored.empty()) {
    std::ostringstream list;
    for (size_t i = 0; i < result.ignored.size() && i < 8; ++i) {
      list << (i ? ", " : "") << "'" << result.ignored[i] << "'";
    }
    if (result.ignored.size() > 8) list << ", ...";
    TORCH_WARN(at_file, ": ignored ", result.ignored.size(), " keys (no module or model for them): ",
               list.str());
  }
  return result;
}

}  // namespace detail

/// Loads a LoRA file (any layout of lora_formats.hpp; a peft or diffusers folder) into the
/// models of `targets`, each key into the target of its model (`LoRATarget`). Scale:
/// `options.alpha`, else the file's (Kohya's `.alpha`, peft's config, diffusers' metadata), else
/// 1 (alpha = r). Nothing changes on error.
///
/// Example:
/// @code
/// scedit::LoRAInjection unet_lora, text_lora;
/// auto result = scedit::load_lora("style.safetensors",
///     {{scedit::LoRARole::unet, &unet_lora, unet.get(), ldm_aliases},
///      {scedit::LoRARole::text_encoder, &text_lora, clip.get()}});
/// std::cout << result.describe() << "\n";  // unet: 160 layers (Kohya); text_encoder: 72 ...
/// @endcode
inline LoRALoadResult load_lora(const std::string& file_or_folder,
                                const std::vector<LoRATarget>& targets,
                                const LoRALoadOptions& options = {}) {
  std::vector<detail::LoRASink> sinks;
  for (const auto& t : targets) {
    TORCH_CHECK(t.injection != nullptr && t.model != nullptr, "load_lora: the ",
                lora_role_name(t.role), " target needs an injection and a model");
    for (const auto& s : sinks) {
      TORCH_CHECK(s.role != t.role, "load_lora: two targets for the ", lora_role_name(t.role));
    }
    sinks.push_back({t.role, t.injection, t.injection, t.model, &t.aliases});
  }
  return detail::lora_load(file_or_folder, sinks, options, false);
}

/// Loads a peft adapter (a folder with adapter_config.json, or an adapter_model.safetensors with
/// or without one beside it — then `options.alpha` is needed) into `layers`. Keys may carry
/// peft's `base_model.model.` and `options.prefix`. Layers lacking the adapter get it (rank from
/// the file); every key must name a layer of `layers`, with fitting shapes.
inline LoRALoadResult load_lora_peft(const std::string& dir_or_file, const LoRALayers& layers,
                                     const LoRALoadOptions& options = {}) {
  return detail::lora_load(dir_or_file, {{LoRARole::unet, &layers, nullptr, nullptr, nullptr}},
                           options, true);
}

/// As `load_lora_peft(dir_or_file, layers)`, injecting the adapter into the Linear / Conv2d of
/// `model` at every path the file names that `injection` does not hold yet.
inline LoRALoadResult load_lora_peft(const std::string& dir_or_file, LoRAInjection& injection,
                                     torch::nn::Module& model,
                                     const LoRALoadOptions& options = {}) {
  return detail::lora_load(dir_or_file, {{LoRARole::unet, &injection, &injection, &model, nullptr}},
                           options, true);
}

/// Loads a LoRA file of one model (its keys of other models are errors unless `lenient`) into
/// `layers`; see `load_lora(file, targets)`.
inline LoRALoadResult load_lora(const std::string& file, const LoRALayers& layers,
                                const LoRALoadOptions& options = {}) {
  return detail::lora_load(file, {{LoRARole::unet, &layers, nullptr, nullptr, nullptr}}, options,
                           false);
}

/// As `load_lora(file, layers)`, injecting into the Linear / Conv2d of `model` where needed:
/// the UNet-only form of `load_lora(file, targets)`.
///
/// Example:
/// @code
/// scedit::LoRAInjection lora;
/// scedit::load_lora("style_kohya.safetensors", lora, *unet);
/// @endcode
inline LoRALoadResult load_lora(const std::string& file, LoRAInjection& injection,
                                torch::nn::Module& model, const LoRALoadOptions& options = {}) {
  return detail::lora_load(file, {{LoRARole::unet, &injection, &injection, &model, nullptr}},
                           options, false);
}

}  // namespace scedit
