#pragma once
/// @file lean.hpp
/// @brief The `--lean` flag: which lean activation variants and fused kernels a training UNet
/// runs (sd/lean_ops.hpp, sd/fused_ops.hpp), by name, as the programs and benches spell them.

#include <common/strings.hpp>
#include <sd/fused_ops.hpp>
#include <sd/lean_ops.hpp>

#include <torch/torch.h>

#include <string>
#include <vector>

namespace common {

/// One `--lean` lever: its flag name and the `sd::LeanActivations` switch it sets.
struct LeanLever {
  const char* name;               ///< spelling in `--lean`
  bool sd::LeanActivations::*on;  ///< the switch
  bool fused;                     ///< runs on the fused CUDA kernels
};

/// Every lever, in the order `to_string` prints them. `all` names the first four, `fused` the
/// fused ones.
inline const std::vector<LeanLever>& lean_levers() {
  static const std::vector<LeanLever> levers = {
      {"norm-silu", &sd::LeanActivations::group_norm_silu, false},
      {"geglu", &sd::LeanActivations::geglu, false},
      {"norm-dtype", &sd::LeanActivations::norms_in_activation_dtype, false},
      {"ff-recompute", &sd::LeanActivations::recompute_feed_forward, false},
      {"fused-norm-silu", &sd::LeanActivations::fused_norm_silu, true},
      {"fused-geglu", &sd::LeanActivations::fused_geglu, true},
      {"fused-layer-norm", &sd::LeanActivations::fused_layer_norm, true},
  };
  return levers;
}

/// Parses the `--lean` flag for a run on `device`: a comma-separated list of the levers of
/// `lean_levers` (`norm-silu`: GroupNorm + SiLU keeping only its input; `geglu`: GEGLU keeping
/// only its projection; `norm-dtype`: norms in the activation dtype under autocast;
/// `ff-recompute`: feed-forwards recomputed in the backward pass; `fused-norm-silu`,
/// `fused-geglu`, `fused-layer-norm`: the fused CUDA kernels) and of the groups `all` (the four
/// portable ones), `fused` (the three fused ones), `default` (`norm-dtype`, plus `fused` where
/// this build and `device` run the kernels: the fastest measured, bench/RESULTS.md v0.5, v0.6)
/// and `none`. See sd/lean_ops.hpp. Fused levers named explicitly are refused, saying why, where
/// the build or the device cannot run them.
inline sd::LeanActivations parse_lean_activations(const std::string& list, const torch::Device& device) {
  sd::LeanActivations lean;
  for (const auto& part : split_list(list)) {
    if (part == "none") continue;
    const bool by_default = part == "default", all = part == "all";
    const bool fused = part == "fused" || (by_default && sd::fused::usable(device));
    lean.norms_in_activation_dtype |= by_default;
    bool known = by_default || all || fused;
    std::string names;
    for (const auto& lever : lean_levers()) {
      const bool named = part == lever.name;
      known |= named;
      lean.*lever.on |= named || (lever.fused ? fused : all);
      names += std::string(lever.name) + ", ";
    }
    TORCH_CHECK(known, "--lean: '", part, "' is not ", names, "all, fused, default or none");
    if (part == "fused" || part.rfind("fused-", 0) == 0) sd::fused::check_usable(device, "--lean " + part);
  }
  return lean;
}

/// The `--lean` spelling of `lean` (`none` when all are off).
inline std::string to_string(const sd::LeanActivations& lean) {
  std::string names;
  for (const auto& lever : lean_levers()) {
    if (lean.*lever.on) names += (names.empty() ? "" : ",") + std::string(lever.name);
  }
  return names.empty() ? "none" : names;
}

}  // namespace common
