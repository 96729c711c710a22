#pragma once
/// @file csctuner.hpp
/// @brief CSC-Tuner: SCEdit's controllable skip-connection tuner.
///
/// A condition image (edges, depth, pose, colour, ...) goes through a small hint encoder
/// (`pre_hint_blocks`, then a zero-initialised cascade `dense_hint_blocks` with one output per
/// encoder skip) and each skip `s` is edited as `c + MLP(s + c)` with its hint feature `c`.
/// Several CSC-Tuners (conditions) and an SC-Tuner compose on the same sites:
/// `s + control_scale · Σ_k scale_k · (c_k + MLP_k(s + c_k)) + tuner_scale · (T(s) − s)`.
/// Reference: scepter `scepter/modules/model/tuner/sce/` and SCEdit (CVPR 2024), section 3.3.
///
/// Conditions are explicit: a `ConditionScope` gives each CSC-Tuner its condition image for one
/// forward pass (or one sampling call) and takes the hint features away again when it ends, so
/// no condition, and no autograd graph, outlives the call it was meant for.
///
/// Example:
/// @code
/// scedit::CSCTuner csc(scedit::CSCTunerOptions(unet->skip_channels(), unet->skip_down_flags()));
/// scedit::attach_csc_tuner(*unet, csc, "canny");
/// {
///   scedit::ConditionScope conditions;
///   conditions.set(csc, edges);           // [N, 3, 8h, 8w] in [0, 1]
///   auto eps = unet(latents, t, text);    // every skip edited with its hint
/// }                                       // the hint features are gone
/// @endcode

