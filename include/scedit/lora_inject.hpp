#pragma once
/// @file lora_inject.hpp
/// @brief Weight-side LoRA: injection into models whose members are plain `torch::nn::Linear` /
/// `torch::nn::Conv2d` (`inject_lora`, `LoRAInjection`, `InjectedLoRA`), and sets of LoRA layers
/// across a model (`LoRALayers`, `find_lora_layers`, `lora_parameters`).
///
/// A LibTorch parent calls its *typed member holders* (`to_q(x)` on a `torch::nn::Linear to_q`),
/// so `replace_module` alone changes the registry but not what `forward` runs. Injection
/// therefore leaves the layer in place and reparametrises its weight: the adapters are registered
/// on the layer itself, the base weight `W0` stays the layer's registered (frozen) `weight`
/// parameter, and `LoRAInjection::refresh()` rebinds the layer's public `weight` member — which
/// `LinearImpl::forward` and `Conv2dImpl::forward` read — to the differentiable tensor
/// `W0 + Σ_a w_a · s_a · B_a · A_a`. The registered parameter is never touched, so `state_dict`,
/// `named_parameters` and `torch::save` still show `W0` under `<path>.weight`, and the effective
/// tensor is never written into `W0` (only `merge` adds to it, on request).
///
/// The contract: **call `refresh()` before each training forward** (after `optimizer.step()`),
/// and after `model->to(...)`. Forgetting it fails loudly rather than silently: the stale
/// effective weight's graph was freed by the previous backward, so the next backward throws.
/// Every change made through the API (weights, enable/disable, merge, load) refreshes by itself,
/// so inference needs no call. `refresh()` records the graph only when grad mode is on: refresh
/// outside `NoGradGuard` before training. Trade-off against the activation side (`LoRALinear`,
/// lora.hpp): each step materialises one weight-sized tensor per adapted layer and one
/// `[out, r] × [r, in]` product, instead of the `[tokens, r]` activations; dropout, which acts on
/// each call's input, is impossible weight-side and is refused. Clone a model before injecting
/// (an injected layer's extra children make `clone()` refuse it), or `unload()` first.
///
/// lora.hpp includes this file; either include works.
///
/// Example:
/// @code
/// auto lora = scedit::inject_lora(*unet, scedit::LoRAConfig(scedit::LoRAOptions(64).alpha(8))
///                                            .target_modules({"to_q", "to_k", "to_v",
///                                            "to_out.0"}));
/// torch::optim::AdamW optimizer(lora.parameters(), 1e-4);
/// for (...) { lora.refresh(); auto loss = step(unet); loss.backward(); optimizer.step(); }
/// @endcode

#include <scedit/lora_layer.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace scedit {

/// A LoRA layer placed by injection; it can be taken off the layer again.
class InjectedLoRALayer : public LoRALayer {
 public:
  /// Unregisters the adapters from the layer, rebinds its `weight` to W0 and restores the
  /// base parameters' `requires_grad`. W0 keeps whatever was merged into it.
  virtual void remove() = 0;
  /// The adapted layer.
  virtual std::shared_ptr<torch::nn::Module> module() const = 0;
};

