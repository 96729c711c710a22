#pragma once
/// @file torch_pickle_globals.hpp
/// @brief The allow-list of `scedit::load_torch_file`: the Python globals a `torch.save` weights
/// file may name, and what each one is to the reader. Any other global is refused by name.
///
/// Callable for real (by the reader's own code, never Python's): `collections.OrderedDict`, the
/// tensor and parameter rebuilds of `torch._utils` and `torch._tensor`, `torch.Size` and
/// `torch.jit._pickle.restore_type_tag`. Named only: the storage types (`torch.FloatStorage`,
/// ...) and dtypes (`torch.float16`, ...). Placeholders, which become inert objects when called:
/// what training checkpoints carry besides weights — Lightning callbacks (a `.ckpt` keys their
/// states by class), numpy scalars and arrays with their dtypes and `_codecs.encode` (how
/// protocol 2 writes their bytes), `argparse.Namespace` and omegaconf configurations
/// (hyper-parameters), `torch.device`, and the builtin types these refer to.
///
/// Example:
/// @code
/// auto role = scedit::torch_pickle::classify_global("torch", "HalfStorage");
/// // role->first == GlobalRole::storage_type, role->second == torch::kFloat16
/// bool refused = !scedit::torch_pickle::classify_global("os", "system");  // true
/// @endcode

#include <scedit/compat.hpp>

#include <torch/torch.h>

#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

namespace scedit {
namespace torch_pickle {

/// What a global names, as far as this reader is concerned.
enum class GlobalRole {
  ordered_dict,         ///< `collections.OrderedDict`: called, an empty dict.
  rebuild_tensor_v2,    ///< `torch._utils._rebuild_tensor_v2`.
  rebuild_tensor_v3,    ///< `torch._utils._rebuild_tensor_v3` (untyped storage and a dtype).
  rebuild_parameter,    ///< `torch._utils._rebuild_parameter(_with_state)`: its tensor.
  rebuild_from_type,    ///< `torch._tensor._rebuild_from_type_v2(func, type, args, state)`.
  restore_type_tag,     ///< `torch.jit._pickle.restore_type_tag(value, type)`: the value.
  torch_size,           ///< `torch.Size(tuple)`: the tuple.
  storage_type,         ///< `torch.FloatStorage`, ...: names a storage's dtype.
  dtype,                ///< `torch.float32`, ...: a dtype.
  placeholder,          ///< A harmless class: calling it makes an inert object.
};

/// The storage dtype a `torch.<X>Storage` name stands for, if it is one.
inline std::optional<torch::ScalarType> storage_dtype(const std::string& name) {
  static const std::unordered_map<std::string, torch::ScalarType> types = {
      {"FloatStorage", torch::kFloat32}, {"HalfStorage", torch::kFloat16},
      {"BFloat16Storage", torch::kBFloat16}, {"DoubleStorage", torch::kFloat64},
      {"LongStorage", torch::kInt64}, {"IntStorage", torch::kInt32},
      {"ShortStorage", torch::kInt16}, {"CharStorage", torch::kInt8},
      {"ByteStorage", torch::kUInt8}, {"BoolStorage", torch::kBool},
      {"UntypedStorage", torch::kUInt8}};
  const auto found = types.find(name);
  if (found == types.end()) return std::nullopt;
  return found->second;
}

/// The dtype a `torch.<name>` dtype object stands for, if it is one this reader loads (float8
/// and the wider unsigned types only on the LibTorch 2.x versions that have them, where they come
/// through `_rebuild_tensor_v3`).
inline std::optional<torch::ScalarType> dtype_named(const std::string& name) {
  static const std::unordered_map<std::string, torch::ScalarType> types = {
      {"float32", torch::kFloat32}, {"float", torch::kFloat32}, {"float16", torch::kFloat16},
      {"half", torch::kFloat16}, {"bfloat16", torch::kBFloat16}, {"float64", torch::kFloat64},
      {"double", torch::kFloat64}, {"int64", torch::kInt64}, {"long", torch::kInt64},
      {"int32", torch::kInt32}, {"int", torch::kInt32}, {"int16", torch::kInt16},
      {"short", torch::kInt16}, {"int8", torch::kInt8}, {"uint8", torch::kUInt8},
      {"bool", torch::kBool}};
  const auto found = types.find(name);
  if (found == types.end()) return compat::dtype_added_in_torch_2(name);
  return found->second;
}

/// What `module.name` is to this reader, or nothing when it is not allowed.
inline std::optional<std::pair<GlobalRole, torch::ScalarType>> classify_global(
    const std::string& module, const std::string& name) {
  using R = GlobalRole;
  const auto role = [](R r) { return std::make_pair(r, torch::kFloat32); };
  const std::string full = module + "." + name;
  if (full == "collections.OrderedDict") return role(R::ordered_dict);
  if (full == "torch._utils._rebuild_tensor_v2") return role(R::rebuild_tensor_v2);
  if (full == "torch._utils._rebuild_tensor_v3") return role(R::rebuild_tensor_v3);
  if (full == "torch._utils._rebuild_parameter" || full == "torch._utils._rebuild_parameter_with_state") {
    return role(R::rebuild_parameter);
  }
  if (full == "torch._tensor._rebuild_from_type_v2") return role(R::rebuild_from_type);
  if (full == "torch.jit._pickle.restore_type_tag") return role(R::restore_type_tag);
  if (full == "torch.Size") return role(R::torch_size);
  if (module == "torch" || module == "torch.cuda") {
    if (const auto dtype = storage_dtype(name)) return std::make_pair(R::storage_type, *dtype);
  }
  if (module == "torch") {
    if (const auto dtype = dtype_named(name)) return std::make_pair(R::dtype, *dtype);
  }
  // Classes that training checkpoints carry besides their weights; never called here.
  static const char* const placeholders[] = {
      "torch.Tensor", "torch.nn.parameter.Parameter", "torch.device", "argparse.Namespace",
      "collections.defaultdict", "builtins.dict", "builtins.list", "builtins.set",
      "builtins.tuple", "builtins.int", "builtins.float", "builtins.str", "typing.Any",
      "_codecs.encode", "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
      "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
      "numpy._core.multiarray._reconstruct"};
  for (const char* allowed : placeholders) {
    if (full == allowed) return role(R::placeholder);
  }
  for (const char* prefix : {"pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.",
                             "omegaconf.", "numpy.dtypes."}) {
    if (full.rfind(prefix, 0) == 0) return role(R::placeholder);
  }
  return std::nullopt;
}

}  // namespace torch_pickle
}  // namespace scedit