#include <scedit/sctuner.hpp>
#include <scedit/sites.hpp>

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace scedit {

class ConditionScope;

/// Options of a `CSCTuner`.
struct CSCTunerOptions {
  /// Skip channels and whether each encoder stage halved the resolution, both in ENCODER order
  /// (for SD 1.5: 320,320,320,320,640,640,640,1280×5 and true at indices 3, 6, 9).
  CSCTunerOptions(std::vector<int64_t> skip_channels, std::vector<bool> down_flags)
      : skip_channels_(std::move(skip_channels)), down_flags_(std::move(down_flags)) {}
  /// Channels of each skip, encoder order.
  TORCH_ARG(std::vector<int64_t>, skip_channels);
  /// Whether each encoder skip is at half the resolution of the previous one (stride-2 hint conv).
  TORCH_ARG(std::vector<bool>, down_flags);
  /// Channels of the condition image.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Width multiplier r of the pre-hint convs (1 for SD 1.5/2.1, 2 for SDXL).
  TORCH_ARG(int64_t, hint_ratio) = 1;
  /// Output channels P of the pre-hint encoder (256 for SD 1.5/2.1, 320 for SDXL).
  TORCH_ARG(int64_t, hint_channels) = 256;
  /// Kernel of the dense hint convs: 3 (the released configs) or 1 (the paper's parameter count).
  TORCH_ARG(int64_t, kernel_size) = 3;
  /// Hidden width of the per-skip MLPs as a fraction of the skip channels.
  TORCH_ARG(double, down_ratio) = 1.0;
  /// This condition's strength scale_k.
  TORCH_ARG(double, scale) = 1.0;
  /// Global strength of all conditions (`control_scale`); see `set_control_scale`.
  TORCH_ARG(double, control_scale) = 1.0;
  /// Which skips the tuner edits, in DECODER order (`attach_csc_tuner` leaves the others alone);
  /// empty: all of them. The hint cascade still runs through every encoder skip.
  TORCH_ARG(std::vector<bool>, edited_skips) = {};
};

/// CSC-Tuner: hint encoder + one tuner MLP per skip (keys as scepter: `pre_hint_blocks.*`,
/// `dense_hint_blocks.{i}.1.*` in encoder order, `lsc_tuner_blocks.{k}.tuner_op.*` in decoder
/// order).
class CSCTunerImpl : public torch::nn::Cloneable<CSCTunerImpl>, public Tuner {
 public:
  /// Builds the hint encoder and the per-skip MLPs; a fresh tuner adds nothing to any skip.
  explicit CSCTunerImpl(CSCTunerOptions options) : options(std::move(options)) { reset(); }

  /// Registers `pre_hint_blocks`, `dense_hint_blocks` and `lsc_tuner_blocks`.
  void reset() override {
    const auto& channels = options.skip_channels();
    TORCH_CHECK(!channels.empty(), "CSCTuner: skip_channels is empty");
    TORCH_CHECK(channels.size() == options.down_flags().size(), "CSCTuner: ", channels.size(),
                " skip channels but ", options.down_flags().size(), " down flags");
    TORCH_CHECK(options.kernel_size() == 1 || options.kernel_size() == 3,
                "CSCTuner: kernel_size must be 1 or 3, got ", options.kernel_size());
    TORCH_CHECK(options.hint_ratio() > 0 && options.hint_channels() > 0 && options.in_channels() > 0,
                "CSCTuner: in_channels, hint_ratio and hint_channels must be positive");
    TORCH_CHECK(options.edited_skips().empty() || options.edited_skips().size() == channels.size(),
                "CSCTuner: edited_skips has ", options.edited_skips().size(), " entries for ",
                channels.size(), " skips");

    // pre_hint_blocks: 3x3 convs with SiLU between them; three stride-2 convs bring the
    // full-resolution condition down to latent resolution (indices 0, 2, ..., 12 are convs).
    const int64_t r = options.hint_ratio();
    const std::vector<std::tuple<int64_t, int64_t, int64_t>> convs = {
        {options.in_channels(), 16 * r, 1}, {16 * r, 16 * r, 1}, {16 * r, 32 * r, 2},
        {32 * r, 32 * r, 1},                {32 * r, 96 * r, 2}, {96 * r, 96 * r, 1},
        {96 * r, options.hint_channels(), 2}};
    pre_hint_blocks = torch::nn::Sequential();
    for (size_t i = 0; i < convs.size(); ++i) {
      const auto [in, out, stride] = convs[i];
      if (i > 0) pre_hint_blocks->push_back(torch::nn::SiLU());
      pre_hint_blocks->push_back(
          torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1)));
    }
    pre_hint_blocks = register_module("pre_hint_blocks", pre_hint_blocks);

    // dense_hint_blocks: SiLU -> zero-initialised conv per encoder skip, each from the previous.
    dense_hint_blocks = register_module("dense_hint_blocks", torch::nn::ModuleList());
    int64_t previous = options.hint_channels();
    for (size_t i = 0; i < channels.size(); ++i) {
      torch::nn::Sequential block(
          torch::nn::SiLU(),
          torch::nn::Conv2d(torch::nn::Conv2dOptions(previous, channels[i], options.kernel_size())
                                .stride(options.down_flags()[i] ? 2 : 1)
                                .padding(options.kernel_size() / 2)));
      dense_hint_blocks->push_back(block);
      previous = channels[i];
    }

    // lsc_tuner_blocks: one MLP per skip in DECODER order (the reverse of the encoder's).
    lsc_tuner_blocks = register_module("lsc_tuner_blocks", torch::nn::ModuleList());
    for (size_t k = 0; k < channels.size(); ++k) {
      lsc_tuner_blocks->push_back(
          SCTuner(SCTunerOptions(channels[channels.size() - 1 - k]).down_ratio(options.down_ratio())));
    }
    bind();
    reset_parameters();
    features_.clear();
  }

  /// A deep copy. (Cloneable's copy replaces the module lists' contents after `reset`, so the
  /// copy's typed views of them are read again.)
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device = torch::nullopt) const override {
    auto copy = torch::nn::Cloneable<CSCTunerImpl>::clone(device);
    std::dynamic_pointer_cast<CSCTunerImpl>(copy)->bind();  // Module is a virtual base
    return copy;
  }

  /// Zero-initialises the dense hint convs (weight and bias) and the MLPs' ln2, as the reference,
  /// so a fresh tuner adds nothing. The pre-hint convs get He-normal weights and zero biases where
  /// the reference keeps torch's default (uniform weights of a third of the variance, uniform
  /// biases): through its seven convs that default keeps under 1% of what differs between two
  /// conditions, and the tuner learns to use its condition only slowly (docs/ARCHITECTURE.md).
  /// The dense convs of skips the tuner leaves alone (`edited_skips`) get the pre-hint convs'
  /// init too: their output is added to no skip, only passed down the cascade, and a zero conv
  /// there would pass deeper edited skips nothing, and no gradient back (the chain never starts).
  void reset_parameters() {
    torch::NoGradGuard no_grad;
    auto he_normal = [](torch::nn::Conv2dImpl& conv) {
      torch::nn::init::kaiming_normal_(conv.weight, 0.0, torch::kFanIn, torch::kReLU);
      conv.bias.zero_();
    };
    for (auto& module : pre_hint_blocks->children()) {
      if (auto conv = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module)) he_normal(*conv);
    }
    const int64_t n = num_skips();
    for (int64_t i = 0; i < n; ++i) {  // encoder order: decoder skip n - 1 - i
      auto& block = dense_blocks_[static_cast<size_t>(i)];
      if (edits(n - 1 - i)) {
        for (auto& p : block->parameters()) p.zero_();
      } else {
        he_normal(*block->ptr(1)->as<torch::nn::Conv2dImpl>());
      }
    }
    for (auto& block : tuner_blocks_) block->tuner_op->reset_parameters();
  }

  /// Number of skips this tuner edits.
  int64_t num_skips() const { return static_cast<int64_t>(options.skip_channels().size()); }

  /// Whether the tuner edits decoder skip `k` (`CSCTunerOptions::edited_skips`).
  bool edits(int64_t k) const {
    return options.edited_skips().empty() || options.edited_skips()[static_cast<size_t>(k)];
  }

  /// Clears `requires_grad` of the parameters that no edited skip uses (`edited_skips`), which
  /// would never get a gradient: the MLPs of the other skips, and the hint convs past the deepest
  /// edited skip (encoder skip i's hint runs through dense blocks 0 … i). Call it after
  /// `freeze_except_tuners`, which sets `requires_grad` on every tuner parameter. A tuner that
  /// edits every skip keeps all.
  void freeze_unedited() {
    const int64_t n = num_skips();
    int64_t deepest = -1;  // encoder order
    for (int64_t k = 0; k < n; ++k) {
      if (edits(k)) {
        deepest = std::max(deepest, n - 1 - k);
      } else {
        for (auto& p : tuner_blocks_[static_cast<size_t>(k)]->parameters()) p.set_requires_grad(false);
      }
    }
    for (int64_t i = deepest + 1; i < n; ++i) {
      for (auto& p : dense_blocks_[static_cast<size_t>(i)]->parameters()) p.set_requires_grad(false);
    }
  }

  /// Channels of decoder skip `k` (k = 0 is the deepest).
  int64_t decoder_channels(int64_t k) const {
    return options.skip_channels()[options.skip_channels().size() - 1 - k];
  }

  /// Hint features for every skip, in DECODER order, from a condition image
  /// [N, in_channels, 8h, 8w] in [0, 1]: pre-hint encoder, then the dense cascade.
  std::vector<torch::Tensor> hint_features(const torch::Tensor& condition) {
    TORCH_CHECK(condition.dim() == 4 && condition.size(1) == options.in_channels(),
                "CSCTuner: expected a condition image [N, ", options.in_channels(),
                ", H, W], got ", condition.sizes());
    auto h = pre_hint_blocks->forward(condition);  // [N, 3, 8h, 8w] -> [N, P, h, w]
    std::vector<torch::Tensor> features(dense_blocks_.size());
    for (size_t i = 0; i < dense_blocks_.size(); ++i) {
      h = dense_blocks_[i]->forward(h);  // [N, C_i, h_i, w_i], encoder order
      features[features.size() - 1 - i] = h;
    }
    return features;
  }

  /// Whether a `ConditionScope` has given this tuner a condition.
  bool has_condition() const { return !features_.empty(); }

  /// The edit of decoder skip `k`: `control_scale·scale·(c_k + MLP_k(s + c_k))`.
  torch::Tensor delta(int64_t k, const torch::Tensor& skip) {
    TORCH_CHECK(has_condition(), "CSCTuner: no condition for this forward pass; give it one "
                "through a scedit::ConditionScope around the model call");
    TORCH_CHECK(k >= 0 && k < num_skips(), "CSCTuner: skip index ", k, " out of range [0, ",
                num_skips(), ")");
    auto c = features_[k];
    TORCH_CHECK(skip.dim() == 4 && skip.sizes().slice(1) == c.sizes().slice(1),
                "CSCTuner: skip ", k, " has shape ", skip.sizes(), " but its hint feature has ",
                c.sizes(), "; the condition image must be 8× the latent size");
    if (c.size(0) != skip.size(0)) {
      // Classifier-free guidance runs [uncond; cond] in one batch: repeat the hint for both.
      TORCH_CHECK(skip.size(0) % c.size(0) == 0, "CSCTuner: skip batch ", skip.size(0),
                  " is not a multiple of the condition batch ", c.size(0));
      c = c.repeat({skip.size(0) / c.size(0), 1, 1, 1});
    }
    const double weight = options.control_scale() * options.scale();
    auto edit = tuner_blocks_[k]->forward(skip + c, c);  // c + MLP(s + c)
    return weight == 1.0 ? edit : edit * weight;
  }

  /// Prints `scedit::CSCTuner(skips=12, hint_channels=256, kernel_size=1, scale=0.5)`.
  void pretty_print(std::ostream& stream) const override {
    const CSCTunerOptions defaults(options.skip_channels(), options.down_flags());
    stream << "scedit::CSCTuner(skips=" << num_skips();
    if (options.in_channels() != defaults.in_channels()) stream << ", in_channels=" << options.in_channels();
    if (options.hint_ratio() != defaults.hint_ratio()) stream << ", hint_ratio=" << options.hint_ratio();
    if (options.hint_channels() != defaults.hint_channels()) stream << ", hint_channels=" << options.hint_channels();
    if (options.kernel_size() != defaults.kernel_size()) stream << ", kernel_size=" << options.kernel_size();
    if (options.down_ratio() != defaults.down_ratio()) stream << ", down_ratio=" << options.down_ratio();
    if (options.scale() != defaults.scale()) stream << ", scale=" << options.scale();
    if (options.control_scale() != defaults.control_scale()) stream << ", control_scale=" << options.control_scale();
    if (!options.edited_skips().empty()) {
      stream << ", edited_skips=";
      for (bool edited : options.edited_skips()) stream << (edited ? '1' : '0');
    }
    stream << ")";
  }

  /// The options this tuner was built with.
  CSCTunerOptions options;
  /// The pre-hint conv encoder.
  torch::nn::Sequential pre_hint_blocks{nullptr};
  /// The dense hint cascade, encoder order.
  torch::nn::ModuleList dense_hint_blocks{nullptr};
  /// One `SCTuner` (its `tuner_op` MLP) per skip, decoder order.
  torch::nn::ModuleList lsc_tuner_blocks{nullptr};

 private:
  // Typed views of dense_hint_blocks and lsc_tuner_blocks, for the forward passes.
  void bind() {
    dense_blocks_.clear();
    for (size_t i = 0; i < dense_hint_blocks->size(); ++i) {
      dense_blocks_.emplace_back(dense_hint_blocks->ptr<torch::nn::SequentialImpl>(i));
    }
    tuner_blocks_.clear();
    for (size_t k = 0; k < lsc_tuner_blocks->size(); ++k) {
      tuner_blocks_.emplace_back(lsc_tuner_blocks->ptr<SCTunerImpl>(k));
    }
  }

  std::vector<torch::nn::Sequential> dense_blocks_;
  std::vector<SCTuner> tuner_blocks_;
  friend class ConditionScope;
  std::vector<torch::Tensor> features_;  // decoder order, while a ConditionScope lives
};

