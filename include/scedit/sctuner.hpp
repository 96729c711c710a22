#pragma once
/// @file sctuner.hpp
/// @brief SC-Tuner: SCEdit's skip-connection tuner, `T(s) = s + ln2(GELU(ln1(s)))`.
///
/// Reference: Jiang et al., "SCEdit", CVPR 2024; scepter `scepter/modules/model/tuner/sce/`
/// (`SCTuner`). The MLP runs over channels; ln2 starts at zero so a fresh tuner is the identity.
///
/// Example:
/// @code
/// scedit::SCTuner tuner(scedit::SCTunerOptions(320));
/// auto y = tuner(x);  // x: [N, 320, H, W]
/// @endcode

#include <scedit/sites.hpp>

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace scedit {

namespace functional {

/// The tuner MLP over the channel dimension: `ln2(GELU(ln1(x)))` with exact (erf) GELU.
/// `x` is [N, C, H, W] (channels at dim 1) or [N, L, C] (channels last).
inline torch::Tensor channel_mlp(const torch::Tensor& x, torch::nn::Linear& ln1,
                                 torch::nn::Linear& ln2) {
  if (x.dim() == 3) return ln2(torch::gelu(ln1(x)));
  TORCH_CHECK(x.dim() == 4, "channel MLP: expected [N, C, H, W] or [N, L, C], got ", x.sizes());
  auto h = x.permute({0, 2, 3, 1});  // [N, C, H, W] -> [N, H, W, C]
  h = ln2(torch::gelu(ln1(h)));
  return h.permute({0, 3, 1, 2});    // [N, H, W, C] -> [N, C, H, W]
}

}  // namespace functional

/// Options of a `TunerMLP`.
struct TunerMLPOptions {
  /// Example: `TunerMLPOptions(320).down_ratio(0.25)`.
  explicit TunerMLPOptions(int64_t channels) : channels_(channels) {}
  /// Hidden width L = int(C · down_ratio).
  int64_t hidden() const { return static_cast<int64_t>(static_cast<double>(channels_) * down_ratio_); }
  /// Channels C of the feature the MLP edits.
  TORCH_ARG(int64_t, channels);
  /// Hidden width L = int(C · down_ratio); 1.0 (no bottleneck) in every reference config.
  TORCH_ARG(double, down_ratio) = 1.0;
  /// Whether ln1 and ln2 have biases.
  TORCH_ARG(bool, bias) = true;
};

/// The channel MLP `ln2(GELU(ln1(x)))` of SC- and CSC-Tuners (scepter's `tuner_op`).
/// ln1 has torch's default Linear init; ln2 is zero-initialised, so the MLP starts at zero.
class TunerMLPImpl : public torch::nn::Cloneable<TunerMLPImpl> {
 public:
  /// Builds ln1: C→L and ln2: L→C.
  explicit TunerMLPImpl(TunerMLPOptions options) : options(std::move(options)) { reset(); }

  /// Registers ln1 and ln2 and initialises them.
  void reset() override {
    TORCH_CHECK(options.channels() > 0, "TunerMLP: channels must be positive, got ",
                options.channels());
    TORCH_CHECK(options.hidden() > 0, "TunerMLP: channels ", options.channels(), " × down_ratio ",
                options.down_ratio(), " leaves no hidden width");
    ln1 = register_module(
        "ln1", torch::nn::Linear(torch::nn::LinearOptions(options.channels(), options.hidden())
                                     .bias(options.bias())));
    ln2 = register_module(
        "ln2", torch::nn::Linear(torch::nn::LinearOptions(options.hidden(), options.channels())
                                     .bias(options.bias())));
    reset_parameters();
  }

  /// ln1 gets torch's default Linear init (kaiming_uniform a=√5); ln2 weight and bias zero.
  void reset_parameters() {
    ln1->reset_parameters();
    torch::NoGradGuard no_grad;
    ln2->weight.zero_();
    if (options.bias()) ln2->bias.zero_();
  }

  /// `ln2(GELU(ln1(x)))` over channels of [N, C, H, W] or [N, L, C].
  torch::Tensor forward(const torch::Tensor& x) { return functional::channel_mlp(x, ln1, ln2); }

  /// Prints `scedit::TunerMLP(320, down_ratio=0.25)` (options that differ from defaults).
  void pretty_print(std::ostream& stream) const override {
    stream << "scedit::TunerMLP(" << options.channels();
    if (options.down_ratio() != 1.0) stream << ", down_ratio=" << options.down_ratio();
    if (!options.bias()) stream << ", bias=false";
    stream << ")";
  }

  /// The options this MLP was built with.
  TunerMLPOptions options;
  /// C → L projection.
  torch::nn::Linear ln1{nullptr};
  /// L → C projection (zero at init).
  torch::nn::Linear ln2{nullptr};
};

/// Holder of `TunerMLPImpl`.
TORCH_MODULE(TunerMLP);

/// Options of an `SCTuner`.
struct SCTunerOptions {
  /// Example: `scedit::SCTunerOptions(320).down_ratio(1.0).scale(0.6)`.
  explicit SCTunerOptions(int64_t channels) : channels_(channels) {}
  /// Channels C of the skip feature.
  TORCH_ARG(int64_t, channels);
  /// Hidden width of the MLP as a fraction of C (1.0 in every reference config).
  TORCH_ARG(double, down_ratio) = 1.0;
  /// Whether the MLP's layers have biases.
  TORCH_ARG(bool, bias) = true;
  /// Inference strength: `s + scale·(T(s) − s)`; 1 = as trained.
  TORCH_ARG(double, scale) = 1.0;
};

/// SC-Tuner: `T(s) = s + scale · ln2(GELU(ln1(s)))`. Registered child `tuner_op` gives the
/// reference key names (`tuner_op.ln1.weight`, ...).
class SCTunerImpl : public torch::nn::Cloneable<SCTunerImpl>, public SkipEditor, public Tuner {
 public:
  /// Builds the tuner; it is the identity until trained.
  explicit SCTunerImpl(SCTunerOptions options) : options(std::move(options)) { reset(); }

  /// Registers `tuner_op`.
  void reset() override {
    tuner_op = register_module("tuner_op", TunerMLP(TunerMLPOptions(options.channels())
                                                        .down_ratio(options.down_ratio())
                                                        .bias(options.bias())));
  }

  /// Re-initialises the MLP (ln2 back to zero: identity).
  void reset_parameters() { tuner_op->reset_parameters(); }

  /// `shortcut + scale·MLP(x)`, where the shortcut defaults to `x` itself: `x + scale·MLP(x)`.
  /// The two-argument form is the reference's (CSC-Tuners pass the hint as shortcut).
  /// (One function with a default rather than two overloads, so the holder's `operator()` works.)
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& shortcut = {}) {
    return (shortcut.defined() ? shortcut : x) + delta(x);
  }

  /// The edit a site adds: `scale·MLP(s)` = `scale·(T(s) − s)`.
  torch::Tensor delta(const torch::Tensor& skip) override {
    auto change = tuner_op(skip);
    return options.scale() == 1.0 ? change : change * options.scale();
  }

  /// Current strength.
  double scale() const override { return options.scale(); }

  /// Sets the strength (0 turns the tuner into the identity).
  void set_scale(double scale) override { options.scale(scale); }

  /// Prints `scedit::SCTuner(320, scale=0.6)` (options that differ from defaults).
  void pretty_print(std::ostream& stream) const override {
    stream << "scedit::SCTuner(" << options.channels();
    if (options.down_ratio() != 1.0) stream << ", down_ratio=" << options.down_ratio();
    if (!options.bias()) stream << ", bias=false";
    if (options.scale() != 1.0) stream << ", scale=" << options.scale();
    stream << ")";
  }

  /// The options this tuner was built with.
  SCTunerOptions options;
  /// The channel MLP.
  TunerMLP tuner_op{nullptr};
};

