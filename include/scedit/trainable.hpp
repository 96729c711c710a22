#pragma once
/// @file trainable.hpp
/// @brief Which parameters train: freeze all but the tuners, count, collect for an optimizer.
///
/// A parameter belongs to a tuner when it lives inside a module derived from `scedit::Tuner`
/// (SC- and CSC-Tuners) or inside a LoRA adapter (`lora_A` / `lora_B` children, see lora.hpp).
///
/// Example:
/// @code
/// scedit::freeze_except_tuners(*unet);
/// torch::optim::AdamW optimizer(scedit::tuner_parameters(*unet), options);
/// @endcode

#include <scedit/lora_layer.hpp>
#include <scedit/sites.hpp>

#include <torch/torch.h>

#include <functional>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

namespace scedit {

/// Dotted names of every tuner parameter of `model` (SC, CSC and LoRA).
inline std::set<std::string> tuner_parameter_names(const torch::nn::Module& model) {
  std::set<std::string> names;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (dynamic_cast<const Tuner*>(item.value().get()) == nullptr) continue;
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters()) names.insert(prefix + p.key());
  }
  for (const auto& p : model.named_parameters()) {
    if (detail::lora_in_adapter_path(p.key())) names.insert(p.key());
  }
  return names;
}

/// A predicate for `LoadOptions::skip_module_key`: true for the keys of tuner parameters, so a
/// model's base weights load while tuners are attached.
inline std::function<bool(const std::string&)> tuner_key_filter(const torch::nn::Module& model) {
  auto names = std::make_shared<std::set<std::string>>(tuner_parameter_names(model));
  return [names](const std::string& key) { return names->count(key) > 0; };
}

/// The tuner parameters of `model`, each once, for an optimizer.
inline std::vector<torch::Tensor> tuner_parameters(const torch::nn::Module& model) {
  const auto names = tuner_parameter_names(model);
  std::vector<torch::Tensor> params;
  std::unordered_set<const void*> seen;
  for (const auto& p : model.named_parameters()) {
    if (names.count(p.key()) && seen.insert(p.value().unsafeGetTensorImpl()).second) {
      params.push_back(p.value());
    }
  }
  return params;
}

/// Sets `requires_grad` on every tuner parameter of `model` and clears it everywhere else.
/// With nothing upstream of the first tuner requiring gradients, autograd records no graph there.
inline void freeze_except_tuners(torch::nn::Module& model) {
  const auto names = tuner_parameter_names(model);
  for (auto& p : model.named_parameters()) p.value().set_requires_grad(names.count(p.key()) > 0);
}

/// Parameter counts of a model (each tensor counted once).
struct ParameterCount {
  /// Elements of parameters that require gradients.
  int64_t trainable = 0;
  /// Elements of parameters that do not.
  int64_t frozen = 0;
  /// trainable + frozen.
  int64_t total() const { return trainable + frozen; }
};

/// Counts the trainable and frozen parameter elements of `model`.
inline ParameterCount count_parameters(const torch::nn::Module& model) {
  ParameterCount count;
  std::unordered_set<const void*> seen;
  for (const auto& p : model.parameters()) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    (p.requires_grad() ? count.trainable : count.frozen) += p.numel();
  }
  return count;
}

}  // namespace scedit
