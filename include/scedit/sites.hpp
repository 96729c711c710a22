#pragma once
/// @file sites.hpp
/// @brief Skip-connection sites: the places in a model where tuners edit a skip feature.
///
/// A model marks each skip connection with a site, once, in its own code. The library then
/// attaches, rescales, disables and detaches tuners on those sites without touching the model
/// again. Two kinds of site exist:
///  - `SkipSite`: a placeholder on the skip path itself (identity until a tuner is attached, like
///    scepter's `lsc_identity`); the model calls it on the skip before concatenating it.
///  - `CatSkipSite<Inner>`: wraps a module whose input is `cat([h, skip], 1)`; it splits the skip's
///    channels off the input, edits them and re-joins before calling the wrapped module (SWIFT's
///    "decoder" mode), for models that cannot be edited.
///
/// Several tuners on one site compose additively, each seeing the original skip `s`:
/// `out = s + Σ_i delta_i(s)`, which is exactly SCEdit's formula for SC- and CSC-Tuners together.

#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <regex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace scedit {

/// Marker base of every tuner module of this library (SC-Tuner, CSC-Tuner): the trainability
/// helpers find tuners through it.
class Tuner {
 public:
  virtual ~Tuner() = default;
};

/// Something that edits a skip feature: it returns the change `delta(s)` it adds to skip `s`.
class SkipEditor {
 public:
  virtual ~SkipEditor() = default;
  /// The change this editor adds to `skip` ([N, C, H, W] or [N, L, C]).
  virtual torch::Tensor delta(const torch::Tensor& skip) = 0;
  /// The editor's own strength (1 = as trained).
  virtual double scale() const = 0;
  /// Sets the editor's strength.
  virtual void set_scale(double scale) = 0;
};

/// The editing machinery shared by both kinds of site: an ordered list of named editors.
class SkipEditing {
 public:
  virtual ~SkipEditing() = default;

  /// Channels of the skip feature at this site.
  virtual int64_t skip_channels() const = 0;

  /// Attaches `editor` under `name`. When `owned` is given (the editor's own module, as for an
  /// SC-Tuner) it becomes a registered child of the site, so the model's `parameters()`, `to()`
  /// and `state_dict` include it; otherwise the editor is only referenced (as for the per-site
  /// views of a CSC-Tuner, whose module is registered once elsewhere).
  void attach(const std::string& name, std::shared_ptr<SkipEditor> editor,
              std::shared_ptr<torch::nn::Module> owned = nullptr) {
    TORCH_CHECK(editor != nullptr, "attach: editor '", name, "' is null");
    TORCH_CHECK(find(name) == nullptr, "attach: this site already has a tuner named '", name,
                "'; detach it first or choose another name");
    if (owned) site_module().register_module(name, owned);
    entries_.push_back({name, std::move(editor), std::move(owned), true});
  }

  /// Removes the editor `name` (and unregisters its module if the site owned it).
  void detach(const std::string& name) {
    auto it = std::find_if(entries_.begin(), entries_.end(),
                           [&](const Entry& e) { return e.name == name; });
    TORCH_CHECK(it != entries_.end(), "detach: no tuner named '", name, "' on this site");
    if (it->owned) site_module().unregister_module(name);
    entries_.erase(it);
  }

  /// Puts `editor` in the place of the referenced (not owned) editor `name`, keeping its order
  /// and whether it is enabled: how a model's clone points its sites at its own tuners.
  void replace(const std::string& name, std::shared_ptr<SkipEditor> editor) {
    TORCH_CHECK(editor != nullptr, "replace: editor '", name, "' is null");
    auto& e = entry(name);
    TORCH_CHECK(!e.owned, "replace: tuner '", name, "' belongs to this site; detach it instead");
    e.editor = std::move(editor);
  }

  /// Removes every editor.
  void detach_all() {
    while (!entries_.empty()) detach(entries_.back().name);
  }

  /// Turns editor `name` on or off without removing it.
  void set_enabled(const std::string& name, bool enabled) { entry(name).enabled = enabled; }

  /// Sets the strength of editor `name`.
  void set_scale(const std::string& name, double scale) { entry(name).editor->set_scale(scale); }

  /// The editor attached under `name`, or null.
  SkipEditor* find(const std::string& name) const {
    for (const auto& e : entries_) {
      if (e.name == name) return e.editor.get();
    }
    return nullptr;
  }

  /// Names of the attached editors, in attachment order.
  std::vector<std::string> editor_names() const {
    std::vector<std::string> names;
    for (const auto& e : entries_) names.push_back(e.name);
    return names;
  }

