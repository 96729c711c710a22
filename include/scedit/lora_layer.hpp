#pragma once
/// @file lora_layer.hpp
/// @brief What every LoRA layer shares, whichever way it runs: the options, each adapter's
/// state, the `LoRALayer` interface, and the adapter bookkeeping and arithmetic
/// (`BasicLoRALayer`).
///
/// LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
/// adds a trainable low-rank update to a frozen weight: `W = W0 + s · B · A`, with `A` [r, in],
/// `B` [out, r] and scale `s = alpha / r` (rsLoRA, Kalajdzievski 2023: `s = alpha / √r`). The
/// layout and initialisation follow peft (`peft/tuners/lora/layer.py`): the adapted layer holds
/// `lora_A` and `lora_B` `ModuleDict`s keyed by adapter name, so `named_parameters()` shows
/// `<path>.lora_A.<adapter>.weight`; A starts kaiming-uniform (a = √5) or gaussian (std 1/r), B
/// starts at zero, so a new adapter changes nothing. For a Conv2d, A is a conv with the base's
/// kernel, stride, padding and dilation and B a 1×1 conv, as in peft.
///
/// Two kinds of layer build on this: the activation-side wrappers `LoRALinear` / `LoRAConv2d`
/// (lora.hpp) and the weight-side `InjectedLoRA` that `inject_lora` places on the plain layers of
/// an existing model (lora_inject.hpp). lora_io.hpp reads and writes their peft, diffusers and
/// Kohya files. Most code includes lora.hpp, which brings all of these but the files.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace scedit {

/// How an adapter's A starts (B always starts at zero, so a new adapter is the identity).
enum class LoRAInit {
  /// peft's default: A ~ kaiming_uniform(a = √5) = U(−1/√fan_in, 1/√fan_in).
  kaiming,
  /// peft's `init_lora_weights="gaussian"`: A ~ N(0, (1/r)²).
  gaussian,
};

/// Options of one LoRA adapter.
struct LoRAOptions {
  /// Example: `LoRAOptions(16).alpha(16).use_rslora(true)`.
  /* implicit */ LoRAOptions(int64_t r) : r_(r) {}
  /// Rank r (> 0).
  TORCH_ARG(int64_t, r);
  /// alpha of the scale alpha / r (peft's default 8).
  TORCH_ARG(double, alpha) = 8;
  /// Dropout on the adapter's input, in [0, 1); activation side (`LoRALinear`) only.
  TORCH_ARG(double, dropout) = 0;
  /// rsLoRA: scale alpha / √r instead of alpha / r.
  TORCH_ARG(bool, use_rslora) = false;
  /// How A starts.
  TORCH_ARG(LoRAInit, init) = LoRAInit::kaiming;

 public:
  /// The scale s: alpha / r, or alpha / √r with rsLoRA.
  double scale() const {
    return use_rslora_ ? alpha_ / std::sqrt(static_cast<double>(r_))
                       : alpha_ / static_cast<double>(r_);
  }
};

/// One adapter's settings and state on one layer.
struct LoRAAdapterInfo {
  /// Adapter name (a `ModuleDict` key: no dots).
  std::string name;
  /// Rank, alpha, dropout, rsLoRA, init.
  LoRAOptions options;
  /// Per-adapter mixing weight w (1 by default); the update is w · s · B · A.
  double weight = 1.0;
  /// Whether the adapter takes part in the forward.
  bool enabled = true;
  /// Whether its update has been added into the base weight (it is then skipped in forward).
  bool merged = false;
  /// The factor w · s it was merged with (what unmerge subtracts).
  double merged_factor = 0.0;
  /// The current factor w · s.
  double factor() const { return weight * options.scale(); }
};

