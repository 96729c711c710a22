#pragma once
/// @file safetensors.hpp
/// @brief Reading and writing the safetensors format: validated, memory-mapped, zero-copy loads
/// and atomic saves.
///
/// A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of JSON header
/// (`{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
/// "__metadata__": {"key": "value"}}`), then the data section, which the tensors' byte ranges
/// (relative to its start) must cover exactly, without overlaps or holes.
///
/// Every field of the header is checked against the file before any tensor is touched, so a
/// malformed, truncated or hostile file is refused with an error that names the file, the tensor
/// and the problem; nothing is read out of bounds and no allocation is sized by the file beyond
/// the (capped) header. Linux / POSIX only; assumes a little-endian host, as the format does.

#include <scedit/atomic_file.hpp>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "scedit/safetensors.hpp reads and writes little-endian data in place: it needs a "
              "little-endian host");
#endif

namespace scedit {

/// Name -> tensor, ordered by name (deterministic files).
using TensorMap = std::map<std::string, torch::Tensor>;

namespace safetensors {

/// The largest header this reader accepts (the reference implementation's limit): a bigger
/// length field is taken for a corrupt or hostile file rather than allocated.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

/// Where one tensor lives in a file, as its header entry declares it (validated).
struct TensorInfo {
  /// The tensor's name (its key in the header).
  std::string name;
  /// Element type (one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL).
  torch::ScalarType dtype;
  /// Sizes; empty for a 0-dim tensor.
  std::vector<int64_t> shape;
  /// First byte, relative to the start of the data section.
  uint64_t begin;
  /// One past the last byte, relative to the start of the data section.
  uint64_t end;
};

/// The safetensors name of a dtype ("F32", ...), or nullptr when the format has none here.
inline const char* dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat64: return "F64";
    case torch::kFloat32: return "F32";
    case torch::kFloat16: return "F16";
    case torch::kBFloat16: return "BF16";
    case torch::kInt64: return "I64";
    case torch::kInt32: return "I32";
    case torch::kInt16: return "I16";
    case torch::kInt8: return "I8";
    case torch::kUInt8: return "U8";
    case torch::kBool: return "BOOL";
    default: return nullptr;
  }
}

/// The dtype of a safetensors dtype name, or nullopt when it is not supported.
inline std::optional<torch::ScalarType> parse_dtype(const std::string& name) {
  static const std::map<std::string, torch::ScalarType> table = {
      {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
      {"BF16", torch::kBFloat16}, {"I64", torch::kInt64}, {"I32", torch::kInt32},
      {"I16", torch::kInt16},   {"I8", torch::kInt8},     {"U8", torch::kUInt8},
      {"BOOL", torch::kBool}};
  const auto it = table.find(name);
  if (it == table.end()) return std::nullopt;
  return it->second;
}

namespace detail {

/// "[2, 3]" for a shape.
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

/// A private (copy-on-write) mapping of a whole file; unmapped when the last user lets go.
class Mapping {
 public:
  /// Takes ownership of the mapping [data, data + size).
  Mapping(void* data, size_t size) : data_(data), size_(size) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { ::munmap(data_, size_); }
  /// First byte of the file in memory.
  uint8_t* data() const { return static_cast<uint8_t*>(data_); }
  /// Length of the mapping (the file size).
  size_t size() const { return size_; }

 private:
  void* data_;
  size_t size_;
};

/// Parses the header, refusing duplicate keys in any object (nlohmann keeps the last one
/// silently). Returns the problem in `error` rather than throwing.
inline nlohmann::json parse_header(const char* begin, const char* end, std::string& error) {
  std::vector<std::set<std::string>> open_objects;  // keys seen so far in each open object
  std::string duplicate;
  size_t duplicate_depth = 0;
  auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& value) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) {
      open_objects.emplace_back();
    } else if (event == Event::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == Event::key && !open_objects.empty() && duplicate.empty()) {
      const auto& key = value.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) {
        duplicate = key;
        duplicate_depth = open_objects.size();
      }
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(begin, end, callback);
  } catch (const nlohmann::json::exception& e) {
    error = std::string("header is not valid JSON (") + e.what() + ")";
    return {};
  }
  if (!duplicate.empty()) {
    error = duplicate_depth == 1 ? "duplicate tensor name '" + duplicate + "' in the header"
                                 : "duplicate key '" + duplicate + "' inside a header entry";
  }
  return header;
}

/// a * b, or false on uint64 overflow.
inline bool checked_mul(uint64_t a, uint64_t b, uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}

}  // namespace detail