/// Holder of `CSCTunerImpl`.
TORCH_MODULE(CSCTuner);

/// The view of one CSC-Tuner from one site: edits decoder skip `k` with the tuner's hint.
class CSCSkipEditor : public SkipEditor {
 public:
  /// Edits decoder skip `k` of `tuner`.
  CSCSkipEditor(CSCTuner tuner, int64_t k) : tuner_(std::move(tuner)), k_(k) {}
  /// `control_scale·scale·(c_k + MLP_k(s + c_k))`.
  torch::Tensor delta(const torch::Tensor& skip) override { return tuner_->delta(k_, skip); }
  /// The condition's strength (shared by all sites of this tuner).
  double scale() const override { return tuner_->options.scale(); }
  /// Sets the condition's strength (for all sites of this tuner).
  void set_scale(double scale) override { tuner_->options.scale(scale); }
  /// The tuner this view belongs to.
  const CSCTuner& tuner() const { return tuner_; }
  /// The decoder skip this view edits.
  int64_t skip_index() const { return k_; }

 private:
  CSCTuner tuner_;
  int64_t k_;
};

/// Name of the `torch::nn::ModuleDict` child of a model that holds its attached CSC-Tuners. A
/// model that is to be cloned with CSC-Tuners attached registers an empty one in its `reset()`
/// (and calls `relink_csc_tuners` after cloning); otherwise `attach_csc_tuner` adds it.
inline constexpr const char* kCSCTunersKey = "csc_tuners";

