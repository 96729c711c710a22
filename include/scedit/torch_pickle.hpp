#pragma once
/// @file torch_pickle.hpp
/// @brief The tensors of a `torch.save` file (`.bin`, `.pt`, `.ckpt`) read by a restricted
/// unpickler that runs no code: the state dicts of diffusers `.bin` folders and Lightning-era
/// Stable Diffusion `.ckpt` files.
///
/// A `torch.save` file (PyTorch 1.6 and later) is a zip with one top folder `<name>/` holding
/// `data.pkl` (a Python pickle of the saved object), one record `data/<key>` per storage (its
/// raw little-endian bytes), `version`, and in newer files `byteorder` and
/// `.data/serialization_id`. The pickle is interpreted here by a small stack machine
/// (`torch_pickle::Unpickler`, in torch_pickle_machine.hpp) that knows the opcodes `torch.save`
/// emits (protocol 2, and protocols 3–5's additions) and only an allow-list of globals
/// (torch_pickle_globals.hpp): `collections.OrderedDict`, tensor and parameter rebuilds,
/// storage types and dtypes.
/// Classes a training checkpoint carries besides its weights (Lightning callbacks, numpy
/// scalars, `argparse.Namespace`, omegaconf configs) become inert placeholders that are never
/// called; any other global is refused by name before anything refers to it.
///
/// Every read is bounds-checked; every storage record must hold exactly its declared number of
/// elements, and every tensor must lie within its storage. Views of one storage share it, as in
/// PyTorch. Tensors are loaded on the CPU (a `location` such as `cuda:0` is ignored, as with
/// `map_location="cpu"`), without `requires_grad`. The zip is read with LibTorch's own
/// `caffe2::serialize::PyTorchStreamReader`; each storage record is read into memory once.
///
/// Example:
/// @code
/// // A diffusers .bin, or a Lightning .ckpt (its "state_dict" entry):
/// scedit::TensorMap unet = scedit::load_torch_file("unet/diffusion_pytorch_model.bin");
/// scedit::TensorMap sd15 = scedit::load_torch_file("v1-5-pruned-emaonly.ckpt");
/// torch::Tensor w = sd15.at("model.diffusion_model.out.2.weight");
/// @endcode

#include <scedit/safetensors.hpp>
#include <scedit/torch_pickle_machine.hpp>

#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

namespace scedit {

namespace torch_pickle {

/// The storages of an open `torch.save` zip, each read once, on first use, and checked against
/// the size its pickle declares.
class ZipStorages {
 public:
  /// Opens the zip at `path`; throws naming the file when it is not a readable zip.
  explicit ZipStorages(const std::string& path) : source_("'" + path + "'") {
    try {
      reader_ = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, source_, " is not a readable torch.save zip: ", e.what_without_backtrace());
    }
  }

  /// The bytes of record `name` (relative to the zip's top folder) as a string; throws naming
  /// the file when it is absent or unreadable.
  std::string record(const std::string& name) {
    TORCH_CHECK(reader_->hasRecord(name), source_, " is a zip without '", name,
                "': not a torch.save file");
    const auto [data, size] = read(name);
    return std::string(static_cast<const char*>(data.get()), size);
  }

  /// Whether the zip holds record `name`.
  bool has(const std::string& name) { return reader_->hasRecord(name); }

  /// The storage under `key` as a 1-D tensor of `numel` elements of `dtype`. Its record
  /// `data/<key>` must hold exactly `numel × element size` bytes; a key read before must be
  /// asked with the same dtype and size.
  torch::Tensor storage(const std::string& key, torch::ScalarType dtype, int64_t numel) {
    if (const auto found = storages_.find(key); found != storages_.end()) {
      const auto& known = found->second;
      TORCH_CHECK(known.scalar_type() == dtype && known.numel() == numel, source_, ": storage '",
                  key, "' is declared twice, as ", known.numel(), " × ", known.scalar_type(),
                  " and as ", numel, " × ", dtype);
      return known;
    }
    const std::string name = "data/" + key;
    TORCH_CHECK(key.find('/') == std::string::npos && reader_->hasRecord(name), source_,
                ": the pickle refers to storage '", key, "', but the zip has no record '", name, "'");
    const auto element = static_cast<int64_t>(c10::elementSize(dtype));
    TORCH_CHECK(numel >= 0 && numel <= std::numeric_limits<int64_t>::max() / element, source_,
                ": storage '", key, "' declares an impossible size of ", numel, " elements");
    auto [data, size] = read(name);
    TORCH_CHECK(static_cast<int64_t>(size) == numel * element, source_, ": storage record '", name,
                "' holds ", size, " bytes, but its pickle declares ", numel, " × ", dtype, " = ",
                numel * element, " bytes");
    // The record's memory lives as long as any tensor that views it.
    auto owner = std::make_shared<at::DataPtr>(std::move(data));
    void* bytes = numel == 0 ? nullptr : owner->get();
    auto tensor = numel == 0 ? torch::empty({0}, torch::TensorOptions().dtype(dtype))
                             : torch::from_blob(bytes, {numel}, [owner](void*) {},
                                                torch::TensorOptions().dtype(dtype));
    storages_.emplace(key, tensor);
    return tensor;
  }