/// A validated, memory-mapped safetensors file.
///
/// Construction maps the file (privately: writes through a tensor never reach the disk) and
/// validates the whole header against it; afterwards every `get` is safe. `tensors()` lists
/// the tensors in offset order, i.e. the order of their bytes in the data section. Copies of a
/// File share the mapping, which lives as long as any File or tensor view uses it.
///
/// Example:
/// @code
/// scedit::safetensors::File file("unet.safetensors");
/// for (const auto& info : file.tensors()) std::cout << info.name << "\n";
/// torch::Tensor w = file.get("conv_in.weight");  // zero-copy view when aligned
/// @endcode
class File {
 public:
  /// Maps and validates `path`; throws c10::Error naming the file and the problem.
  explicit File(const std::string& path) : path_(path) {
    // O_NONBLOCK: opening a FIFO must not hang.
    scedit::detail::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    const int open_error = errno;
    TORCH_CHECK(fd.get() >= 0, where(), "cannot open: ", scedit::detail::errno_str(open_error));
    struct stat st {};
    const int stat_rc = ::fstat(fd.get(), &st);
    const int stat_error = errno;
    TORCH_CHECK(stat_rc == 0, where(), "cannot stat: ", scedit::detail::errno_str(stat_error));
    TORCH_CHECK(S_ISREG(st.st_mode), where(), "not a regular file");
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    TORCH_CHECK(file_size >= 8, where(), "file is shorter than 8 bytes (", file_size,
                " bytes): no header length");
    // The file is at least 8 bytes long, so the mapping is never of length 0 (invalid).
    // Private and copy-on-write: writing into a tensor view never reaches the file.
    void* data = ::mmap(nullptr, static_cast<size_t>(file_size), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_NORESERVE, fd.get(), 0);
    const int map_error = errno;
    TORCH_CHECK(data != MAP_FAILED, where(), "cannot map: ", scedit::detail::errno_str(map_error));
    mapping_ = std::make_shared<detail::Mapping>(data, static_cast<size_t>(file_size));
    fd.close();

    // Another kind of file (a JSON config, an image) fails one of the first three checks: its
    // first 8 bytes, read as the header length, make an absurd number, or its header does not
    // open a JSON object. Say so rather than report a nonsense length.
    const std::string not_safetensors = "'" + path_ + "' is not a safetensors file: ";
    uint64_t header_size = 0;
    std::memcpy(&header_size, mapping_->data(), 8);  // little-endian host
    TORCH_CHECK(header_size <= kMaxHeaderBytes, not_safetensors, "header length ", header_size,
                " (its first 8 bytes) exceeds the limit of ", kMaxHeaderBytes, " bytes");
    TORCH_CHECK(header_size <= file_size - 8, not_safetensors, "header length ", header_size,
                " (its first 8 bytes) runs past the end of the file (", file_size, " bytes)");
    const char* header_begin = reinterpret_cast<const char*>(mapping_->data() + 8);
    TORCH_CHECK(header_size > 0 && header_begin[0] == '{', not_safetensors,
                "its header does not start with '{' (the format's header is a JSON object)");
    data_offset_ = 8 + header_size;
    data_size_ = file_size - data_offset_;

    std::string error;
    nlohmann::json header = detail::parse_header(header_begin, header_begin + header_size, error);
    TORCH_CHECK(error.empty(), where(), error);
    for (const auto& item : header.items()) {
      if (item.key() == "__metadata__") {
        read_metadata(item.value());
      } else {
        tensors_.push_back(read_entry(item.key(), item.value()));
      }
    }
    check_coverage();
    for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  /// The path the file was opened with.
  const std::string& path() const { return path_; }

  /// Every tensor's validated entry, in offset order (the order of the data section).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  /// The `__metadata__` string map (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Whether the file holds a tensor called `name`.
  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// The entry of tensor `name`; the error names the file and the key when it is absent.
  const TensorInfo& info(const std::string& name) const {
    const auto it = index_.find(name);
    TORCH_CHECK(it != index_.end(), where(), "no tensor named '", name, "' (the file holds ",
                tensors_.size(), " tensors)");
    return tensors_[it->second];
  }

  /// Tensor `name` on the CPU.
  ///
  /// A zero-copy view into the mapping when its bytes are aligned for the dtype (the mapping
  /// stays alive while the view does; it is private, so writing into the tensor never changes
  /// the file, but views of the same File share memory: `clone()` for an independent tensor);
  /// otherwise a copy. A BOOL tensor holding a byte other than 0 or 1 is refused.
  torch::Tensor get(const std::string& name) const {
    const TensorInfo& entry = info(name);
    const auto options = torch::TensorOptions().dtype(entry.dtype).device(torch::kCPU);
    const uint64_t bytes = entry.end - entry.begin;
    if (bytes == 0) return torch::empty(entry.shape, options);
    uint8_t* source = data_begin() + entry.begin;
    if (entry.dtype == torch::kBool) {
      const bool valid = std::all_of(source, source + bytes, [](uint8_t b) { return b <= 1; });
      TORCH_CHECK(valid, where(entry.name), "BOOL data holds a byte other than 0 or 1");
    }
    const size_t itemsize = c10::elementSize(entry.dtype);
    if (reinterpret_cast<uintptr_t>(source) % itemsize == 0) {
      std::shared_ptr<detail::Mapping> keep = mapping_;
      return torch::from_blob(source, entry.shape, [keep](void*) {}, options);
    }
    torch::Tensor copy = torch::empty(entry.shape, options);
    std::memcpy(copy.data_ptr(), source, bytes);
    return copy;
  }

  /// Every tensor by name (views where aligned, see `get`).
  TensorMap all() const {
    TensorMap result;
    for (const auto& entry : tensors_) result.emplace(entry.name, get(entry.name));
    return result;
  }

  /// Start of the data section in memory (for diagnostics, e.g. telling views from copies).
  const void* data() const { return data_begin(); }

  /// Length of the data section in bytes.
  uint64_t data_size() const { return data_size_; }

 private:
  uint8_t* data_begin() const { return mapping_->data() + data_offset_; }

  std::string where() const { return "safetensors file '" + path_ + "': "; }
  std::string where(const std::string& key) const {
    return "safetensors file '" + path_ + "', tensor '" + key + "': ";
  }

  void read_metadata(const nlohmann::json& value) {
    TORCH_CHECK(value.is_object(), where(), "__metadata__ is not a JSON object but ",
                value.type_name());
    for (const auto& item : value.items()) {
      TORCH_CHECK(item.value().is_string(), where(), "__metadata__ value of '", item.key(),
                  "' is not a string but ", item.value().type_name());
      metadata_.emplace(item.key(), item.value().get<std::string>());
    }
  }

  TensorInfo read_entry(const std::string& name, const nlohmann::json& entry) const {
    TORCH_CHECK(entry.is_object(), where(name), "header entry is not a JSON object but ",
                entry.type_name());
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      TORCH_CHECK(entry.contains(field), where(name), "header entry lacks '", field, "'");
    }
    TensorInfo info;
    info.name = name;

    const auto& dtype = entry.at("dtype");
    TORCH_CHECK(dtype.is_string(), where(name), "dtype is not a string but ", dtype.type_name());
    const auto parsed = parse_dtype(dtype.get<std::string>());
    TORCH_CHECK(parsed.has_value(), where(name), "unsupported dtype '", dtype.get<std::string>(),
                "' (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
    info.dtype = *parsed;

    const auto& shape = entry.at("shape");
    TORCH_CHECK(shape.is_array(), where(name), "shape is not an array but ", shape.type_name());
    uint64_t numel = 1;
    bool numel_overflow = false;
    for (size_t i = 0; i < shape.size(); ++i) {
      const auto& dim = shape[i];
      TORCH_CHECK(dim.is_number_integer(), where(name), "shape[", i, "] is not an integer: ",
                  dim.dump());
      TORCH_CHECK(dim.is_number_unsigned(), where(name), "shape[", i, "] is negative: ",
                  dim.dump());
      const uint64_t size = dim.get<uint64_t>();
      TORCH_CHECK(size <= static_cast<uint64_t>(INT64_MAX), where(name), "shape[", i,
                  "] = ", size, " is too large");
      info.shape.push_back(static_cast<int64_t>(size));
      numel_overflow = numel_overflow || !detail::checked_mul(numel, size, numel);
    }
    if (std::count(info.shape.begin(), info.shape.end(), 0) != 0) {
      numel = 0;  // an empty tensor: other sizes may be anything
      numel_overflow = false;
    }
    uint64_t bytes = 0;
    TORCH_CHECK(!numel_overflow && detail::checked_mul(numel, c10::elementSize(info.dtype), bytes),
                where(name), "byte size of shape ", detail::shape_str(info.shape),
                " overflows 64 bits");

    const auto& offsets = entry.at("data_offsets");
    TORCH_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                    offsets[1].is_number_unsigned(),
                where(name), "data_offsets must be two non-negative integers, got ",
                offsets.dump());
    info.begin = offsets[0].get<uint64_t>();
    info.end = offsets[1].get<uint64_t>();
    TORCH_CHECK(info.end >= info.begin, where(name), "data_offsets end ", info.end,
                " is before begin ", info.begin);
    TORCH_CHECK(info.end - info.begin == bytes, where(name), "data_offsets [", info.begin, ", ",
                info.end, "] hold ", info.end - info.begin, " bytes but ", dtype_name(info.dtype),
                " ", detail::shape_str(info.shape), " needs ", bytes);
    TORCH_CHECK(info.end <= data_size_, where(name), "data_offsets [", info.begin, ", ", info.end,
                "] run past the end of the data section (", data_size_,
                " bytes): the file is truncated or the offsets are wrong");
    return info;
  }