  /// Applies every enabled editor: `s + Σ delta_i(s)`; the identity (the same tensor) when none.
  torch::Tensor edit(const torch::Tensor& skip) {
    TORCH_CHECK(skip.dim() == 4 || skip.dim() == 3,
                "skip site: expected a skip feature [N, C, H, W] or [N, L, C], got ", skip.sizes());
    const int64_t channels = skip.size(skip.dim() == 4 ? 1 : 2);
    TORCH_CHECK(channels == skip_channels(), "skip site: expected ", skip_channels(),
                " channels, got a skip of shape ", skip.sizes());
    torch::Tensor out = skip;
    for (const auto& e : entries_) {
      if (e.enabled) out = out + e.editor->delta(skip);
    }
    return out;
  }

 protected:
  /// The module that owns this editing state (the site itself).
  virtual torch::nn::Module& site_module() = 0;

  /// Re-registers deep copies of owned editors; called from the site's `reset()`, which is what
  /// `clone()` runs on the copy. Referenced (non-owned) editors stay shared with the original
  /// until the model that owns them relinks its copy (`relink_csc_tuners`).
  void reregister_owned_editors() {
    for (auto& e : entries_) {
      if (!e.owned) continue;
      e.owned = e.owned->clone();
      e.editor = std::dynamic_pointer_cast<SkipEditor>(e.owned);
      TORCH_CHECK(e.editor, "skip site: cloned tuner '", e.name, "' is not a SkipEditor");
      site_module().register_module(e.name, e.owned);
    }
  }

 private:
  struct Entry {
    std::string name;
    std::shared_ptr<SkipEditor> editor;
    std::shared_ptr<torch::nn::Module> owned;
    bool enabled;
  };

  Entry& entry(const std::string& name) {
    auto it = std::find_if(entries_.begin(), entries_.end(),
                           [&](const Entry& e) { return e.name == name; });
    TORCH_CHECK(it != entries_.end(), "skip site: no tuner named '", name, "' on this site");
    return *it;
  }

  std::vector<Entry> entries_;
};

/// Options of a `SkipSite`.
struct SkipSiteOptions {
  /// Example: `scedit::SkipSite site(scedit::SkipSiteOptions(320));`
  explicit SkipSiteOptions(int64_t channels) : channels_(channels) {}
  /// Channels of the skip feature that passes this site.
  TORCH_ARG(int64_t, channels);
};

/// A placeholder on a skip path: the identity until tuners are attached. It has no parameters
/// of its own, so a model's base state dict is the same with or without sites.
class SkipSiteImpl : public torch::nn::Cloneable<SkipSiteImpl>, public SkipEditing {
 public:
  /// Creates an empty site for a skip of `options.channels()` channels.
  explicit SkipSiteImpl(SkipSiteOptions options) : options(std::move(options)) { reset(); }

  /// Registers the owned tuners (a clone gets deep copies).
  void reset() override {
    TORCH_CHECK(options.channels() > 0, "SkipSite: channels must be positive, got ",
                options.channels());
    reregister_owned_editors();
  }

  /// The skip feature after every enabled tuner: `s + Σ delta_i(s)`.
  torch::Tensor forward(const torch::Tensor& skip) { return edit(skip); }

  /// Channels of the skip at this site.
  int64_t skip_channels() const override { return options.channels(); }

  /// Prints `scedit::SkipSite(channels=320, tuners=[sc])`.
  void pretty_print(std::ostream& stream) const override {
    stream << "scedit::SkipSite(channels=" << options.channels() << ", tuners=[";
    const auto names = editor_names();
    for (size_t i = 0; i < names.size(); ++i) stream << (i ? ", " : "") << names[i];
    stream << "])";
  }

  /// The options this site was built with.
  SkipSiteOptions options;

 protected:
  torch::nn::Module& site_module() override { return *this; }
};

/// Holder of `SkipSiteImpl` (see `torch::nn::ModuleHolder`).
TORCH_MODULE(SkipSite);

namespace detail {
/// Whether `M::forward` accepts two tensors (e.g. features and a time embedding).
template <typename M, typename = void>
struct takes_two_tensors : std::false_type {};
template <typename M>
struct takes_two_tensors<M, std::void_t<decltype(std::declval<M&>().forward(
                                std::declval<torch::Tensor>(), std::declval<torch::Tensor>()))>>
    : std::true_type {};
}  // namespace detail

