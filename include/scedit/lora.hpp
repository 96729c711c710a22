#pragma once
/// @file lora.hpp
/// @brief LoRA for Linear and Conv2d layers: the wrapper modules `LoRALinear` / `LoRAConv2d`,
/// and (through lora_inject.hpp, which it includes) injection into models written the LibTorch
/// way.
///
/// ## Two ways to run it
///
/// **Activation side: `LoRALinear` / `LoRAConv2d` (this file).** Modules for code written with
/// them: a `base_layer` child plus the adapters, `forward(x) = base(x) + Σ_a w_a · s_a ·
/// B_a(A_a(drop(x)))`. Supports dropout. Use them where you write the model.
///
/// **Weight side: `inject_lora(model, config)` (lora_inject.hpp).** For a model whose members
/// are plain `torch::nn::Linear` / `torch::nn::Conv2d` holders: the adapters are registered on
/// the layers themselves and the layers' `weight` members are rebound to `W0 + Σ_a w_a · s_a ·
/// B_a · A_a`. Call `refresh()` before each training forward; no dropout.
///
/// Both share lora_layer.hpp (options, the `LoRALayer` interface, merging) and are driven by
/// adapter name across a model through `LoRALayers`; lora_io.hpp reads and writes their files.
///
/// Example:
/// @code
/// scedit::LoRALinear to_q(torch::nn::LinearOptions(320, 320).bias(false),
///                         scedit::LoRAOptions(8).alpha(8));
/// torch::optim::AdamW optimizer(scedit::lora_parameters(*to_q), 1e-4);
/// @endcode

#include <scedit/lora_inject.hpp>
#include <scedit/lora_layer.hpp>

#include <torch/torch.h>

#include <memory>
#include <ostream>
#include <string>

namespace scedit {

/// Activation-side LoRA around a base layer: `base_layer(x) + Σ_a w_a · s_a · B_a(A_a(drop(x)))`.
/// The base layer's parameters are frozen (as peft does); `clone()` keeps every parameter's
/// `requires_grad`. Use `LoRALinear` / `LoRAConv2d`.
template <typename BaseImpl>
class LoRAImpl : public torch::nn::Cloneable<LoRAImpl<BaseImpl>>, public BasicLoRALayer<BaseImpl> {
 public:
  /// Construction helpers for this base type.
  using Traits = LoRATraits<BaseImpl>;
  /// Options of the base layer.
  using BaseOptions = typename Traits::Options;
  /// Holder of the base layer.
  using BaseHolder = typename Traits::Holder;

  /// A fresh base layer built from `base_options`, with one adapter `adapter_name`.
  LoRAImpl(const BaseOptions& base_options, const LoRAOptions& options,
           const std::string& adapter_name = "default")
      : base_options(base_options) {
    this->label_ = std::string("scedit::LoRA") + Traits::kind;
    detail::lora_check_adapter(this->label_, adapter_name, options);
    this->adapters_.push_back({LoRAAdapterInfo{adapter_name, options}});
    reset();
  }
  /// Wraps an existing layer (its weights, device and dtype are kept) with one adapter.
  LoRAImpl(const BaseHolder& base, const LoRAOptions& options,
           const std::string& adapter_name = "default")
      : LoRAImpl(Traits::options_of(*base), options, adapter_name) {
    base_layer = this->replace_module("base_layer", base);
    freeze_base_();
    const auto w0 = base_layer->weight;
    for (auto& a : this->adapters_) {
      a.A->to(w0.device(), w0.scalar_type());
      a.B->to(w0.device(), w0.scalar_type());
    }
  }

  /// Registers `base_layer` (new, frozen), `lora_A`, `lora_B` and rebuilds every adapter.
  void reset() override {
    base_layer = this->register_module("base_layer", BaseHolder(base_options));
    freeze_base_();
    this->lora_A = this->register_module("lora_A", torch::nn::ModuleDict());
    this->lora_B = this->register_module("lora_B", torch::nn::ModuleDict());
    for (auto& a : this->adapters_) a = this->make_adapter_(a.info);
  }

  /// Re-initialises the base layer and every adapter (B to zero); clears merged flags.
  void reset_parameters() {
    for (auto& a : this->adapters_) a.info.merged = false;
    reset();
  }