  /// The byte ranges must tile the data section exactly: no overlap, no hole, no tail.
  void check_coverage() {
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    uint64_t cursor = 0;
    const TensorInfo* previous = nullptr;
    for (const auto& entry : tensors_) {
      TORCH_CHECK(entry.begin >= cursor, where(entry.name), "data_offsets [", entry.begin, ", ",
                  entry.end, "] overlap tensor '", previous ? previous->name : "", "' (which ends at ",
                  cursor, ")");
      TORCH_CHECK(entry.begin == cursor, where(entry.name), "hole in the data section: bytes [",
                  cursor, ", ", entry.begin, ") before this tensor belong to no tensor");
      cursor = entry.end;
      previous = &entry;
    }
    TORCH_CHECK(cursor == data_size_, where(), "the data section has ", data_size_ - cursor,
                " trailing bytes (from ", cursor, " to ", data_size_,
                ") that belong to no tensor");
  }

  std::string path_;
  std::shared_ptr<detail::Mapping> mapping_;
  uint64_t data_offset_ = 0;
  uint64_t data_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Every tensor of the file at `path` (`File(path).all()`).
inline TensorMap load(const std::string& path) { return File(path).all(); }

/// The `__metadata__` of the file at `path` (the file is validated as a whole).
inline std::map<std::string, std::string> load_metadata(const std::string& path) {
  return File(path).metadata();
}

/// Writes `tensors` and `metadata` to `path` atomically.
///
/// The file is written to a temporary file in the same folder, fsynced and renamed over `path`;
/// on any failure the old file is untouched and the temporary removed. Tensors may live on any
/// device and be non-contiguous (they are copied to contiguous CPU memory). Tensors are laid out
/// by element size (largest first), then name, so every tensor starts aligned for its dtype and
/// loads zero-copy. An empty `metadata` writes no `__metadata__`. Errors name the path (and the
/// key at fault).
///
/// Example:
/// @code
/// scedit::safetensors::save("tuner.safetensors", scedit::state_dict(*tuner));
/// @endcode
inline void save(const std::string& path, const TensorMap& tensors,
                 const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  const std::string where = "safetensors save to '" + path + "': ";
  struct Item {
    const std::string* name;
    torch::Tensor data;
    size_t itemsize;
  };
  std::vector<Item> items;
  items.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(name != "__metadata__", where, "'__metadata__' is reserved, not a tensor name");
    TORCH_CHECK(tensor.defined(), where, "tensor '", name, "' is undefined");
    TORCH_CHECK(dtype_name(tensor.scalar_type()) != nullptr, where, "tensor '", name,
                "' has dtype ", tensor.scalar_type(),
                ", which safetensors cannot store here (supported: F64, F32, F16, BF16, I64, "
                "I32, I16, I8, U8, BOOL)");
    TORCH_CHECK(tensor.layout() == torch::kStrided, where, "tensor '", name,
                "' is not a dense (strided) tensor");
    torch::Tensor dense = tensor.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
    items.push_back({&name, dense, static_cast<size_t>(dense.element_size())});
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.itemsize > b.itemsize; });

  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& item : items) {
    const uint64_t bytes = static_cast<uint64_t>(item.data.nbytes());
    nlohmann::json entry = nlohmann::json::object();
    entry["dtype"] = dtype_name(item.data.scalar_type());
    entry["shape"] = item.data.sizes().vec();
    entry["data_offsets"] = nlohmann::json::array({offset, offset + bytes});
    header[*item.name] = std::move(entry);
    offset += bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, where, "cannot write the header (", e.what(), ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  const uint64_t header_size = text.size();

  std::vector<std::pair<const void*, size_t>> pieces = {{&header_size, 8}, {text.data(), text.size()}};
  for (const auto& item : items) pieces.emplace_back(item.data.data_ptr(), item.data.nbytes());
  write_file_atomically(path, pieces, where);
}

}  // namespace safetensors
}  // namespace scedit
