#pragma once
/// @file state_dict.hpp
/// @brief A module's parameters and buffers by dotted path, and a checked load into them.
///
/// Example:
/// @code
/// scedit::LoadOptions options;
/// options.source = path;
/// options.rename = [](const std::string& key) { return "unet." + key; };
/// scedit::LoadReport report = scedit::load_state_dict(*model, scedit::safetensors::load(path),
///                                                     options);  // throws unless report.ok()
/// scedit::safetensors::save("model.safetensors", scedit::state_dict(*model));
/// @endcode

#include <scedit/safetensors.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace scedit {

/// Every parameter and buffer of a module by its dotted path (undefined optional ones left out).
/// The tensors share storage with the module.
inline TensorMap state_dict(const torch::nn::Module& module) {
  TensorMap result;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (item.value().defined()) result.emplace(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    if (item.value().defined()) result.emplace(item.key(), item.value());
  }
  return result;
}

/// What a load found.
struct LoadReport {
  /// Module keys that no tensor provided, sorted.
  std::vector<std::string> missing;
  /// Tensor keys (as given, before renaming) that match no module key, sorted.
  std::vector<std::string> unexpected;
  /// Keys whose shapes differ, each reading like
  /// "key: module [320, 4, 3, 3] vs file [320, 4, 3]" (with "(file key 'k')" after the key when
  /// a rename changed it).
  std::vector<std::string> mismatched;

  /// True when nothing is missing, unexpected or mismatched.
  bool ok() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }

  /// One line per kind of problem, listing every key; "all keys matched" when ok().
  std::string str() const {
    if (ok()) return "all keys matched";
    std::ostringstream out;
    auto list = [&out](const char* title, const std::vector<std::string>& keys,
                       const char* separator) {
      if (keys.empty()) return;
      if (out.tellp() > 0) out << '\n';
      out << title << " (" << keys.size() << "): ";
      for (size_t i = 0; i < keys.size(); ++i) out << (i ? separator : "") << keys[i];
    };
    list("missing keys", missing, ", ");
    list("unexpected keys", unexpected, ", ");
    list("shape mismatches", mismatched, "; ");
    return out.str();
  }
};

/// How a load behaves.
struct LoadOptions {
  /// Throw (listing every problem by key) unless the report is ok; nothing is copied then.
  bool strict = true;
  /// Maps a file key to a module key; return "" to drop the key. Unset: keys are used as they are.
  std::function<std::string(const std::string&)> rename;
  /// Module keys to leave alone and not report missing (e.g. tuner parameters attached to the
  /// model). A file key that lands on such a key is ignored, neither copied nor reported.
  std::function<bool(const std::string&)> skip_module_key;
  /// Named in messages, e.g. the file path.
  std::string source = "state dict";
};

namespace detail {

/// "[2, 3]" for sizes.
inline std::string sizes_str(torch::IntArrayRef sizes) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
  return out.str();
}

}  // namespace detail

/// Throws, naming `source` (e.g. the file) and the first tensor at fault, when a floating-point
/// tensor of `tensors` holds NaN or Inf: weights like that load without complaint and then turn
/// every output into NaN (an all-black image), far from the file that caused it.
inline void check_finite(const TensorMap& tensors, const std::string& source) {
  for (const auto& [key, tensor] : tensors) {
    if (!tensor.defined() || !tensor.is_floating_point() || torch::isfinite(tensor).all().item<bool>()) {
      continue;
    }
    TORCH_CHECK(false, source, ": tensor '", key, "' ", detail::sizes_str(tensor.sizes()), " holds ",
                torch::isnan(tensor).sum().item<int64_t>(), " NaN and ",
                torch::isinf(tensor).sum().item<int64_t>(), " infinite values of ", tensor.numel(),
                "; refusing to load it");
  }
}

/// Copies `tensors` into the module's parameters and buffers.
///
/// Copies happen under NoGradGuard, in place (the module keeps its own tensors, dtype and
/// device; values are converted to them). Reports missing, unexpected and shape-mismatched keys;
/// in strict mode nothing is copied unless everything matches, and the error lists every
/// problem. Two file keys that rename to the same module key are always an error.
inline LoadReport load_state_dict(torch::nn::Module& module, const TensorMap& tensors,
                                  const LoadOptions& options = {}) {
  TensorMap targets = state_dict(module);  // shares storage with the module
  LoadReport report;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // (module tensor, source)
  std::map<std::string, std::string> provided;                  // module key -> file key
  for (const auto& [file_key, tensor] : tensors) {
    const std::string key = options.rename ? options.rename(file_key) : file_key;
    if (key.empty()) continue;  // dropped by the rename hook
    if (options.skip_module_key && options.skip_module_key(key)) continue;
    const auto target = targets.find(key);
    if (target == targets.end()) {
      report.unexpected.push_back(file_key);
      continue;
    }
    const auto [previous, inserted] = provided.emplace(key, file_key);
    TORCH_CHECK(inserted, "load_state_dict from ", options.source, ": keys '", previous->second,
                "' and '", file_key, "' both map to module key '", key, "'");
    TORCH_CHECK(tensor.defined(), "load_state_dict from ", options.source, ": tensor '",
                file_key, "' is undefined");
    if (target->second.sizes() != tensor.sizes()) {
      report.mismatched.push_back(key + (key != file_key ? " (file key '" + file_key + "')" : "") +
                                  ": module " + detail::sizes_str(target->second.sizes()) +
                                  " vs file " + detail::sizes_str(tensor.sizes()));
      continue;
    }
    copies.emplace_back(target->second, tensor);
  }
  for (const auto& [key, tensor] : targets) {
    if (provided.count(key) != 0) continue;
    if (options.skip_module_key && options.skip_module_key(key)) continue;
    report.missing.push_back(key);
  }
  std::sort(report.unexpected.begin(), report.unexpected.end());
  std::sort(report.mismatched.begin(), report.mismatched.end());
  TORCH_CHECK(!options.strict || report.ok(), "load_state_dict from ", options.source,
              " failed, nothing was loaded:\n", report.str());
  torch::NoGradGuard no_grad;
  for (auto& [target, source] : copies) target.copy_(source);
  return report;
}

}  // namespace scedit