/// A layer carrying LoRA adapters, whichever way it runs (wrapper or injected).
class LoRALayer {
 public:
  virtual ~LoRALayer() = default;
  /// "Linear" or "Conv2d".
  virtual std::string kind() const = 0;
  /// Adapter names, in the order they were added.
  virtual std::vector<std::string> adapter_names() const = 0;
  /// Whether an adapter of this name exists.
  virtual bool has_adapter(const std::string& name) const = 0;
  /// The settings and state of adapter `name`.
  virtual const LoRAAdapterInfo& adapter(const std::string& name) const = 0;
  /// Adds adapter `name` (B zero, so the output is unchanged).
  virtual void add_adapter(const std::string& name, const LoRAOptions& options) = 0;
  /// Removes adapter `name`; a merged adapter is unmerged first.
  virtual void delete_adapter(const std::string& name) = 0;
  /// Sets the mixing weight w of adapter `name` (not while merged).
  virtual void set_adapter_weight(const std::string& name, double weight) = 0;
  /// Enables or disables adapter `name` (not while merged).
  virtual void set_adapter_enabled(const std::string& name, bool enabled) = 0;
  /// Sets alpha and rsLoRA of adapter `name`, keeping its rank (used by loaders; not merged).
  virtual void set_adapter_alpha(const std::string& name, double alpha, bool use_rslora) = 0;
  /// Enables or disables all adapters at once (disabling needs no adapter merged).
  virtual void set_enabled(bool enabled) = 0;
  /// Whether the adapters are globally enabled.
  virtual bool enabled() const = 0;
  /// Adds w · s · B · A of adapter `name` into the base weight, in place; forward then skips it.
  virtual void merge(const std::string& name) = 0;
  /// Subtracts what `merge` added.
  virtual void unmerge(const std::string& name) = 0;
  /// The A parameter of adapter `name` ([r, in] or [r, in, kh, kw]).
  virtual torch::Tensor lora_A_weight(const std::string& name) const = 0;
  /// The B parameter of adapter `name` ([out, r] or [out, r, 1, 1]).
  virtual torch::Tensor lora_B_weight(const std::string& name) const = 0;
  /// The base weight W0 (the registered parameter).
  virtual torch::Tensor base_weight() const = 0;
  /// w · s · B · A of adapter `name`, shaped like W0, in the adapter's dtype.
  virtual torch::Tensor delta_weight(const std::string& name) const = 0;
  /// W0 + the deltas of every enabled, unmerged adapter (W0 itself when none is).
  virtual torch::Tensor effective_weight() const = 0;
  /// Every A and B parameter.
  virtual std::vector<torch::Tensor> lora_parameters() const = 0;
  /// The shape A of rank r must have on this layer.
  virtual std::vector<int64_t> expected_A_shape(int64_t r) const = 0;
  /// The shape B of rank r must have on this layer.
  virtual std::vector<int64_t> expected_B_shape(int64_t r) const = 0;
  /// Whether adapters here can use dropout (activation side only).
  virtual bool supports_dropout() const = 0;
  /// Makes the forward see the current adapter values (weight side); a no-op for wrappers.
  virtual void refresh() {}
};

/// How LoRA builds its adapters around a base layer type (specialised for Linear and Conv2d).
template <typename BaseImpl>
struct LoRATraits;

/// LoRA on a Linear: A = Linear(in, r), B = Linear(r, out), no biases.
template <>
struct LoRATraits<torch::nn::LinearImpl> {
  /// The base layer's holder.
  using Holder = torch::nn::Linear;
  /// The base layer's options.
  using Options = torch::nn::LinearOptions;
  /// A's and B's type.
  using Adapter = torch::nn::Linear;
  /// Name in messages.
  static constexpr const char* kind = "Linear";
  /// The options a Linear was built with.
  static Options options_of(const torch::nn::LinearImpl& layer) { return layer.options; }
  /// Refuses layers LoRA cannot adapt (none for Linear).
  static void check(const Options&, const std::string&) {}
  /// A: in → r.
  static Adapter make_A(const Options& o, int64_t r) {
    return Adapter(torch::nn::LinearOptions(o.in_features(), r).bias(false));
  }
  /// B: r → out.
  static Adapter make_B(const Options& o, int64_t r) {
    return Adapter(torch::nn::LinearOptions(r, o.out_features()).bias(false));
  }
  /// Shape of A.
  static std::vector<int64_t> a_shape(const Options& o, int64_t r) { return {r, o.in_features()}; }
  /// Shape of B.
  static std::vector<int64_t> b_shape(const Options& o, int64_t r) { return {o.out_features(), r}; }
  /// B · A: [out, r] @ [r, in] -> [out, in].
  static torch::Tensor product(const torch::Tensor& a, const torch::Tensor& b, at::IntArrayRef) {
    return b.matmul(a);
  }
};