/// Holder of `SCTunerImpl`.
TORCH_MODULE(SCTuner);

/// How `attach_sc_tuners` builds and names its tuners.
struct SCAttachOptions {
  /// Name of the tuner on each site (a site can hold several, under different names).
  TORCH_ARG(std::string, name) = "sc";
  /// Regex over site paths (whole-path match); empty = every site.
  TORCH_ARG(std::string, pattern) = "";
  /// Hidden width as a fraction of each site's channels.
  TORCH_ARG(double, down_ratio) = 1.0;
  /// Whether the MLPs have biases.
  TORCH_ARG(bool, bias) = true;
  /// Initial strength.
  TORCH_ARG(double, scale) = 1.0;
};

/// Attaches a fresh SC-Tuner, sized to each site's skip, to every site of `model` matching
/// `options.pattern()`. The tuners become registered children of their sites. Returns them in
/// site order (`find_sites`), which is the order `save_sc_tuners` numbers them in.
inline std::vector<SCTuner> attach_sc_tuners(torch::nn::Module& model,
                                             const SCAttachOptions& options = {}) {
  auto sites = find_sites(model, options.pattern());
  TORCH_CHECK(!sites.empty(), "attach_sc_tuners: no skip site matches pattern '",
              options.pattern(), "'");
  std::vector<SCTuner> tuners;
  for (auto& ref : sites) {
    SCTuner tuner(SCTunerOptions(ref.site->skip_channels())
                      .down_ratio(options.down_ratio())
                      .bias(options.bias())
                      .scale(options.scale()));
    ref.site->attach(options.name(), tuner.ptr(), tuner.ptr());
    tuners.push_back(tuner);
  }
  return tuners;
}

/// The SC-Tuners attached under `name` on the sites of `model` matching `pattern`, in site order.
inline std::vector<SCTuner> sc_tuners(torch::nn::Module& model, const std::string& name = "sc",
                                      const std::string& pattern = "") {
  std::vector<SCTuner> tuners;
  for (auto& ref : find_sites(model, pattern)) {
    auto* editor = ref.site->find(name);
    if (editor == nullptr) continue;
    auto* impl = dynamic_cast<SCTunerImpl*>(editor);
    TORCH_CHECK(impl != nullptr, "sc_tuners: tuner '", name, "' on site ", ref.path,
                " is not an SC-Tuner");
    tuners.emplace_back(std::dynamic_pointer_cast<SCTunerImpl>(impl->shared_from_this()));
  }
  return tuners;
}

/// Sets the strength of the tuners named `name` on every matching site.
inline void set_tuner_scale(torch::nn::Module& model, const std::string& name, double scale,
                            const std::string& pattern = "") {
  for (auto& ref : find_sites(model, pattern)) {
    if (ref.site->find(name) != nullptr) ref.site->set_scale(name, scale);
  }
}

/// Turns the tuners named `name` on or off on every matching site.
inline void set_tuner_enabled(torch::nn::Module& model, const std::string& name, bool enabled,
                              const std::string& pattern = "") {
  for (auto& ref : find_sites(model, pattern)) {
    if (ref.site->find(name) != nullptr) ref.site->set_enabled(name, enabled);
  }
}

/// Removes the tuners named `name` from every matching site.
inline void detach_tuners(torch::nn::Module& model, const std::string& name,
                          const std::string& pattern = "") {
  for (auto& ref : find_sites(model, pattern)) {
    if (ref.site->find(name) != nullptr) ref.site->detach(name);
  }
}

}  // namespace scedit