namespace detail {
/// The `csc_tuners` dictionary of `model`, or null.
inline torch::nn::ModuleDict csc_tuner_dict(const torch::nn::Module& model) {
  for (const auto& child : model.named_children()) {
    if (child.key() != kCSCTunersKey) continue;
    auto dict = std::dynamic_pointer_cast<torch::nn::ModuleDictImpl>(child.value());
    TORCH_CHECK(dict != nullptr, "the child '", kCSCTunersKey, "' of this model is a ",
                child.value()->name(), ", not the ModuleDict of its CSC-Tuners");
    return torch::nn::ModuleDict(dict);
  }
  return torch::nn::ModuleDict(nullptr);
}
}  // namespace detail

/// The CSC-Tuners attached to `model`, by name, in attachment order.
inline torch::OrderedDict<std::string, CSCTuner> csc_tuners(const torch::nn::Module& model) {
  torch::OrderedDict<std::string, CSCTuner> tuners;
  const auto dict = detail::csc_tuner_dict(model);
  if (dict.is_empty()) return tuners;
  for (const auto& item : dict->items()) {
    auto tuner = std::dynamic_pointer_cast<CSCTunerImpl>(item.second);
    TORCH_CHECK(tuner != nullptr, "csc_tuners: '", item.first, "' is a ", item.second->name(),
                ", not a CSC-Tuner");
    tuners.insert(item.first, CSCTuner(tuner));
  }
  return tuners;
}