/// LoRA on a Conv2d (peft): A = Conv2d(in, r) with the base's kernel, stride, padding, dilation
/// and padding mode; B = 1×1 Conv2d(r, out); no biases.
template <>
struct LoRATraits<torch::nn::Conv2dImpl> {
  /// The base layer's holder.
  using Holder = torch::nn::Conv2d;
  /// The base layer's options.
  using Options = torch::nn::Conv2dOptions;
  /// A's and B's type.
  using Adapter = torch::nn::Conv2d;
  /// Name in messages.
  static constexpr const char* kind = "Conv2d";
  /// The options a Conv2d was built with.
  static Options options_of(const torch::nn::Conv2dImpl& layer) {
    const auto& o = layer.options;
    return Options(o.in_channels(), o.out_channels(), o.kernel_size())
        .stride(o.stride())
        .padding(o.padding())
        .dilation(o.dilation())
        .groups(o.groups())
        .bias(o.bias())
        .padding_mode(o.padding_mode());
  }
  /// Refuses grouped convolutions.
  static void check(const Options& o, const std::string& where) {
    TORCH_CHECK(o.groups() == 1, where,
                ": LoRA needs a Conv2d with groups == 1, got groups = ", o.groups());
  }
  /// A: in → r with the base's geometry.
  static Adapter make_A(const Options& o, int64_t r) {
    return Adapter(torch::nn::Conv2dOptions(o.in_channels(), r, o.kernel_size())
                       .stride(o.stride())
                       .padding(o.padding())
                       .dilation(o.dilation())
                       .padding_mode(o.padding_mode())
                       .bias(false));
  }
  /// B: r → out, 1×1.
  static Adapter make_B(const Options& o, int64_t r) {
    return Adapter(torch::nn::Conv2dOptions(r, o.out_channels(), 1).bias(false));
  }
  /// Shape of A.
  static std::vector<int64_t> a_shape(const Options& o, int64_t r) {
    return {r, o.in_channels(), (*o.kernel_size())[0], (*o.kernel_size())[1]};
  }
  /// Shape of B.
  static std::vector<int64_t> b_shape(const Options& o, int64_t r) {
    return {o.out_channels(), r, 1, 1};
  }
  /// B · A as a conv weight: [out, r] @ [r, in·kh·kw] -> [out, in, kh, kw].
  static torch::Tensor product(const torch::Tensor& a, const torch::Tensor& b,
                               at::IntArrayRef shape) {
    return b.flatten(1).matmul(a.flatten(1)).reshape(shape);
  }
};

namespace detail {

/// True when a dotted module path passes through a `lora_A` / `lora_B` container.
inline bool lora_in_adapter_path(const std::string& path) {
  std::stringstream stream(path);
  std::string part;
  while (std::getline(stream, part, '.')) {
    if (part == "lora_A" || part == "lora_B") return true;
  }
  return false;
}

/// Checks an adapter name and options; `where` names the layer.
inline void lora_check_adapter(const std::string& where, const std::string& name,
                               const LoRAOptions& o) {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos, where,
              ": adapter name must be non-empty and contain no '.', got '", name, "'");
  TORCH_CHECK(o.r() > 0, where, ": adapter '", name, "' needs rank r > 0, got r = ", o.r());
  TORCH_CHECK(std::isfinite(o.alpha()), where, ": adapter '", name, "' has alpha = ", o.alpha());
  TORCH_CHECK(o.dropout() >= 0 && o.dropout() < 1, where, ": adapter '", name,
              "' needs dropout in [0, 1), got ", o.dropout());
}

}  // namespace detail

/// The adapter bookkeeping both ways share: the `lora_A` / `lora_B` dicts, merging, deltas.
/// `Interface` is `LoRALayer` or an interface derived from it.
template <typename BaseImpl, typename Interface = LoRALayer>
class BasicLoRALayer : public Interface {
 public:
  /// Construction helpers for this base type.
  using Traits = LoRATraits<BaseImpl>;
  /// A's and B's holder type.
  using Adapter = typename Traits::Adapter;

  /// The A modules, by adapter name.
  torch::nn::ModuleDict lora_A{nullptr};
  /// The B modules, by adapter name.
  torch::nn::ModuleDict lora_B{nullptr};