  /// `base_layer(x) + Σ_a w_a · s_a · B_a(A_a(dropout(x)))` over enabled, unmerged adapters.
  /// The adapters see `x` in their own dtype; their sum is cast to the base output's dtype.
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor result = base_layer->forward(x);
    if (!this->enabled_) return result;
    for (auto& a : this->adapters_) {
      if (!this->active_(a)) continue;
      torch::Tensor h = x.to(a.A->weight.scalar_type());
      if (a.info.options.dropout() > 0)
        h = torch::dropout(h, a.info.options.dropout(), this->is_training());
      result = result + (a.B->forward(a.A->forward(h)) * a.info.factor()).to(result.scalar_type());
    }
    return result;
  }

  /// Deep copy that keeps the adapters, their state and each parameter's `requires_grad`.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override {
    auto copy = std::dynamic_pointer_cast<LoRAImpl>(torch::nn::Cloneable<LoRAImpl>::clone(device));
    // Cloning replaced the dicts' modules by copies: point the typed handles at them.
    for (auto& a : copy->adapters_) {
      a.A = Adapter(
          std::dynamic_pointer_cast<typename Adapter::ContainedType>(copy->lora_A[a.info.name]));
      a.B = Adapter(
          std::dynamic_pointer_cast<typename Adapter::ContainedType>(copy->lora_B[a.info.name]));
    }
    auto theirs = copy->named_parameters();
    for (const auto& p : this->named_parameters()) {
      theirs[p.key()].set_requires_grad(p.value().requires_grad());
    }
    return copy;
  }

  /// Prints e.g. `scedit::LoRALinear(torch::nn::Linear(...), default(r=4))`, with the adapter
  /// settings that differ from their defaults.
  void pretty_print(std::ostream& stream) const override {
    stream << this->label_ << "(";
    base_layer->pretty_print(stream);
    for (const auto& a : this->adapters_) {
      const auto& o = a.info.options;
      stream << ", " << a.info.name << "(r=" << o.r();
      if (o.alpha() != 8) stream << ", alpha=" << o.alpha();
      if (o.dropout() != 0) stream << ", dropout=" << o.dropout();
      if (o.use_rslora()) stream << ", use_rslora=true";
      if (o.init() == LoRAInit::gaussian) stream << ", init=gaussian";
      if (a.info.weight != 1) stream << ", weight=" << a.info.weight;
      if (!a.info.enabled) stream << ", enabled=false";
      if (a.info.merged) stream << ", merged=true";
      stream << ")";
    }
    if (!this->enabled_) stream << ", enabled=false";
    stream << ")";
  }

  /// The base weight W0 (the registered parameter).
  torch::Tensor base_weight() const override {
    return base_layer ? base_layer->weight : torch::Tensor();
  }
  /// Whether adapters here may use dropout.
  bool supports_dropout() const override { return true; }

  /// The options the base layer is built from.
  BaseOptions base_options;
  /// The wrapped layer (frozen).
  BaseHolder base_layer{nullptr};

 protected:
  using typename BasicLoRALayer<BaseImpl>::Adapter;
  typename Traits::Options base_options_() const override { return base_options; }

 private:
  void freeze_base_() {
    for (auto& p : base_layer->parameters()) p.set_requires_grad(false);
  }
};

/// Implementation of `LoRALinear`.
using LoRALinearImpl = LoRAImpl<torch::nn::LinearImpl>;
/// Implementation of `LoRAConv2d`.
using LoRAConv2dImpl = LoRAImpl<torch::nn::Conv2dImpl>;

/// Linear with LoRA adapters (activation side).
///
/// Example:
/// @code
/// scedit::LoRALinear q(torch::nn::LinearOptions(320, 320).bias(false), scedit::LoRAOptions(8));
/// scedit::LoRALinear k(existing_linear, scedit::LoRAOptions(8).alpha(16));
/// @endcode
class LoRALinear : public torch::nn::ModuleHolder<LoRALinearImpl> {
 public:
  using torch::nn::ModuleHolder<LoRALinearImpl>::ModuleHolder;
  /// The implementation type.
  using Impl = LoRALinearImpl;
};

/// Conv2d with LoRA adapters (activation side).
///
/// Example:
/// @code
/// scedit::LoRAConv2d conv(torch::nn::Conv2dOptions(64, 64, 3).padding(1), scedit::LoRAOptions(4));
/// @endcode
class LoRAConv2d : public torch::nn::ModuleHolder<LoRAConv2dImpl> {
 public:
  using torch::nn::ModuleHolder<LoRAConv2dImpl>::ModuleHolder;
  /// The implementation type.
  using Impl = LoRAConv2dImpl;
};

}  // namespace scedit