/// Weight-side LoRA on a plain LibTorch layer (see the file comment). Made by `LoRAInjection`.
template <typename BaseImpl>
class InjectedLoRA final : public BasicLoRALayer<BaseImpl, InjectedLoRALayer> {
 public:
  /// Attaches empty `lora_A` / `lora_B` dicts to `layer` (at `path`); freezes its weight and
  /// bias when `freeze_base`.
  InjectedLoRA(std::shared_ptr<BaseImpl> layer, const std::string& path, bool freeze_base)
      : layer_(std::move(layer)) {
    this->label_ = "LoRA on " + std::string(LoRATraits<BaseImpl>::kind) + " '" + path + "'";
    LoRATraits<BaseImpl>::check(LoRATraits<BaseImpl>::options_of(*layer_), this->label_);
    const auto children = layer_->named_children();
    TORCH_CHECK(!children.contains("lora_A") && !children.contains("lora_B"), this->label_,
                ": the layer already carries LoRA adapters (from another injection); add adapters "
                "through that LoRAInjection instead");
    const auto params = layer_->named_parameters(/*recurse=*/false);
    const torch::Tensor* w0 = params.find("weight");
    TORCH_CHECK(w0 != nullptr, this->label_, ": the layer has no registered 'weight'");
    TORCH_CHECK(
        layer_->weight.unsafeGetTensorImpl() == w0->unsafeGetTensorImpl(), this->label_,
        ": the layer's weight member is not its registered parameter (reparametrised already?)");
    w0_ = *w0;
    if (const torch::Tensor* b = params.find("bias")) bias_ = *b;
    weight_requires_grad_ = w0_.requires_grad();
    bias_requires_grad_ = bias_.defined() && bias_.requires_grad();
    if (freeze_base) {
      w0_.set_requires_grad(false);
      if (bias_.defined()) bias_.set_requires_grad(false);
    }
    this->lora_A = layer_->register_module("lora_A", torch::nn::ModuleDict());
    this->lora_B = layer_->register_module("lora_B", torch::nn::ModuleDict());
  }

  /// Rebinds the layer's `weight` member to `effective_weight()` (differentiable in A and B).
  void refresh() override {
    TORCH_CHECK(!removed_, this->label_, ": refresh after remove()");
    layer_->weight = this->effective_weight();
  }
  /// Takes the adapters off the layer (see `InjectedLoRALayer::remove`).
  void remove() override {
    if (removed_) return;
    layer_->unregister_module("lora_A");
    layer_->unregister_module("lora_B");
    layer_->weight = w0_;
    w0_.set_requires_grad(weight_requires_grad_);
    if (bias_.defined()) bias_.set_requires_grad(bias_requires_grad_);
    removed_ = true;
  }
  /// The adapted layer.
  std::shared_ptr<torch::nn::Module> module() const override { return layer_; }
  /// The base weight W0 (the registered parameter).
  torch::Tensor base_weight() const override { return w0_; }
  /// Whether adapters here may use dropout.
  bool supports_dropout() const override { return false; }

 protected:
  typename LoRATraits<BaseImpl>::Options base_options_() const override {
    return LoRATraits<BaseImpl>::options_of(*layer_);
  }
  void changed_() override {
    if (!removed_) refresh();
  }
  void check_options_(const std::string& name, const LoRAOptions& options) const override {
    TORCH_CHECK(!removed_, this->label_, ": the adapters were removed from this layer");
    TORCH_CHECK(options.dropout() == 0, this->label_, ": adapter '", name, "' asks for dropout ",
                options.dropout(),
                ", which weight-side injection cannot apply (dropout acts on "
                "each call's input); use scedit::LoRALinear / LoRAConv2d for LoRA with dropout");
  }

 private:
  std::shared_ptr<BaseImpl> layer_;
  torch::Tensor w0_;
  torch::Tensor bias_;
  bool weight_requires_grad_ = true;
  bool bias_requires_grad_ = true;
  bool removed_ = false;
};

/// The LoRA layers of a model by module path: the wrappers `find_lora_layers` finds, or the
/// layers a `LoRAInjection` adapted. Operations by adapter name apply to every layer holding it.
class LoRALayers {
 public:
  /// A module path and its layer.
  using Entry = std::pair<std::string, std::shared_ptr<LoRALayer>>;

  /// An empty set.
  LoRALayers() = default;
  /// A set of the given layers (paths must be unique).
  explicit LoRALayers(const std::vector<Entry>& entries) {
    for (const auto& e : entries) add(e.first, e.second);
  }
  virtual ~LoRALayers() = default;