  /// "Linear" or "Conv2d".
  std::string kind() const override { return Traits::kind; }
  /// Adapter names, in the order they were added.
  std::vector<std::string> adapter_names() const override {
    std::vector<std::string> names;
    for (const auto& a : adapters_) names.push_back(a.info.name);
    return names;
  }
  /// Whether an adapter of this name exists.
  bool has_adapter(const std::string& name) const override { return find_(name) != nullptr; }
  /// The settings and state of adapter `name`.
  const LoRAAdapterInfo& adapter(const std::string& name) const override { return at_(name).info; }
  /// Adds adapter `name` (B zero, so the output is unchanged).
  void add_adapter(const std::string& name, const LoRAOptions& options) override {
    detail::lora_check_adapter(label_, name, options);
    check_options_(name, options);
    TORCH_CHECK(find_(name) == nullptr, label_, ": adapter '", name, "' already exists");
    adapters_.push_back(make_adapter_(LoRAAdapterInfo{name, options}));
    changed_();
  }
  /// Removes adapter `name`; a merged adapter is unmerged first.
  void delete_adapter(const std::string& name) override {
    if (at_(name).info.merged) unmerge(name);
    lora_A->pop(name);  // pop keeps the registration (as in Python): drop it too
    lora_A->unregister_module(name);
    lora_B->pop(name);
    lora_B->unregister_module(name);
    adapters_.erase(std::find_if(adapters_.begin(), adapters_.end(),
                                 [&](const Entry& a) { return a.info.name == name; }));
    changed_();
  }
  /// Sets the mixing weight w of adapter `name` (not while merged).
  void set_adapter_weight(const std::string& name, double weight) override {
    auto& a = unmerged_(name, "change its weight");
    TORCH_CHECK(std::isfinite(weight), label_, ": adapter '", name, "' weight ", weight);
    a.info.weight = weight;
    changed_();
  }
  /// Enables or disables adapter `name` (not while merged).
  void set_adapter_enabled(const std::string& name, bool enabled) override {
    auto& a = enabled ? at_(name) : unmerged_(name, "disable it");
    a.info.enabled = enabled;
    changed_();
  }
  /// Sets alpha and rsLoRA of adapter `name`, keeping its rank (not while merged).
  void set_adapter_alpha(const std::string& name, double alpha, bool use_rslora) override {
    auto& a = unmerged_(name, "change its alpha");
    a.info.options.alpha(alpha).use_rslora(use_rslora);
    detail::lora_check_adapter(label_, name, a.info.options);
    changed_();
  }
  /// Enables or disables all adapters (disabling needs none merged).
  void set_enabled(bool enabled) override {
    if (!enabled) {
      for (const auto& a : adapters_) {
        TORCH_CHECK(!a.info.merged, label_, ": cannot disable the adapters while '", a.info.name,
                    "' is merged into the base weight; unmerge it first");
      }
    }
    enabled_ = enabled;
    changed_();
  }
  /// Whether the adapters are globally enabled.
  bool enabled() const override { return enabled_; }
  /// Adds w · s · B · A of adapter `name` into W0, in place; forward then skips it.
  void merge(const std::string& name) override {
    auto& a = unmerged_(name, "merge it again");
    TORCH_CHECK(enabled_ && a.info.enabled, label_, ": adapter '", name,
                "' is disabled; enable it before merging");
    auto w0 = this->base_weight();
    {
      torch::NoGradGuard no_grad;
      w0.add_(delta_(a, a.info.factor()).to(w0.scalar_type()));
    }
    a.info.merged = true;
    a.info.merged_factor = a.info.factor();
    changed_();
  }
  /// Subtracts what `merge` added.
  void unmerge(const std::string& name) override {
    auto& a = at_(name);
    TORCH_CHECK(a.info.merged, label_, ": adapter '", name, "' is not merged");
    auto w0 = this->base_weight();
    {
      torch::NoGradGuard no_grad;
      w0.sub_(delta_(a, a.info.merged_factor).to(w0.scalar_type()));
    }
    a.info.merged = false;
    a.info.merged_factor = 0.0;
    changed_();
  }
  /// The A parameter of adapter `name`.
  torch::Tensor lora_A_weight(const std::string& name) const override {
    return at_(name).A->weight;
  }
  /// The B parameter of adapter `name`.
  torch::Tensor lora_B_weight(const std::string& name) const override {
    return at_(name).B->weight;
  }
  /// w · s · B · A of adapter `name`, shaped like W0.
  torch::Tensor delta_weight(const std::string& name) const override {
    const auto& a = at_(name);
    return delta_(a, a.info.factor());
  }
  /// W0 + the deltas of every enabled, unmerged adapter.
  torch::Tensor effective_weight() const override {
    torch::Tensor w = this->base_weight();
    if (!enabled_) return w;
    for (const auto& a : adapters_) {
      if (active_(a)) w = w + delta_(a, a.info.factor()).to(w.scalar_type());
    }
    return w;
  }
  /// Every A and B parameter.
  std::vector<torch::Tensor> lora_parameters() const override {
    std::vector<torch::Tensor> params;
    for (const auto& a : adapters_) {
      params.push_back(a.A->weight);
      params.push_back(a.B->weight);
    }
    return params;
  }
  /// The shape A of rank r has on this layer.
  std::vector<int64_t> expected_A_shape(int64_t r) const override {
    return Traits::a_shape(base_options_(), r);
  }
  /// The shape B of rank r has on this layer.
  std::vector<int64_t> expected_B_shape(int64_t r) const override {
    return Traits::b_shape(base_options_(), r);
  }