/// Attaches `tuner` to the sites of `model` matching `pattern` (site k, in `find_sites` order,
/// gets decoder skip k, if the tuner edits it) and registers it under `name` in the model's
/// `csc_tuners` dictionary, so the model's `parameters()`, `to()` and `state_dict` include it once.
inline void attach_csc_tuner(torch::nn::Module& model, const CSCTuner& tuner,
                             const std::string& name = "csc", const std::string& pattern = "") {
  auto sites = find_sites(model, pattern);
  TORCH_CHECK(static_cast<int64_t>(sites.size()) == tuner->num_skips(), "attach_csc_tuner: the "
              "tuner edits ", tuner->num_skips(), " skips but ", sites.size(),
              " sites match pattern '", pattern, "'");
  for (size_t k = 0; k < sites.size(); ++k) {
    TORCH_CHECK(sites[k].site->skip_channels() == tuner->decoder_channels(k), "attach_csc_tuner: "
                "site ", sites[k].path, " has ", sites[k].site->skip_channels(),
                " channels but the tuner's decoder skip ", k, " has ", tuner->decoder_channels(k));
    TORCH_CHECK(sites[k].site->find(name) == nullptr, "attach_csc_tuner: site ", sites[k].path,
                " already has a tuner named '", name, "'");
  }
  auto dict = detail::csc_tuner_dict(model);
  if (dict.is_empty()) dict = model.register_module(kCSCTunersKey, torch::nn::ModuleDict());
  TORCH_CHECK(!dict->contains(name), "attach_csc_tuner: a CSC-Tuner named '", name,
              "' is attached already");
  dict->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
      {name, tuner.ptr()}});
  for (size_t k = 0; k < sites.size(); ++k) {
    if (!tuner->edits(static_cast<int64_t>(k))) continue;
    sites[k].site->attach(name, std::make_shared<CSCSkipEditor>(tuner, static_cast<int64_t>(k)));
  }
}

