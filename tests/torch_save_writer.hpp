#pragma once
/// @file torch_save_writer.hpp
/// @brief A writer of `torch.save` files for the tests, which cannot run Python: pickle opcodes
/// byte by byte (`Pickle`), the tensor and state-dict layouts Python's pickle (protocol 2)
/// emits for `torch.save`, and the zip around them through LibTorch's `PyTorchStreamWriter`.
///
/// The layouts follow what `torch.save` writes: a tensor is
/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())` with the
/// storage as the persistent id `('storage', torch.FloatStorage, key, 'cpu', numel)`; a state
/// dict is `OrderedDict()` filled by SETITEMS in batches of 1000 pairs (a batch of one is a
/// single SETITEM, as Python's pickler writes it), then BUILD with `{'_metadata': ...}`.

#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include <scedit/safetensors.hpp>

#include "test_util.hpp"

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace scedit_test {

/// Pickle bytes, one opcode at a time (memo entries are left out: nothing here reads them back
/// unless a test writes BINPUT / BINGET itself).
struct Pickle {
  std::string bytes;

  /// One raw byte (an opcode).
  Pickle& op(unsigned char code) {
    bytes.push_back(static_cast<char>(code));
    return *this;
  }
  /// `n` little-endian bytes of `value`.
  Pickle& le(uint64_t value, int n) {
    for (int i = 0; i < n; ++i) bytes.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
    return *this;
  }
  /// PROTO n.
  Pickle& proto(int n) { return op(0x80).op(static_cast<unsigned char>(n)); }
  /// GLOBAL module name.
  Pickle& global(const std::string& module, const std::string& name) {
    op('c');
    bytes += module + "\n" + name + "\n";
    return *this;
  }
  /// BINUNICODE.
  Pickle& str(const std::string& s) {
    op('X').le(s.size(), 4);
    bytes += s;
    return *this;
  }
  /// SHORT_BINUNICODE (protocol 4).
  Pickle& short_str(const std::string& s) {
    op(0x8c).le(s.size(), 1);
    bytes += s;
    return *this;
  }
  /// The smallest integer opcode for `v`, as Python's pickler picks it (LONG1 with as few
  /// two's-complement bytes as hold `v` beyond 32 bits).
  Pickle& integer(int64_t v) {
    if (v >= 0 && v < 256) return op('K').le(static_cast<uint64_t>(v), 1);
    if (v >= 0 && v < 65536) return op('M').le(static_cast<uint64_t>(v), 2);
    if (v >= INT32_MIN && v <= INT32_MAX) return op('J').le(static_cast<uint32_t>(v), 4);
    int n = 5;
    while (n < 8 && (v >= (int64_t{1} << (8 * n - 1)) || v < -(int64_t{1} << (8 * n - 1)))) ++n;
    return op(0x8a).op(static_cast<unsigned char>(n)).le(static_cast<uint64_t>(v), n);  // LONG1
  }
  /// MARK, the integers, TUPLE.
  Pickle& tuple(const std::vector<int64_t>& values) {
    op('(');
    for (const auto v : values) integer(v);
    return op('t');
  }
  /// BINPUT n (memoise the top of the stack).
  Pickle& put(int n) { return op('q').le(static_cast<uint64_t>(n), 1); }
  /// BINGET n.
  Pickle& get(int n) { return op('h').le(static_cast<uint64_t>(n), 1); }

  /// A tensor of `storage_type` (e.g. "FloatStorage") over storage `key` of `numel` elements.
  Pickle& tensor(const std::string& storage_type, const std::string& key, int64_t numel,
                 int64_t offset, const std::vector<int64_t>& size, const std::vector<int64_t>& stride) {
    global("torch._utils", "_rebuild_tensor_v2").op('(');
    op('(').str("storage").global("torch", storage_type).str(key).str("cpu").integer(numel).op('t');
    op('Q');  // BINPERSID
    integer(offset).tuple(size).tuple(stride).op(0x89);  // requires_grad False
    global("collections", "OrderedDict").op(')').op('R');  // backward_hooks
    return op('t').op('R');
  }
};

/// The `torch.<X>Storage` name of a dtype.
inline std::string storage_type(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return "FloatStorage";
    case torch::kFloat16: return "HalfStorage";
    case torch::kBFloat16: return "BFloat16Storage";
    case torch::kFloat64: return "DoubleStorage";
    case torch::kInt64: return "LongStorage";
    case torch::kInt32: return "IntStorage";
    case torch::kInt16: return "ShortStorage";
    case torch::kInt8: return "CharStorage";
    case torch::kUInt8: return "ByteStorage";
    case torch::kBool: return "BoolStorage";
    default: TORCH_CHECK(false, "no storage type for ", dtype);
  }
}

/// Storage key -> bytes: the `data/<key>` records of a file.
using Records = std::map<std::string, std::string>;

/// Writes `tensors` as a `torch.save` state dict (an OrderedDict), each tensor with its own
/// storage (keys "0", "1", ...) recorded into `records`.
inline Pickle& state_dict(Pickle& p, const scedit::TensorMap& tensors, Records& records) {
  p.global("collections", "OrderedDict").op(')').op('R');
  std::vector<std::pair<std::string, torch::Tensor>> items(tensors.begin(), tensors.end());
  for (size_t batch = 0; batch < items.size(); batch += 1000) {
    const size_t end = std::min(items.size(), batch + 1000);
    if (end - batch > 1) p.op('(');
    for (size_t i = batch; i < end; ++i) {
      const auto& [name, t] = items[i];
      const std::string key = std::to_string(records.size());
      records[key] = tensor_bytes(t);  // (test_util.hpp)
      std::vector<int64_t> stride = t.contiguous().strides().vec();
      p.str(name).tensor(storage_type(t.scalar_type()), key, t.numel(), 0, t.sizes().vec(), stride);
    }
    p.op(end - batch > 1 ? 'u' : 's');
  }
  // state_dict()'s `_metadata` attribute: {'': {'version': 1}}, set through BUILD.
  p.op('}').str("_metadata").global("collections", "OrderedDict").op(')').op('R');
  p.str("").op('}').str("version").integer(1).op('s').op('s');
  return p.op('s').op('b');
}

/// A `torch.save` zip at `path`: `data.pkl` and the storage records, plus `extra` records
/// (e.g. "byteorder").
inline void write_torch_zip(const std::string& path, const std::string& pickle, const Records& records,
                            const std::map<std::string, std::string>& extra = {}) {
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  for (const auto& [name, bytes] : extra) writer.writeRecord(name, bytes.data(), bytes.size());
  for (const auto& [key, bytes] : records) writer.writeRecord("data/" + key, bytes.data(), bytes.size());
  writer.writeEndOfFile();
}

}  // namespace scedit_test