 protected:
  /// One adapter: its state and its two modules (the same modules the dicts hold).
  struct Entry {
    /// Settings and state.
    LoRAAdapterInfo info;
    /// The down projection A (also in `lora_A`).
    Adapter A{nullptr};
    /// The up projection B (also in `lora_B`).
    Adapter B{nullptr};
  };

  /// The options of the base layer (sizes and geometry of the adapters).
  virtual typename Traits::Options base_options_() const = 0;
  /// Called after every change of adapters or their state.
  virtual void changed_() {}
  /// Extra checks of a new adapter's options.
  virtual void check_options_(const std::string&, const LoRAOptions&) const {}

  /// Whether adapter `a` contributes to the forward.
  bool active_(const Entry& a) const {
    return enabled_ && a.info.enabled && !a.info.merged && a.info.weight != 0.0;
  }
  /// factor · B · A shaped like W0 (the adapter's dtype).
  torch::Tensor delta_(const Entry& a, double factor) const {
    return Traits::product(a.A->weight, a.B->weight, this->base_weight().sizes()) * factor;
  }
  /// Builds, initialises (on CPU, then moved to W0's device and dtype) and registers the
  /// modules of one adapter.
  Entry make_adapter_(LoRAAdapterInfo info) {
    const auto base = base_options_();
    Traits::check(base, label_);
    Entry a{std::move(info)};
    const int64_t r = a.info.options.r();
    a.A = Traits::make_A(base, r);
    a.B = Traits::make_B(base, r);
    {
      torch::NoGradGuard no_grad;
      if (a.info.options.init() == LoRAInit::gaussian) {
        a.A->weight.normal_(0.0, 1.0 / static_cast<double>(r));
      } else {
        torch::nn::init::kaiming_uniform_(a.A->weight, std::sqrt(5.0));
      }
      a.B->weight.zero_();
    }
    const auto w0 = this->base_weight();
    if (w0.defined()) {
      a.A->to(w0.device(), w0.scalar_type());
      a.B->to(w0.device(), w0.scalar_type());
    }
    lora_A->update({{a.info.name, a.A.ptr()}});
    lora_B->update({{a.info.name, a.B.ptr()}});
    return a;
  }
  /// The adapter named `name`, or nullptr.
  const Entry* find_(const std::string& name) const {
    for (const auto& a : adapters_) {
      if (a.info.name == name) return &a;
    }
    return nullptr;
  }
  /// The adapter named `name`; throws naming the known ones.
  const Entry& at_(const std::string& name) const {
    const Entry* a = find_(name);
    if (a == nullptr) {
      std::string known;
      for (const auto& e : adapters_) known += (known.empty() ? "" : ", ") + e.info.name;
      TORCH_CHECK(false, label_, ": no adapter '", name,
                  "' (adapters: ", known.empty() ? "none" : known, ")");
    }
    return *a;
  }
  /// Mutable `at_`.
  Entry& at_(const std::string& name) { return const_cast<Entry&>(std::as_const(*this).at_(name)); }
  /// The adapter named `name`, which must not be merged (`action` says what was refused).
  Entry& unmerged_(const std::string& name, const char* action) {
    auto& a = at_(name);
    TORCH_CHECK(!a.info.merged, label_, ": adapter '", name, "' is merged into the base weight; ",
                "unmerge it before you ", action);
    return a;
  }

  /// The adapters, in the order they were added.
  std::vector<Entry> adapters_;
  /// Global switch.
  bool enabled_ = true;
  /// How messages name this layer.
  std::string label_ = "LoRA";
};

}  // namespace scedit