  /// Adds `layer` at module path `path`.
  void add(const std::string& path, std::shared_ptr<LoRALayer> layer) {
    TORCH_CHECK(layer != nullptr, "LoRALayers: null layer for '", path, "'");
    TORCH_CHECK(index_.emplace(path, entries_.size()).second, "LoRALayers: path '", path,
                "' is already in the set");
    entries_.emplace_back(path, std::move(layer));
  }
  /// The layers in the order they were added.
  const std::vector<Entry>& entries() const { return entries_; }
  /// Number of layers.
  size_t size() const { return entries_.size(); }
  /// Whether there are none.
  bool empty() const { return entries_.empty(); }
  /// The module paths, in order.
  std::vector<std::string> paths() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e.first);
    return out;
  }
  /// The layer at `path`, or nullptr.
  std::shared_ptr<LoRALayer> find(const std::string& path) const {
    const auto it = index_.find(path);
    return it == index_.end() ? nullptr : entries_[it->second].second;
  }
  /// The layer at `path`; throws naming the path.
  LoRALayer& at(const std::string& path) const {
    auto layer = find(path);
    TORCH_CHECK(layer != nullptr, "LoRALayers: no LoRA layer at '", path, "' (", entries_.size(),
                " layers)");
    return *layer;
  }
  /// Every adapter name present on some layer, in first-seen order.
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> names;
    std::unordered_set<std::string> seen;
    for (const auto& e : entries_) {
      for (const auto& n : e.second->adapter_names()) {
        if (seen.insert(n).second) names.push_back(n);
      }
    }
    return names;
  }
  /// Every A and B parameter, for an optimizer.
  std::vector<torch::Tensor> parameters() const {
    std::vector<torch::Tensor> params;
    for (const auto& e : entries_) {
      for (auto& p : e.second->lora_parameters()) params.push_back(p);
    }
    return params;
  }
  /// Sets the mixing weight of adapter `name` on every layer holding it.
  void set_adapter_weight(const std::string& name, double weight) {
    each_with_(name, "set its weight", true,
               [&](LoRALayer& l) { l.set_adapter_weight(name, weight); });
  }
  /// Enables or disables adapter `name` on every layer holding it.
  void set_adapter_enabled(const std::string& name, bool enabled) {
    each_with_(name, "disable it", !enabled,
               [&](LoRALayer& l) { l.set_adapter_enabled(name, enabled); });
  }
  /// Enables or disables all adapters of all layers.
  void set_enabled(bool enabled) {
    if (!enabled) {
      for (const auto& e : entries_) {
        for (const auto& n : e.second->adapter_names()) {
          TORCH_CHECK(!e.second->adapter(n).merged, "LoRA: cannot disable the adapters while '", n,
                      "' is merged on '", e.first, "'; unmerge it first");
        }
      }
    }
    for (auto& e : entries_) e.second->set_enabled(enabled);
  }
  /// Merges adapter `name` into the base weight of every layer holding it (exact, in place).
  void merge(const std::string& name) {
    each_with_(name, "merge it again", true, [&](LoRALayer& l) { l.merge(name); });
  }
  /// Undoes `merge(name)` on every layer holding the adapter.
  void unmerge(const std::string& name) {
    for (const auto& e : entries_) {
      TORCH_CHECK(!e.second->has_adapter(name) || e.second->adapter(name).merged, "LoRA: adapter '",
                  name, "' is not merged on '", e.first, "'");
    }
    each_with_(name, "", false, [&](LoRALayer& l) { l.unmerge(name); });
  }
  /// Deletes adapter `name` from every layer holding it (unmerging it first where merged).
  void delete_adapter(const std::string& name) {
    each_with_(name, "", false, [&](LoRALayer& l) { l.delete_adapter(name); });
  }
  /// Refreshes every layer: call before each training forward when injected (see the file
  /// comment).
  void refresh() {
    for (auto& e : entries_) e.second->refresh();
  }

 protected:
  /// Calls `f` on every layer holding adapter `name` (at least one must); when `unmerged` is
  /// set, first checks that none has it merged (`action` says what that refuses).
  template <typename F>
  void each_with_(const std::string& name, const char* action, bool unmerged, F&& f) {
    size_t count = 0;
    for (const auto& e : entries_) {
      if (!e.second->has_adapter(name)) continue;
      ++count;
      TORCH_CHECK(!unmerged || !e.second->adapter(name).merged, "LoRA: adapter '", name,
                  "' is merged on '", e.first, "'; unmerge it before you ", action);
    }
    if (count == 0) {
      std::string known;
      for (const auto& n : adapter_names()) known += (known.empty() ? "" : ", ") + n;
      TORCH_CHECK(false, "LoRA: no layer has adapter '", name,
                  "' (adapters: ", known.empty() ? "none" : known, ")");
    }
    for (auto& e : entries_) {
      if (e.second->has_adapter(name)) f(*e.second);
    }
  }
  /// Drops every entry.
  void clear_() {
    entries_.clear();
    index_.clear();
  }

 private:
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
};

