#pragma once
/// @file lora_io.hpp
/// @brief LoRA files: peft's layout (save and load), diffusers' and Kohya's (export and load).
///
/// - **peft** (`PeftModel.save_pretrained`): `adapter_model.safetensors` with
///   `base_model.model.<path>.lora_A.weight` / `.lora_B.weight` (the adapter name stripped) and
///   `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`, ...). Scale from
///   the config (`alpha_pattern` / `rank_pattern` for layers that differ).
/// - **diffusers** (`unet.<path>.lora.down.weight` / `.lora.up.weight`): no alpha, so loaders use
///   scale 1; the export bakes the adapter's scale into `up`.
/// - **Kohya** (sd-scripts): `lora_unet_<path with dots as underscores>.lora_down.weight`,
///   `.lora_up.weight` and `.alpha` (scalar; scale = alpha / r; an rsLoRA adapter is written
///   with alpha·√r so the scale survives).
///
/// Loading detects the layout from the keys, matches each key to a LoRA layer by module path
/// and checks every shape and value (no NaN or Inf) before changing anything; errors name the
/// file and the key at fault.
/// Keys outside the prefix (a text encoder's, other tuners') are ignored. Saves are atomic.
///
/// Example:
/// @code
/// scedit::save_lora_peft("out/lora", injection);                      // peft folder
/// scedit::export_lora_kohya("out/style.safetensors", injection);      // for other tools
/// scedit::LoRAInjection loaded;
/// scedit::load_lora("out/style.safetensors", loaded, *unet);           // injects where named
/// @endcode

#include <scedit/atomic_file.hpp>
#include <scedit/lora.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace scedit {

/// The LoRA file layouts.
enum class LoRALayout {
  /// peft: `<path>.lora_A.weight` / `.lora_B.weight` (+ adapter_config.json).
  peft,
  /// diffusers: `unet.<path>.lora.down.weight` / `.lora.up.weight`.
  diffusers,
  /// Kohya: `lora_unet_<path_underscored>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
  kohya,
};

/// How `load_lora` / `load_lora_peft` read a file.
struct LoRALoadOptions {
  /// Adapter to fill (created on layers that lack it).
  TORCH_ARG(std::string, adapter_name) = "default";
  /// Key prefix before the module path, e.g. "lora" for `lora.<path>.lora_A.weight`; the layout's
  /// separator ('.' or Kohya's '_') may be included or left out. Unset: none for peft, "unet"
  /// for diffusers, "lora_unet" for Kohya. Keys without it are ignored.
  TORCH_ARG(std::optional<std::string>, prefix) = std::nullopt;
  /// alpha for every layer, overriding what the file and config say.
  TORCH_ARG(std::optional<double>, alpha) = std::nullopt;
};

