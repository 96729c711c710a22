#pragma once
/// @file ldm_key_pairs.hpp
/// @brief How tensors move between an original single-file checkpoint (CompVis LDM / Stability
/// sgm) and the diffusers / transformers layout: a table of `KeyPair`s per component, the tensor
/// change each pair makes, and the strict conversion of a component in both directions. The
/// tables themselves are in ldm_keys.hpp (SD 1.x) and ldm_keys_xl.hpp (SD 2.x, SDXL).

#include <torch/torch.h>

#include <scedit/safetensors.hpp>

#include <map>
#include <set>
#include <string>
#include <vector>

namespace sd {

/// Key prefix of the UNet inside an LDM checkpoint.
inline constexpr const char* kLdmUNetPrefix = "model.diffusion_model.";
/// Key prefix of the VAE (the "first stage") inside an LDM checkpoint.
inline constexpr const char* kLdmVAEPrefix = "first_stage_model.";
/// Key prefix of the CLIP text encoder inside an LDM checkpoint (followed by `text_model.` in
/// most checkpoints; older ones omit it).
inline constexpr const char* kLdmTextPrefix = "cond_stage_model.transformer.";

/// How a tensor changes between the two layouts.
enum class KeyTransform {
  kNone,             ///< Same tensor, same shape.
  kConv1x1ToLinear,  ///< LDM 1×1 convolution weight [O, I, 1, 1] <-> diffusers linear [O, I].
  /// OpenCLIP's fused `attn.in_proj_{weight,bias}` [3R, R] / [3R] (q, k, v stacked along dim 0)
  /// <-> one of transformers' `self_attn.{q,k,v}_proj` [R, R] / [R]: rows [part·R, (part+1)·R).
  /// Three pairs share the LDM key; reading takes a slice, writing concatenates the three.
  kFusedQKV,
  /// OpenCLIP's `text_projection` [I, O] (used as `x @ P`) <-> a linear weight [O, I].
  kTranspose
};

/// One tensor in both layouts.
struct KeyPair {
  /// Full key in the LDM single-file checkpoint (with its component prefix).
  std::string ldm;
  /// Key in the diffusers / transformers state dict of the component (no prefix).
  std::string diffusers;
  /// The tensor change between the two.
  KeyTransform transform = KeyTransform::kNone;
  /// `kFusedQKV`: which third of the fused tensor (0 q, 1 k, 2 v).
  int64_t part = 0;
  /// `kFusedQKV`: the rows R of each third (the attention width).
  int64_t rows = 0;
};

/// The tensors of one component of a single-file checkpoint.
struct LdmComponentKeys {
  /// Every LDM key of the component starts with it (`model.diffusion_model.`, ...).
  std::string prefix;
  /// The component's tensors in both layouts.
  std::vector<KeyPair> pairs;
  /// Keys under `prefix` that a file may hold and this model does not use (read past, never
  /// written): a whole key, or, ending in '.', every key under it.
  std::vector<std::string> ignored;