/// What to adapt, and how: peft's `LoraConfig` for injection.
struct LoRAConfig {
  /// Example: `LoRAConfig(LoRAOptions(4).alpha(8)).target_modules({"to_q", "ff.net.0.proj"})`.
  /* implicit */ LoRAConfig(LoRAOptions options) : options_(std::move(options)) {}
  /// Rank, alpha, rsLoRA, init of the new adapter (dropout must be 0 for injection).
  TORCH_ARG(LoRAOptions, options);
  /// peft-style names: a module at path `p` matches `t` when `p == t` or `p` ends with `"." + t`
  /// (so `to_q` matches `attn1.to_q` but not `to_q_extra`).
  TORCH_ARG(std::vector<std::string>, target_modules) = {};
  /// Or an ECMAScript regex that must match the whole module path (peft's string form).
  TORCH_ARG(std::string, target_regex) = "";
  /// Name of the adapter to add.
  TORCH_ARG(std::string, adapter_name) = "default";
  /// Whether to freeze the adapted layers' weight and bias (restored on unload).
  TORCH_ARG(bool, freeze_base) = true;
};

namespace detail {

/// Human-readable targets of a config, for messages.
inline std::string lora_describe_targets(const LoRAConfig& config) {
  if (!config.target_regex().empty()) return "target_regex '" + config.target_regex() + "'";
  std::string out = "target_modules [";
  for (size_t i = 0; i < config.target_modules().size(); ++i) {
    out += (i ? ", '" : "'") + config.target_modules()[i] + "'";
  }
  return out + "]";
}

/// peft's suffix rule: `path == target` or `path` ends with `"." + target`.
inline bool lora_suffix_matches(const std::string& path, const std::string& target) {
  if (target.empty() || path.size() < target.size()) return false;
  if (path.compare(path.size() - target.size(), target.size(), target) != 0) return false;
  return path.size() == target.size() || path[path.size() - target.size() - 1] == '.';
}

/// The module at dotted `path` under `model`, or nullptr.
inline std::shared_ptr<torch::nn::Module> lora_find_module(const torch::nn::Module& model,
                                                           const std::string& path) {
  std::shared_ptr<torch::nn::Module> current;
  const torch::nn::Module* at = &model;
  std::stringstream stream(path);
  std::string part;
  while (std::getline(stream, part, '.')) {
    const auto children = at->named_children();
    const auto* child = children.find(part);
    if (child == nullptr) return nullptr;
    current = *child;
    at = current.get();
  }
  return current;
}

/// Why `module` cannot be injected ("" when it can): not Linear / Conv2d, grouped, or already
/// carrying adapters.
inline std::string lora_injection_problem(const std::shared_ptr<torch::nn::Module>& module) {
  const bool linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module) != nullptr;
  auto conv = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module);
  if (dynamic_cast<LoRALayer*>(module.get()) != nullptr) {
    return "is a LoRA wrapper already; call add_adapter on it";
  }
  if (!linear && conv == nullptr) {
    return "is a " + module->name() +
           "; LoRA injection supports torch::nn::Linear and torch::nn::Conv2d";
  }
  if (conv != nullptr && conv->options.groups() != 1) {
    return "is a grouped Conv2d (groups = " + std::to_string(conv->options.groups()) +
           "), which LoRA does not support";
  }
  const auto children = module->named_children();
  if (children.contains("lora_A") || children.contains("lora_B")) {
    return "already carries LoRA adapters from another injection; add adapters through it";
  }
  return "";
}