/// What a load did.
struct LoRALoadResult {
  /// The layout found.
  LoRALayout layout = LoRALayout::peft;
  /// Module paths that received weights, in file order.
  std::vector<std::string> paths;
  /// Of those, the paths where the adapter was created (or injected).
  std::vector<std::string> created;
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

namespace detail {

/// Whether `s` ends with `suffix`.
inline bool lora_ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// `a.b.c` -> `a_b_c` (Kohya names).
inline std::string lora_underscored(std::string path) {
  std::replace(path.begin(), path.end(), '.', '_');
  return path;
}

/// One adapter's tensors in a file.
struct LoRAFileGroup {
  std::string name;      // module path (peft, diffusers) or Kohya name
  std::string down_key;  // for messages
  std::string up_key;
  torch::Tensor down, up;
  std::optional<double> alpha;
};

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

/// Finds the layout of `tensors` from its keys (exactly one must be present).
inline LoRALayout lora_detect_layout(const TensorMap& tensors, const std::string& file) {
  bool peft = false, diffusers = false, kohya = false;
  for (const auto& [key, value] : tensors) {
    peft |= lora_ends_with(key, ".lora_A.weight") || lora_ends_with(key, ".lora_B.weight");
    diffusers |= lora_ends_with(key, ".lora.down.weight") || lora_ends_with(key, ".lora.up.weight");
    kohya |= lora_ends_with(key, ".lora_down.weight") || lora_ends_with(key, ".lora_up.weight");
  }
  const int found = int(peft) + int(diffusers) + int(kohya);
  TORCH_CHECK(found > 0, "load_lora: file '", file,
              "' holds no LoRA keys (none ends in .lora_A.weight, "
              ".lora.down.weight or .lora_down.weight; ",
              tensors.size(), " tensors, first '", tensors.empty() ? "" : tensors.begin()->first,
              "')");
  TORCH_CHECK(found == 1, "load_lora: file '", file, "' mixes LoRA layouts (", peft ? "peft " : "",
              diffusers ? "diffusers " : "", kohya ? "kohya" : "", ")");
  return peft ? LoRALayout::peft : diffusers ? LoRALayout::diffusers : LoRALayout::kohya;
}

/// Groups the keys under `prefix` into one entry per adapted module.
inline std::vector<LoRAFileGroup> lora_file_groups(const TensorMap& tensors, LoRALayout layout,
                                                   const std::optional<std::string>& prefix,
                                                   const std::string& file) {
  const char sep = layout == LoRALayout::kohya ? '_' : '.';
  std::string head = prefix                            ? *prefix
                     : layout == LoRALayout::diffusers ? "unet"
                     : layout == LoRALayout::kohya     ? "lora_unet"
                                                       : "";
  if (!head.empty() && head.back() != sep) head += sep;
  const std::string down_suffix = layout == LoRALayout::peft        ? ".lora_A.weight"
                                  : layout == LoRALayout::diffusers ? ".lora.down.weight"
                                                                    : ".lora_down.weight";
  const std::string up_suffix = layout == LoRALayout::peft        ? ".lora_B.weight"
                                : layout == LoRALayout::diffusers ? ".lora.up.weight"
                                                                  : ".lora_up.weight";
  std::map<std::string, LoRAFileGroup> groups;
  std::vector<std::string> order;
  auto group = [&](const std::string& name) -> LoRAFileGroup& {
    auto it = groups.find(name);
    if (it == groups.end()) {
      order.push_back(name);
      it = groups.emplace(name, LoRAFileGroup{name, "", "", {}, {}, std::nullopt}).first;
    }
    return it->second;
  };
  for (const auto& [key, tensor] : tensors) {
    if (key.rfind(head, 0) != 0) continue;
    std::string rest = key.substr(head.size());
    if (layout == LoRALayout::peft && rest.rfind("base_model.model.", 0) == 0)
      rest = rest.substr(17);
    const auto strip = [&](const std::string& suffix) {
      return rest.substr(0, rest.size() - suffix.size());
    };
    if (lora_ends_with(rest, down_suffix)) {
      auto& g = group(strip(down_suffix));
      g.down = tensor;
      g.down_key = key;
    } else if (lora_ends_with(rest, up_suffix)) {
      auto& g = group(strip(up_suffix));
      g.up = tensor;
      g.up_key = key;
    } else if (layout != LoRALayout::peft && lora_ends_with(rest, ".alpha")) {
      TORCH_CHECK(tensor.numel() == 1, "load_lora: file '", file, "', key '", key,
                  "': alpha must hold one value, got shape ", tensor.sizes());
      group(strip(".alpha")).alpha = tensor.to(torch::kFloat64).item<double>();
    } else {
      TORCH_CHECK(false, "load_lora: file '", file, "', key '", key, "' is not a ",
                  lora_layout_name(layout), " LoRA key (expected <name>", down_suffix, ", <name>",
                  up_suffix, layout == LoRALayout::peft ? "" : " or <name>.alpha", ")");
    }
  }
  std::vector<LoRAFileGroup> out;
  for (const auto& name : order) {
    auto& g = groups.at(name);
    TORCH_CHECK(g.down.defined() && g.up.defined(), "load_lora: file '", file, "': '", name,
                "' has ",
                g.down.defined() ? g.down_key + " but no up/B key"
                : g.up.defined() ? g.up_key + " but no down/A key"
                                 : std::string("an alpha but no weights"));
    out.push_back(std::move(g));
  }
  TORCH_CHECK(!out.empty(), "load_lora: file '", file, "' has no ", lora_layout_name(layout),
              " LoRA keys under the prefix '", head, "'");
  return out;
}

/// peft's adapter_config.json, the parts that matter here.
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
  LoRAPeftConfig config;
  try {
    if (j.contains("peft_type") && !j["peft_type"].is_null()) {
      TORCH_CHECK(j["peft_type"].get<std::string>() == "LORA", "load_lora_peft: '", file,
                  "' has peft_type '", j["peft_type"].get<std::string>(), "', expected 'LORA'");
    }
    TORCH_CHECK(!j.value("use_dora", false), "load_lora_peft: '", file,
                "' is a DoRA adapter (use_dora true), which is not supported");
    TORCH_CHECK(j.contains("lora_alpha") && j["lora_alpha"].is_number(), "load_lora_peft: '", file,
                "' has no numeric 'lora_alpha'");
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
    TORCH_CHECK(false, "load_lora_peft: '", file, "': bad field: ", e.what());
  }
  return config;
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

/// The loader behind `load_lora` and `load_lora_peft`. `injection` and `model` may be null: then
/// only the layers of `layers` can receive weights.
inline LoRALoadResult lora_load(const std::string& path, const LoRALayers& layers,
                                LoRAInjection* injection, torch::nn::Module* model,
                                const LoRALoadOptions& options, bool peft_only) {
  namespace fs = std::filesystem;
  const char* where = peft_only ? "load_lora_peft" : "load_lora";
  fs::path file = path;
  std::optional<LoRAPeftConfig> config;
  if (fs::is_directory(file)) {
    const fs::path json = file / "adapter_config.json";
    file = file / "adapter_model.safetensors";
    TORCH_CHECK(fs::exists(json), where, ": missing '", json.string(), "' (a peft adapter folder ",
                "holds adapter_config.json and adapter_model.safetensors)");
    config = lora_read_peft_config(json);
  }
  TORCH_CHECK(fs::is_regular_file(file), where, ": no file '", file.string(), "'");
  const std::string file_name = file.string();
  const TensorMap tensors = safetensors::load(file_name);
  check_finite(tensors, std::string(where) + ": '" + file_name + "'");
  const LoRALayout layout = lora_detect_layout(tensors, file_name);
  TORCH_CHECK(!peft_only || layout == LoRALayout::peft, where, ": '", file_name, "' is in ",
              lora_layout_name(layout), "'s layout, not peft's; use load_lora");
  if (layout == LoRALayout::peft && !config) {
    const fs::path json = file.parent_path() / "adapter_config.json";
    if (fs::exists(json)) config = lora_read_peft_config(json);
    TORCH_CHECK(config || options.alpha(), where, ": no adapter_config.json beside '", file_name,
                "' (looked for '", json.string(),
                "'); pass LoRALoadOptions().alpha(...) to load the "
                "tensors alone");
  }
  const auto groups = lora_file_groups(tensors, layout, options.prefix(), file_name);

  // Kohya names lose the dots: map them back through the known module paths.
  std::map<std::string, std::string> kohya_paths;
  if (layout == LoRALayout::kohya) {
    auto note = [&](const std::string& p) {
      auto [it, fresh] = kohya_paths.emplace(lora_underscored(p), p);
      TORCH_CHECK(fresh || it->second == p, where, ": module paths '", it->second, "' and '", p,
                  "' have the same Kohya name '", it->first, "'");
    };
    for (const auto& e : layers.entries()) note(e.first);
    if (model != nullptr) {
      for (const auto& item : model->named_modules("", false)) {
        if (!lora_in_adapter_path(item.key()) && lora_module_shapes(item.value(), 1))
          note(item.key());
      }
    }
  }

  struct Plan {
    const LoRAFileGroup* group;
    std::string path;
    std::shared_ptr<LoRALayer> layer;  // null: inject into `module`
    std::shared_ptr<torch::nn::Module> module;
    LoRAOptions options;
  };
  std::vector<Plan> plans;
  const std::string& adapter = options.adapter_name();
  for (const auto& g : groups) {
    std::string module_path = g.name;
    if (layout == LoRALayout::kohya) {
      const auto it = kohya_paths.find(g.name);
      module_path = it == kohya_paths.end() ? "" : it->second;
    }
    std::shared_ptr<LoRALayer> layer = module_path.empty() ? nullptr : layers.find(module_path);
    std::shared_ptr<torch::nn::Module> module;
    if (layer == nullptr && model != nullptr && !module_path.empty()) {
      module = lora_find_module(*model, module_path);
      if (module != nullptr &&
          (lora_in_adapter_path(module_path) || !lora_module_shapes(module, 1))) {
        module = nullptr;
      }
      if (module != nullptr) {
        const std::string problem = lora_injection_problem(module);
        TORCH_CHECK(problem.empty(), where, ": file '", file_name, "', key '", g.down_key,
                    "': module '", module_path, "' ", problem);
      }
    }
    TORCH_CHECK(
        layer != nullptr || module != nullptr, where, ": file '", file_name, "', key '", g.down_key,
        "' names module '", module_path.empty() ? g.name : module_path, "', which ",
        model != nullptr ? "is no Linear or Conv2d of the model" : "is not a LoRA layer here", " (",
        layers.size(), " LoRA layers",
        layers.empty() ? std::string() : ", e.g. '" + layers.entries().front().first + "'", ")");
    TORCH_CHECK(g.down.dim() >= 2 && g.up.dim() >= 2, where, ": file '", file_name, "', key '",
                g.down_key, "': LoRA weights need 2+ dimensions, got ", g.down.sizes(), " and ",
                g.up.sizes());
    const int64_t r = g.down.size(0);
    std::vector<int64_t> want_a, want_b;
    if (layer != nullptr && layer->has_adapter(adapter)) {
      TORCH_CHECK(!layer->adapter(adapter).merged, where, ": file '", file_name, "', key '",
                  g.down_key, "': adapter '", adapter, "' is merged on '", module_path,
                  "'; unmerge it before loading");
      want_a = layer->lora_A_weight(adapter).sizes().vec();
      want_b = layer->lora_B_weight(adapter).sizes().vec();
    } else if (layer != nullptr) {
      want_a = layer->expected_A_shape(r);
      want_b = layer->expected_B_shape(r);
    } else {
      std::tie(want_a, want_b) = *lora_module_shapes(module, r);
    }
    TORCH_CHECK(lora_shapes_fit(g.down.sizes(), want_a), where, ": file '", file_name, "', key '",
                g.down_key, "': shape ", g.down.sizes(), " does not fit LoRA A on '", module_path,
                "' (expected ", at::IntArrayRef(want_a), ")");
    TORCH_CHECK(lora_shapes_fit(g.up.sizes(), want_b), where, ": file '", file_name, "', key '",
                g.up_key, "': shape ", g.up.sizes(), " does not fit LoRA B on '", module_path,
                "' (expected ", at::IntArrayRef(want_b), ")");
    double alpha = static_cast<double>(r);  // diffusers and Kohya without alpha: scale 1
    if (options.alpha()) {
      alpha = *options.alpha();
    } else if (g.alpha) {
      alpha = *g.alpha;
    } else if (config) {
      alpha = config->alpha_for(module_path);
    }
    LoRAOptions lora(r);
    lora.alpha(alpha).use_rslora(config && config->use_rslora);
    if (config && layer != nullptr && layer->supports_dropout()) lora.dropout(config->dropout);
    plans.push_back({&g, module_path, layer, module, lora});
  }

  LoRALoadResult result;
  result.layout = layout;
  for (auto& p : plans) {
    if (p.layer == nullptr) {
      p.layer = injection->inject_at(*model, p.path, p.options, adapter);
      result.created.push_back(p.path);
    } else if (!p.layer->has_adapter(adapter)) {
      p.layer->add_adapter(adapter, p.options);
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
    result.paths.push_back(p.path);
  }
  return result;
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

/// Exports adapter `adapter` in diffusers' layout: `{prefix}.{path}.lora.down.weight` (= A) and
/// `.lora.up.weight` (= s · B: the scale is baked in, as diffusers applies none). Atomic.
inline void export_lora_diffusers(const std::string& file, const LoRALayers& layers,
                                  const std::string& adapter = "default",
                                  const std::string& prefix = "unet") {
  const std::string head = prefix.empty() ? "" : prefix + ".";
  TensorMap tensors;
  for (const auto& [path, layer] :
       detail::lora_layers_with(layers, adapter, "export_lora_diffusers")) {
    const auto b = layer->lora_B_weight(adapter).detach();
    const double scale = layer->adapter(adapter).options.scale();
    tensors[head + path + ".lora.down.weight"] = layer->lora_A_weight(adapter).detach();
    tensors[head + path + ".lora.up.weight"] = (b.to(torch::kFloat64) * scale).to(b.scalar_type());
  }
  safetensors::save(file, tensors, {{"format", "pt"}});
}

/// Exports adapter `adapter` in Kohya's layout: `{prefix}_{path, '.' as '_'}.lora_down.weight`
/// (= A), `.lora_up.weight` (= B) and `.alpha` (float32 scalar; alpha·√r for rsLoRA, so that
/// Kohya's alpha / r is the adapter's scale). Atomic.
inline void export_lora_kohya(const std::string& file, const LoRALayers& layers,
                              const std::string& adapter = "default",
                              const std::string& prefix = "lora_unet") {
  const std::string head = prefix.empty() ? "" : prefix + "_";
  TensorMap tensors;
  std::map<std::string, std::string> names;
  for (const auto& [path, layer] : detail::lora_layers_with(layers, adapter, "export_lora_kohya")) {
    const std::string name = head + detail::lora_underscored(path);
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
  safetensors::save(file, tensors, {{"format", "pt"}});
}

/// Loads a peft adapter (a folder with adapter_config.json, or an adapter_model.safetensors with
/// or without one beside it — then `options.alpha` is needed) into `layers`. Keys may carry
/// peft's `base_model.model.` and `options.prefix`. Layers lacking the adapter get it (rank from
/// the file); every key must name a layer of `layers`, with fitting shapes.
inline LoRALoadResult load_lora_peft(const std::string& dir_or_file, const LoRALayers& layers,
                                     const LoRALoadOptions& options = {}) {
  return detail::lora_load(dir_or_file, layers, nullptr, nullptr, options, true);
}

/// As `load_lora_peft(dir_or_file, layers)`, injecting the adapter into the Linear / Conv2d of
/// `model` at every path the file names that `injection` does not hold yet.
inline LoRALoadResult load_lora_peft(const std::string& dir_or_file, LoRAInjection& injection,
                                     torch::nn::Module& model,
                                     const LoRALoadOptions& options = {}) {
  return detail::lora_load(dir_or_file, injection, &injection, &model, options, true);
}

/// Loads a LoRA file in any of the three layouts (found from its keys; a folder is read as peft's)
/// into `layers`. Scale: `options.alpha`, else the file's (Kohya `.alpha`, peft's config), else
/// 1 (alpha = r) for diffusers and Kohya. Errors name the file and the key at fault.
inline LoRALoadResult load_lora(const std::string& file, const LoRALayers& layers,
                                const LoRALoadOptions& options = {}) {
  return detail::lora_load(file, layers, nullptr, nullptr, options, false);
}

/// As `load_lora(file, layers)`, injecting into the Linear / Conv2d of `model` where needed.
///
/// Example:
/// @code
/// scedit::LoRAInjection lora;
/// scedit::load_lora("style_kohya.safetensors", lora, *unet);
/// @endcode
inline LoRALoadResult load_lora(const std::string& file, LoRAInjection& injection,
                                torch::nn::Module& model, const LoRALoadOptions& options = {}) {
  return detail::lora_load(file, injection, &injection, &model, options, false);
}

}  // namespace scedit