/// Detaches the CSC-Tuner `name` from every site and from the model.
inline void detach_csc_tuner(torch::nn::Module& model, const std::string& name) {
  auto dict = detail::csc_tuner_dict(model);
  TORCH_CHECK(!dict.is_empty() && dict->contains(name), "detach_csc_tuner: no CSC-Tuner named '",
              name, "' is attached");
  detach_tuners(model, name);
  dict->pop(name);
  dict->unregister_module(name);  // pop keeps the registration (as Python's ModuleDict does)
}

/// Points the sites of `model` at the CSC-Tuners its `csc_tuners` dictionary holds, by name. A
/// model's `clone()` calls it on the copy, whose sites still refer to the original's tuners.
inline void relink_csc_tuners(torch::nn::Module& model) {
  const auto tuners = csc_tuners(model);
  for (auto& ref : find_sites(model)) {
    for (const auto& name : ref.site->editor_names()) {
      const auto* editor = dynamic_cast<const CSCSkipEditor*>(ref.site->find(name));
      if (editor == nullptr) continue;
      const auto* tuner = tuners.find(name);
      TORCH_CHECK(tuner != nullptr, "relink_csc_tuners: site ", ref.path, " edits with CSC-Tuner '",
                  name, "', which the model does not hold");
      ref.site->replace(name, std::make_shared<CSCSkipEditor>(*tuner, editor->skip_index()));
    }
  }
}

/// Sets the global `control_scale` of every CSC-Tuner attached to `model`.
inline void set_control_scale(torch::nn::Module& model, double control_scale) {
  for (auto& item : csc_tuners(model)) item.value()->options.control_scale(control_scale);
}

/// The conditions of the CSC-Tuners for one forward pass, or one sampling call.
///
/// Each tuner gets its own condition image: `set` computes its hint features (recording autograd
/// when it is on, so a training step's backward reaches the hint encoder) and the tuner edits its
/// skips with them while the scope lives. When the scope ends the features, and their graph, are
/// gone; a tuner that must edit outside a scope refuses, naming the fix. A tuner set to scale 0
/// or disabled on its sites needs no condition.
///
/// Example:
/// @code
/// scedit::ConditionScope conditions;
/// conditions.set(canny, edges).set(depth, depth_map);  // each [N, 3, 8h, 8w] in [0, 1]
/// auto eps = unet(latents, t, text);
/// @endcode
class ConditionScope {
 public:
  /// A scope that has set no condition yet.
  ConditionScope() = default;
  ConditionScope(const ConditionScope&) = delete;
  ConditionScope& operator=(const ConditionScope&) = delete;
  /// Takes the hint features away from every tuner it set.
  ~ConditionScope() {
    for (auto& tuner : tuners_) tuner->features_.clear();
  }

  /// Gives `tuner` the condition image `condition` [N, in_channels, 8h, 8w] in [0, 1] (N divides
  /// the model's batch: a batch of one serves every sample and both halves of classifier-free
  /// guidance). Throws when the tuner already has a condition (set twice, or in another live
  /// scope).
  ConditionScope& set(const CSCTuner& tuner, const torch::Tensor& condition) {
    const auto impl = tuner.ptr();
    TORCH_CHECK(!impl->has_condition(), "ConditionScope: this CSC-Tuner has a condition already "
                "(set twice, or by another live scope)");
    impl->features_ = impl->hint_features(condition);
    tuners_.push_back(tuner);
    return *this;
  }

 private:
  std::vector<CSCTuner> tuners_;
};

}  // namespace scedit