/// Options of a `CatSkipSite`.
struct CatSkipSiteOptions {
  /// Example: `CatSkipSiteOptions(320)` for a module fed `cat([h, skip])` with a 320-channel skip.
  explicit CatSkipSiteOptions(int64_t skip_channels) : skip_channels_(skip_channels) {}
  /// Channels of the skip: the last `skip_channels` channels of the wrapped module's input.
  TORCH_ARG(int64_t, skip_channels);
};

/// Wraps a module whose first input is `cat([h, skip], dim=1)`: splits the skip's channels off,
/// edits them, re-joins and calls the wrapped module with the remaining arguments unchanged.
/// Use it where a model's code cannot be given a `SkipSite` (SWIFT's "decoder" mode).
template <typename Inner>
class CatSkipSiteImpl : public torch::nn::Cloneable<CatSkipSiteImpl<Inner>>, public SkipEditing {
 public:
  /// Wraps `inner` (a module holder, e.g. a `torch::nn::Conv2d`).
  template <typename Holder>
  CatSkipSiteImpl(Holder inner, CatSkipSiteOptions options)
      : options(std::move(options)), inner(inner.ptr()) {
    reset();
  }

  /// Registers the wrapped module and the owned tuners.
  void reset() override {
    TORCH_CHECK(options.skip_channels() > 0, "CatSkipSite: skip_channels must be positive, got ",
                options.skip_channels());
    // On the copy made by clone() `inner` still points at the original's module: deep-copy it.
    if (initialised_) inner = std::dynamic_pointer_cast<Inner>(inner->clone());
    inner = this->register_module("inner", inner);
    reregister_owned_editors();
    initialised_ = true;
  }

  /// `inner(cat([h, edit(skip)]) [, extra])` where `input = cat([h, skip])` along dim 1.
  /// `extra` (e.g. a time embedding) is passed on when the wrapped module takes a second tensor.
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& extra = {}) {
    TORCH_CHECK(input.dim() >= 2 && input.size(1) > options.skip_channels(),
                "CatSkipSite: input of shape ", input.sizes(), " has no room for a ",
                options.skip_channels(), "-channel skip after the main features");
    torch::Tensor joined = input;
    if (!editor_names().empty()) {
      const int64_t main_channels = input.size(1) - options.skip_channels();
      auto parts = input.split_with_sizes({main_channels, options.skip_channels()}, 1);
      joined = torch::cat({parts[0], edit(parts[1])}, 1);  // [N, C_h + C_s, ...]
    }
    if constexpr (detail::takes_two_tensors<Inner>::value) {
      return inner->forward(joined, extra);
    } else {
      TORCH_CHECK(!extra.defined(), "CatSkipSite: the wrapped module takes one input, but a "
                                    "second tensor was given");
      return inner->forward(joined);
    }
  }

  /// Channels of the skip at this site.
  int64_t skip_channels() const override { return options.skip_channels(); }

  /// The options this site was built with.
  CatSkipSiteOptions options;
  /// The wrapped module.
  std::shared_ptr<Inner> inner;

 protected:
  /// Whether reset() has run once (a later reset is a clone's, which deep-copies `inner`).
  bool initialised_ = false;

  torch::nn::Module& site_module() override { return *this; }
};

/// Holder of `CatSkipSiteImpl<Inner>` (TORCH_MODULE takes no template, so written out).
template <typename Inner>
class CatSkipSite : public torch::nn::ModuleHolder<CatSkipSiteImpl<Inner>> {
 public:
  using torch::nn::ModuleHolder<CatSkipSiteImpl<Inner>>::ModuleHolder;
};

/// A site found in a model: its dotted module path and its editing interface.
struct SiteRef {
  /// Dotted path of the site module inside the model (e.g. `lsc_identity.3`).
  std::string path;
  /// The site's editing interface (owned by the model).
  SkipEditing* site;
};

/// Every skip site of `model` whose path matches `pattern`, in the model's module order (for a
/// UNet that registers its sites in decoder order, the decoder order). An empty pattern matches
/// every site; otherwise it is an ECMAScript regex that must match the whole path.
inline std::vector<SiteRef> find_sites(torch::nn::Module& model, const std::string& pattern = "") {
  std::regex regex;
  try {
    regex = std::regex(pattern.empty() ? ".*" : pattern);
  } catch (const std::regex_error& e) {
    TORCH_CHECK(false, "skip-site pattern '", pattern, "' is not a valid regex: ", e.what());
  }
  std::vector<SiteRef> sites;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    auto* editing = dynamic_cast<SkipEditing*>(item.value().get());
    if (editing != nullptr && std::regex_match(item.key(), regex)) {
      sites.push_back({item.key(), editing});
    }
  }
  return sites;
}

}  // namespace scedit