 private:
  std::tuple<at::DataPtr, size_t> read(const std::string& name) {
    try {
      return reader_->getRecord(name);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, source_, ": cannot read record '", name, "': ", e.what_without_backtrace());
    }
  }

  std::string source_;
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader_;
  std::map<std::string, torch::Tensor> storages_;
};

/// The nested dicts under `value` flattened into `out`, keys joined with '.' (`prefix` is the
/// key so far); tensors are kept, everything else is skipped (see `load_torch_file`).
inline void flatten(const Value& value, const std::string& prefix, const std::string& source,
                    size_t depth, TensorMap& out) {
  TORCH_CHECK(depth <= kMaxNesting, source, ": dicts nested deeper than ", kMaxNesting,
              " levels at '", prefix, "'");
  for (size_t i = 0; i + 1 < value.items.size(); i += 2) {
    const Value& key = *value.items[i];
    const Value& item = *value.items[i + 1];
    std::string name;
    if (key.kind == Value::Kind::string) {
      name = key.text;
    } else if (key.kind == Value::Kind::integer) {
      name = std::to_string(key.integer);
    } else {
      continue;  // e.g. a Lightning callback keyed by its class
    }
    name = prefix.empty() ? name : prefix + "." + name;
    if (item.kind == Value::Kind::tensor) {
      TORCH_CHECK(out.emplace(name, item.tensor).second, source, ": key '", name,
                  "' appears twice once nested dicts are joined with '.'");
    } else if (item.kind == Value::Kind::dict) {
      flatten(item, name, source, depth + 1, out);
    }
  }
}

}  // namespace torch_pickle

/// The tensors of the `torch.save` file (PyTorch ≥ 1.6 zip) at `path`, by name, read without
/// running any of its code.
///
/// The saved object must be a dict (or `OrderedDict`). When it has a `"state_dict"` entry that
/// is a dict — a Lightning `.ckpt` — only that entry is read. Nested dicts are flattened with
/// '.' (`{"unet": {"conv.weight": t}}` gives `"unet.conv.weight"`); integer keys are written in
/// decimal. Skipped: every value that is neither a tensor nor a dict (numbers, strings, lists,
/// tuples, None, placeholder objects such as callbacks) and entries whose key is neither a
/// string nor an integer. Tensors are on the CPU, in their saved dtype, sharing memory where
/// they shared a storage in the file. Throws naming the file for anything that is not a
/// well-formed `torch.save` zip of that shape, for a global outside the allow-list (naming it),
/// and for a big-endian file.
inline TensorMap load_torch_file(const std::string& path) {
  const std::string source = "'" + path + "'";
  torch_pickle::ZipStorages zip(path);
  if (zip.has("byteorder")) {
    const std::string order = zip.record("byteorder");
    TORCH_CHECK(order == "little", source, " was saved on a ", order,
                "-endian machine; only little-endian torch.save files are read");
  }
  const std::string pickle = zip.record("data.pkl");
  torch_pickle::Unpickler unpickler(
      pickle, source + " (data.pkl)",
      [&zip](const std::string& key, torch::ScalarType dtype, int64_t numel) {
        return zip.storage(key, dtype, numel);
      });
  const auto root = unpickler.load();
  TORCH_CHECK(root->kind == torch_pickle::Value::Kind::dict, source,
              " holds a pickled ", torch_pickle::kind_name(root->kind),
              ", not a dict of tensors (a state dict)");
  const torch_pickle::Value* top = root.get();
  for (size_t i = 0; i + 1 < root->items.size(); i += 2) {
    const auto& key = *root->items[i];
    const auto& value = *root->items[i + 1];
    if (key.kind == torch_pickle::Value::Kind::string && key.text == "state_dict" &&
        value.kind == torch_pickle::Value::Kind::dict) {
      top = &value;
    }
  }
  TensorMap out;
  torch_pickle::flatten(*top, "", source, 0, out);
  return out;
}

}  // namespace scedit