  /// Whether `key` is one of `ignored`.
  bool ignores(const std::string& key) const {
    for (const auto& entry : ignored) {
      if (!entry.empty() && entry.back() == '.' ? key.rfind(entry, 0) == 0 : key == entry) {
        return true;
      }
    }
    return false;
  }
};

namespace detail {

/// Collects key pairs; `wb` adds the `.weight` and `.bias` of one layer.
struct KeyTable {
  std::vector<KeyPair> pairs;
  void add(const std::string& ldm, const std::string& diffusers,
           KeyTransform transform = KeyTransform::kNone) {
    pairs.push_back({ldm, diffusers, transform});
  }
  void wb(const std::string& ldm, const std::string& diffusers,
          KeyTransform weight_transform = KeyTransform::kNone) {
    add(ldm + ".weight", diffusers + ".weight", weight_transform);
    add(ldm + ".bias", diffusers + ".bias");
  }
  /// One fused LDM tensor <-> its three diffusers parts `{q,k,v}`, each `rows` rows.
  void fused_qkv(const std::string& ldm, const std::string& q, const std::string& k,
                 const std::string& v, int64_t rows) {
    int64_t part = 0;
    for (const auto* d : {&q, &k, &v}) {
      pairs.push_back({ldm, *d, KeyTransform::kFusedQKV, part++, rows});
    }
  }
};

}  // namespace detail

/// An LDM tensor in diffusers form, a view of it (never a copy):
/// - `kConv1x1ToLinear`: [O, I, 1, 1] -> [O, I] (a tensor already [O, I] passes, as some
///   converted checkpoints store it so);
/// - `kFusedQKV`: [3R, R] (`..._weight`) or [3R] (`..._bias`) -> its rows [part·R, (part+1)·R);
///   any other shape is refused, naming the key and the shape;
/// - `kTranspose`: [I, O] -> [O, I] (not contiguous).
inline torch::Tensor ldm_tensor_to_diffusers(const torch::Tensor& tensor, const KeyPair& pair) {
  switch (pair.transform) {
    case KeyTransform::kNone:
      return tensor;
    case KeyTransform::kConv1x1ToLinear:
      if (tensor.dim() == 2) return tensor;
      TORCH_CHECK(tensor.dim() == 4 && tensor.size(2) == 1 && tensor.size(3) == 1, "LDM key '",
                  pair.ldm, "': expected a 1x1 convolution weight [O, I, 1, 1], got ",
                  tensor.sizes());
      return tensor.flatten(1);  // [O, I, 1, 1] -> [O, I]
    case KeyTransform::kFusedQKV: {
      // OpenCLIP's in_proj_weight [3R, R] or in_proj_bias [3R].
      const int64_t r = pair.rows;
      const std::string tail = "weight";
      const bool weight = pair.ldm.size() >= tail.size() &&
                          pair.ldm.compare(pair.ldm.size() - tail.size(), tail.size(), tail) == 0;
      const std::vector<int64_t> expected =
          weight ? std::vector<int64_t>{3 * r, r} : std::vector<int64_t>{3 * r};
      TORCH_CHECK(tensor.sizes() == expected, "LDM key '", pair.ldm,
                  "': expected a fused q/k/v projection of 3 x ", r, " = ", 3 * r, " rows, ",
                  c10::IntArrayRef(expected), ", got ", tensor.sizes());
      return tensor.narrow(0, pair.part * r, r);  // [3R, R] -> [R, R], [3R] -> [R]
    }
    case KeyTransform::kTranspose:
      TORCH_CHECK(tensor.dim() == 2, "LDM key '", pair.ldm,
                  "': expected a projection matrix [I, O], got ", tensor.sizes());
      return tensor.t();  // [I, O] -> [O, I]
  }
  TORCH_CHECK(false, "LDM key '", pair.ldm, "': unknown key transform");
}

/// A diffusers tensor in LDM form, a view (`kConv1x1ToLinear`: [O, I] -> [O, I, 1, 1];
/// `kTranspose`: [O, I] -> [I, O]). `kFusedQKV` needs the three parts together:
/// `diffusers_component_to_ldm` concatenates them.
inline torch::Tensor diffusers_tensor_to_ldm(const torch::Tensor& tensor, const KeyPair& pair) {
  switch (pair.transform) {
    case KeyTransform::kNone:
      return tensor;
    case KeyTransform::kConv1x1ToLinear:
      TORCH_CHECK(tensor.dim() == 2, "diffusers key '", pair.diffusers,
                  "': expected a linear weight [O, I], got ", tensor.sizes());
      return tensor.unsqueeze(-1).unsqueeze(-1);  // [O, I] -> [O, I, 1, 1]
    case KeyTransform::kTranspose:
      TORCH_CHECK(tensor.dim() == 2, "diffusers key '", pair.diffusers,
                  "': expected a linear weight [O, I], got ", tensor.sizes());
      return tensor.t();  // [O, I] -> [I, O]
    case KeyTransform::kFusedQKV:
      break;
  }
  TORCH_CHECK(false, "diffusers key '", pair.diffusers, "' is one part of the fused LDM tensor '",
              pair.ldm, "': convert the component with diffusers_component_to_ldm");
}

/// LDM checkpoint keys that carry no weights and are ignored (`position_ids` buffers).
inline bool is_ignored_ldm_key(const std::string& key) {
  const std::string suffix = "embeddings.position_ids";
  return key.rfind(kLdmTextPrefix, 0) == 0 && key.size() >= suffix.size() &&
         key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// The tensors of one component of an LDM checkpoint under their diffusers names.
///
/// Strict: every key of `keys.pairs` must be present (an error names the first missing LDM key
/// and `source`), and every checkpoint key under `keys.prefix` must be in the table, in
/// `keys.ignored` or a `position_ids` buffer. Keys outside the prefix (other components,
/// `model_ema.*`, `alphas_cumprod`, ...) are not looked at. For SD 1.x's text encoder, keys
/// lacking the `text_model.` segment are accepted as well. The tensors returned are views of the
/// checkpoint's (reshaped, sliced or transposed where the table says so). `file_keys`, when
/// given, receives each diffusers key's checkpoint key (for messages).
inline scedit::TensorMap ldm_component_to_diffusers(
    const scedit::TensorMap& checkpoint, const LdmComponentKeys& keys,
    const std::string& source = "the checkpoint",
    std::map<std::string, std::string>* file_keys = nullptr) {
  const std::string text_model = std::string(kLdmTextPrefix) + "text_model.";
  scedit::TensorMap out;
  std::set<std::string> used;
  for (const auto& pair : keys.pairs) {
    auto it = checkpoint.find(pair.ldm);
    if (it == checkpoint.end() && pair.ldm.rfind(text_model, 0) == 0) {
      // Older checkpoints: cond_stage_model.transformer.<key> without text_model.
      it = checkpoint.find(kLdmTextPrefix + pair.ldm.substr(text_model.size()));
    }
    TORCH_CHECK(it != checkpoint.end(), "missing key '", pair.ldm, "' (diffusers '", pair.diffusers,
                "') in ", source);
    used.insert(it->first);
    if (file_keys != nullptr) (*file_keys)[pair.diffusers] = it->first;
    TORCH_CHECK(out.emplace(pair.diffusers, ldm_tensor_to_diffusers(it->second, pair)).second,
                "duplicate diffusers key '", pair.diffusers, "' in the key table");
  }
  for (const auto& [key, tensor] : checkpoint) {
    if (key.rfind(keys.prefix, 0) != 0 || used.count(key) != 0 || is_ignored_ldm_key(key) ||
        keys.ignores(key)) {
      continue;
    }
    TORCH_CHECK(false, "unexpected key '", key, "' in ", source,
                " (not a tensor of this model configuration)");
  }
  return out;
}

/// The same for a bare table whose keys all start with `prefix` (nothing else ignored).
inline scedit::TensorMap ldm_component_to_diffusers(
    const scedit::TensorMap& checkpoint, const std::vector<KeyPair>& table,
    const std::string& prefix, const std::string& source = "the checkpoint",
    std::map<std::string, std::string>* file_keys = nullptr) {
  return ldm_component_to_diffusers(checkpoint, LdmComponentKeys{prefix, table, {}}, source,
                                    file_keys);
}

/// One component's diffusers tensors under their LDM names, added to `checkpoint`. Strict: each
/// table key must be in `tensors` and `tensors` may hold no other key (`what` names the
/// component in the error). The tensors are views of the given ones, except the fused q/k/v
/// projections, which are concatenated (q, k, v along dim 0) after checking that the three
/// parts have one shape with the table's rows and one dtype.
inline void diffusers_component_to_ldm(const scedit::TensorMap& tensors,
                                       const std::vector<KeyPair>& table, const std::string& what,
                                       scedit::TensorMap& checkpoint) {
  std::set<std::string> known;
  std::map<std::string, std::vector<const KeyPair*>> fused;  // LDM key -> its parts' pairs
  for (const auto& pair : table) {
    auto it = tensors.find(pair.diffusers);
    TORCH_CHECK(it != tensors.end(), "diffusers_to_ldm: the ", what, " tensors lack key '",
                pair.diffusers, "'");
    known.insert(pair.diffusers);
    if (pair.transform == KeyTransform::kFusedQKV) {
      fused[pair.ldm].push_back(&pair);
      continue;
    }
    TORCH_CHECK(checkpoint.emplace(pair.ldm, diffusers_tensor_to_ldm(it->second, pair)).second,
                "diffusers_to_ldm: duplicate LDM key '", pair.ldm, "'");
  }
  for (const auto& [key, tensor] : tensors) {
    TORCH_CHECK(known.count(key) != 0, "diffusers_to_ldm: unexpected ", what, " key '", key,
                "' (not a tensor of this model configuration)");
  }
  for (const auto& [ldm, parts] : fused) {
    std::vector<torch::Tensor> qkv(3);
    for (const KeyPair* pair : parts) {
      TORCH_CHECK(pair->part >= 0 && pair->part < 3 && !qkv[pair->part].defined(),
                  "diffusers_to_ldm: the key table gives LDM key '", ldm, "' a part ", pair->part,
                  " twice or out of range");
      const torch::Tensor& part = tensors.at(pair->diffusers);
      const torch::Tensor& first = tensors.at(parts.front()->diffusers);
      TORCH_CHECK(part.dim() >= 1 && part.size(0) == pair->rows && part.sizes() == first.sizes() &&
                      part.scalar_type() == first.scalar_type(),
                  "diffusers_to_ldm: ", what, " key '", pair->diffusers, "' has shape ",
                  part.sizes(), " (", part.scalar_type(), "); the q/k/v parts of '", ldm,
                  "' must share one shape with ", pair->rows, " rows and one dtype ('",
                  parts.front()->diffusers, "': ", first.sizes(), ", ", first.scalar_type(), ")");
      qkv[pair->part] = part;
    }
    for (int64_t i = 0; i < 3; ++i) {
      TORCH_CHECK(qkv[i].defined(), "diffusers_to_ldm: the key table lacks part ", i,
                  " of LDM key '", ldm, "'");
    }
    TORCH_CHECK(checkpoint.emplace(ldm, torch::cat(qkv, 0)).second,  // 3 x [R, I] -> [3R, I]
                "diffusers_to_ldm: duplicate LDM key '", ldm, "'");
  }
}

}  // namespace sd