/// A weight-side LoRA record for `module` (Linear or Conv2d, checked by the caller).
inline std::shared_ptr<InjectedLoRALayer> lora_make_injected(
    const std::shared_ptr<torch::nn::Module>& module, const std::string& path, bool freeze_base) {
  if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module)) {
    return std::make_shared<InjectedLoRA<torch::nn::LinearImpl>>(linear, path, freeze_base);
  }
  auto conv = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module);
  TORCH_CHECK(conv != nullptr, "LoRA: '", path, "' is neither Linear nor Conv2d");
  return std::make_shared<InjectedLoRA<torch::nn::Conv2dImpl>>(conv, path, freeze_base);
}

}  // namespace detail

/// Whether module path `path` is a target of `config` (suffix names or whole-path regex).
inline bool lora_target_matches(const std::string& path, const LoRAConfig& config) {
  if (!config.target_regex().empty()) {
    return std::regex_match(path, std::regex(config.target_regex(), std::regex::ECMAScript));
  }
  for (const auto& t : config.target_modules()) {
    if (detail::lora_suffix_matches(path, t)) return true;
  }
  return false;
}

/// Weight-side LoRA on the plain Linear / Conv2d layers of a model (see the file comment): the
/// layers it adapted, by path, plus injection and removal. Keep it alive while the model runs
/// with adapters; call `refresh()` before each training forward.
class LoRAInjection : public LoRALayers {
 public:
  /// Adds adapter `config.adapter_name` to every Linear / Conv2d of `model` the config targets.
  /// Paths inside LoRA adapters or wrappers are skipped; a target that is another kind of module
  /// is an error (as in peft), and so is a config that matches nothing. Nothing changes on error.
  void inject(torch::nn::Module& model, const LoRAConfig& config) {
    const std::string where = "inject_lora";
    TORCH_CHECK(config.target_modules().empty() != config.target_regex().empty(), where,
                ": set exactly one of target_modules and target_regex");
    detail::lora_check_adapter(where, config.adapter_name(), config.options());
    check_dropout_(config.options(), config.adapter_name());
    std::regex regex;
    if (!config.target_regex().empty()) {
      try {
        regex = std::regex(config.target_regex(), std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        TORCH_CHECK(false, where, ": bad target_regex '", config.target_regex(), "': ", e.what());
      }
    }
    auto matches = [&](const std::string& path) {
      if (!config.target_regex().empty()) return std::regex_match(path, regex);
      for (const auto& t : config.target_modules()) {
        if (detail::lora_suffix_matches(path, t)) return true;
      }
      return false;
    };
    std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> targets;
    std::vector<std::string> wrappers;  // "path." of LoRA wrappers: their insides are skipped
    for (const auto& item : model.named_modules("", /*include_self=*/false)) {
      const std::string& path = item.key();
      if (detail::lora_in_adapter_path(path)) continue;
      if (std::any_of(wrappers.begin(), wrappers.end(),
                      [&](const std::string& w) { return path.rfind(w, 0) == 0; })) {
        continue;
      }
      if (dynamic_cast<LoRALayer*>(item.value().get()) != nullptr) wrappers.push_back(path + ".");
      if (!matches(path)) continue;
      auto existing = find(path);
      if (existing != nullptr) {
        TORCH_CHECK(!existing->has_adapter(config.adapter_name()), where, ": '", path,
                    "' already has adapter '", config.adapter_name(), "'");
      } else {
        const std::string problem = detail::lora_injection_problem(item.value());
        TORCH_CHECK(problem.empty(), where, ": target '", path, "' (matched by ",
                    detail::lora_describe_targets(config), ") ", problem);
      }
      targets.emplace_back(path, item.value());
    }
    TORCH_CHECK(!targets.empty(), where, ": ", detail::lora_describe_targets(config),
                " matched no module of the model");
    for (const auto& [path, module] : targets) {
      auto layer = find(path);
      if (layer == nullptr) {
        layer = detail::lora_make_injected(module, path, config.freeze_base());
        add(path, layer);
      }
      layer->add_adapter(config.adapter_name(), config.options());
    }
  }

  /// Adds adapter `adapter_name` to the Linear / Conv2d at exactly `path` under `model` and
  /// returns its layer (the loaders use this for the paths a file names).
  std::shared_ptr<LoRALayer> inject_at(torch::nn::Module& model, const std::string& path,
                                       const LoRAOptions& options,
                                       const std::string& adapter_name = "default",
                                       bool freeze_base = true) {
    const std::string where = "LoRAInjection::inject_at";
    detail::lora_check_adapter(where, adapter_name, options);
    check_dropout_(options, adapter_name);
    auto layer = find(path);
    if (layer == nullptr) {
      TORCH_CHECK(!detail::lora_in_adapter_path(path), where, ": '", path,
                  "' lies inside a LoRA adapter");
      auto module = detail::lora_find_module(model, path);
      TORCH_CHECK(module != nullptr, where, ": the model has no module at '", path, "'");
      const std::string problem = detail::lora_injection_problem(module);
      TORCH_CHECK(problem.empty(), where, ": '", path, "' ", problem);
      layer = detail::lora_make_injected(module, path, freeze_base);
      add(path, layer);
    }
    layer->add_adapter(adapter_name, options);
    return layer;
  }

  /// Takes every adapter off the model: merged adapters are unmerged, the layers' `weight`
  /// members point at W0 again and the base parameters' `requires_grad` is restored.
  void unload() {
    for (auto& [path, layer] : entries()) {
      for (const auto& name : layer->adapter_names()) {
        if (layer->adapter(name).merged) layer->unmerge(name);
      }
      injected_(path, layer).remove();
    }
    clear_();
  }

  /// Merges every enabled adapter into its base weight, then takes the adapters off the model.
  void merge_and_unload() {
    for (auto& [path, layer] : entries()) {
      if (!layer->enabled()) continue;
      for (const auto& name : layer->adapter_names()) {
        const auto& info = layer->adapter(name);
        if (info.enabled && !info.merged) layer->merge(name);
      }
    }
    for (auto& [path, layer] : entries()) injected_(path, layer).remove();
    clear_();
  }

 private:
  static void check_dropout_(const LoRAOptions& options, const std::string& name) {
    TORCH_CHECK(options.dropout() == 0, "inject_lora: adapter '", name, "' asks for dropout ",
                options.dropout(),
                ", which weight-side injection cannot apply (dropout acts on "
                "each call's input); use scedit::LoRALinear / LoRAConv2d for LoRA with dropout");
  }
  static InjectedLoRALayer& injected_(const std::string& path,
                                      const std::shared_ptr<LoRALayer>& layer) {
    auto* injected = dynamic_cast<InjectedLoRALayer*>(layer.get());
    TORCH_CHECK(injected != nullptr, "LoRAInjection: '", path, "' was not injected");
    return *injected;
  }
};

/// Injects adapter `config.adapter_name` into `model` (see `LoRAInjection::inject`).
///
/// Example:
/// @code
/// auto lora = scedit::inject_lora(*model, scedit::LoRAConfig(scedit::LoRAOptions(4))
///                                             .target_modules({"to_q", "ff.net.0.proj"}));
/// @endcode
inline LoRAInjection inject_lora(torch::nn::Module& model, const LoRAConfig& config) {
  LoRAInjection injection;
  injection.inject(model, config);
  return injection;
}

/// The LoRA wrappers (`LoRALinear`, `LoRAConv2d`) inside `model`, by module path.
inline LoRALayers find_lora_layers(const torch::nn::Module& model) {
  LoRALayers layers;
  if (dynamic_cast<const LoRALayer*>(&model) != nullptr) {
    auto self = std::const_pointer_cast<torch::nn::Module>(model.shared_from_this());
    layers.add("", std::dynamic_pointer_cast<LoRALayer>(self));
  }
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (auto layer = std::dynamic_pointer_cast<LoRALayer>(item.value()))
      layers.add(item.key(), layer);
  }
  return layers;
}

/// Every LoRA A / B parameter under `module` (both ways: any path through `lora_A` / `lora_B`),
/// each once, for an optimizer.
inline std::vector<torch::Tensor> lora_parameters(const torch::nn::Module& module) {
  std::vector<torch::Tensor> params;
  std::unordered_set<const void*> seen;
  for (const auto& p : module.named_parameters()) {
    if (detail::lora_in_adapter_path(p.key()) &&
        seen.insert(p.value().unsafeGetTensorImpl()).second) {
      params.push_back(p.value());
    }
  }
  return params;
}

}  // namespace scedit
