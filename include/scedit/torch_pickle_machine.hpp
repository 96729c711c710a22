#pragma once
/// @file torch_pickle_machine.hpp
/// @brief The restricted pickle machine behind `scedit::load_torch_file`: Python's pickle
/// opcodes as `torch.save` emits them, an allow-list of globals, and nothing that runs code.
///
/// The machine builds plain values (numbers, strings, tuples, lists, dicts), tensors and inert
/// placeholder objects; a global is a name looked up in a fixed table (`classify_global`), and
/// calling one (REDUCE, NEWOBJ) does what the table says: build an `OrderedDict` or a tensor,
/// or make a placeholder. Malformed input (a read past the end, a memo entry never stored, a
/// stack underflow, a missing MARK, nesting deeper than `kMaxNesting`, an unknown opcode) is
/// refused with the offset of the opcode at fault.
///
/// Example:
/// @code
/// scedit::torch_pickle::Unpickler machine(pickle_bytes, "'model.pt' (data.pkl)", storage_reader);
/// std::shared_ptr<scedit::torch_pickle::Value> root = machine.load();
/// @endcode

#include <scedit/torch_pickle_globals.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace scedit {
namespace torch_pickle {

/// The deepest nesting of containers (and of open MARKs) accepted. A state dict nests three
/// levels, a full training checkpoint about six.
constexpr size_t kMaxNesting = 100;

/// One value of the machine.
struct Value {
  /// The kinds of values.
  enum class Kind { none, boolean, integer, floating, string, bytes, tuple, list, dict, global,
                    storage, tensor, object };
  /// This value's kind.
  Kind kind = Kind::none;
  /// boolean, integer.
  int64_t integer = 0;
  /// floating.
  double floating = 0.0;
  /// string, bytes; a global's "module.name"; an object's class name.
  std::string text;
  /// tuple, list: the elements; dict: key, value, key, value, ...; object: its arguments.
  std::vector<std::shared_ptr<Value>> items;
  /// storage (1-D, all its elements) or tensor.
  torch::Tensor tensor;
  /// global: its role, and the dtype of a storage type or dtype.
  GlobalRole role = GlobalRole::placeholder;
  /// global: the dtype it names (storage types and dtypes); `Byte` for `torch.UntypedStorage`.
  torch::ScalarType dtype = torch::kFloat32;
  /// Containers below this one, as far as the machine saw them built.
  size_t depth = 0;
};

/// A shared value (the memo and containers refer to the same value).
using ValuePtr = std::shared_ptr<Value>;

/// "dict", "tensor", ... for messages.
inline const char* kind_name(Value::Kind kind) {
  static const char* names[] = {"None", "bool", "int", "float", "str", "bytes", "tuple", "list",
                                "dict", "global", "storage", "tensor", "object"};
  return names[static_cast<int>(kind)];
}

/// Reads the storage `key` of `numel` elements of `dtype` (from the zip, in `load_torch_file`).
using StorageReader = std::function<torch::Tensor(const std::string& key, torch::ScalarType dtype,
                                                  int64_t numel)>;

/// The pickle machine over one pickle. `load()` runs it once.
class Unpickler {
 public:
  /// A machine over `data` (the pickle's bytes, which must outlive it); `source` names it in
  /// every message; `storages` resolves persistent ids `('storage', type, key, location, numel)`.
  Unpickler(const std::string& data, std::string source, StorageReader storages)
      : data_(data), source_(std::move(source)), storages_(std::move(storages)) {}
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;
  /// Takes every container apart one by one, so that a deep (or cyclic) structure is freed
  /// without recursion: the values `load()` returned are empty afterwards, so read them (take
  /// their tensors) while the machine lives.
  ~Unpickler() {
    for (auto& container : containers_) container->items.clear();
  }

  /// Runs the pickle to its STOP and returns the value it built (whose containers stay filled
  /// while this machine lives).
  ValuePtr load();

 private:
  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    std::ostringstream message;
    message << source_ << ": ";
    (message << ... << args);
    message << " (opcode 0x" << std::hex << static_cast<int>(opcode_) << std::dec << " at offset "
            << opcode_at_ << ")";
    TORCH_CHECK(false, message.str());
  }
  const char* take(size_t n) {
    if (n > data_.size() - pos_) fail("the pickle ends inside an opcode's argument");
    const char* p = data_.data() + pos_;
    pos_ += n;
    return p;
  }
  uint64_t unsigned_le(size_t n) {
    const auto* p = reinterpret_cast<const unsigned char*>(take(n));
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
  }
  std::string line() {
    const size_t end = data_.find('\n', pos_);
    if (end == std::string::npos) fail("the pickle ends inside a GLOBAL's name");
    std::string text = data_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return text;
  }
  size_t length(uint64_t n) {
    if (n > data_.size() - pos_) fail("a length of ", n, " bytes reaches past the pickle's end");
    return static_cast<size_t>(n);
  }
  ValuePtr make(Value::Kind kind) {
    auto v = std::make_shared<Value>();
    v->kind = kind;
    if (kind == Value::Kind::tuple || kind == Value::Kind::list || kind == Value::Kind::dict ||
        kind == Value::Kind::object) {
      containers_.push_back(v);
    }
    return v;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  ValuePtr pop() {
    if (stack_.size() <= floor()) fail("stack underflow");
    auto v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  ValuePtr& top() {
    if (stack_.size() <= floor()) fail("stack underflow");
    return stack_.back();
  }
  std::vector<ValuePtr> pop_to_mark() {
    if (marks_.empty()) fail("no MARK to collect items up to");
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.begin() + marks_.back()),
                                std::make_move_iterator(stack_.end()));
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  void add(Value& container, std::vector<ValuePtr> items) {
    for (auto& item : items) {
      container.depth = std::max(container.depth, item->depth + 1);
      if (container.depth > kMaxNesting) fail("values nested deeper than ", kMaxNesting, " levels");
      container.items.push_back(std::move(item));
    }
  }
  ValuePtr tuple(std::vector<ValuePtr> items) {
    auto t = make(Value::Kind::tuple);
    add(*t, std::move(items));
    return t;
  }
  void set_items(Value& dict, std::vector<ValuePtr> items) {
    if (items.size() % 2 != 0) fail("SETITEMS with an odd number of items");
    if (dict.kind != Value::Kind::dict) fail("setting items of a ", kind_name(dict.kind), ", not a dict");
    add(dict, std::move(items));
  }
  void append(Value& list, std::vector<ValuePtr> items) {
    if (list.kind != Value::Kind::list) fail("appending to a ", kind_name(list.kind), ", not a list");
    add(list, std::move(items));
  }
  void global(const std::string& module, const std::string& name);
  ValuePtr call(const Value& callable, const Value& args);
  ValuePtr persistent_load(const Value& id);
  ValuePtr rebuild_tensor(const std::vector<ValuePtr>& args, bool v3);
  int64_t integer(const Value& v, const char* what) const {
    if (v.kind != Value::Kind::integer) fail(what, " is a ", kind_name(v.kind), ", not an int");
    return v.integer;
  }
  std::vector<int64_t> integers(const Value& v, const char* what) const {
    if (v.kind != Value::Kind::tuple && v.kind != Value::Kind::list) {
      fail(what, " is a ", kind_name(v.kind), ", not a tuple");
    }
    std::vector<int64_t> out;
    for (const auto& item : v.items) out.push_back(integer(*item, what));
    return out;
  }

  const std::string& data_;
  std::string source_;
  StorageReader storages_;
  size_t pos_ = 0;
  size_t opcode_at_ = 0;
  unsigned char opcode_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  std::vector<ValuePtr> containers_;
};

// ---- the machine -------------------------------------------------------------------------------

inline ValuePtr Unpickler::load() {
  using K = Value::Kind;
  while (true) {
    opcode_at_ = pos_;
    if (pos_ >= data_.size()) fail("the pickle ends without STOP");
    opcode_ = static_cast<unsigned char>(*take(1));
    switch (opcode_) {
      case 0x80:  // PROTO
        if (static_cast<unsigned char>(*take(1)) > 5) fail("pickle protocol above 5");
        break;
      case 0x95: take(8); break;  // FRAME: a length hint only
      case '.': {                 // STOP
        auto result = pop();
        if (!marks_.empty()) fail("STOP with a MARK still open");
        return result;
      }
      case '(':  // MARK
        if (marks_.size() >= kMaxNesting) fail("more than ", kMaxNesting, " MARKs open");
        marks_.push_back(stack_.size());
        break;
      case '0': pop(); break;                                 // POP
      case '1': pop_to_mark(); break;                         // POP_MARK
      case '2': push(top()); break;                           // DUP
      case 'N': push(make(K::none)); break;                   // NONE
      case 0x88: case 0x89: {                                 // NEWTRUE, NEWFALSE
        auto v = make(K::boolean);
        v->integer = opcode_ == 0x88;
        push(v);
        break;
      }
      case 'J': case 'K': case 'M': {  // BININT (int32), BININT1 (uint8), BININT2 (uint16)
        auto v = make(K::integer);
        const size_t n = opcode_ == 'J' ? 4 : opcode_ == 'K' ? 1 : 2;
        const uint64_t raw = unsigned_le(n);
        v->integer = n == 4 ? static_cast<int64_t>(static_cast<int32_t>(raw)) : static_cast<int64_t>(raw);
        push(v);
        break;
      }
      case 0x8a: case 0x8b: {  // LONG1, LONG4: little-endian two's complement
        const uint64_t n = unsigned_le(opcode_ == 0x8a ? 1 : 4);
        if (n > 8) fail("an integer of ", n, " bytes, more than 64 bits");
        auto v = make(K::integer);
        const uint64_t raw = unsigned_le(static_cast<size_t>(n));
        const bool negative = n > 0 && (raw >> (8 * n - 1)) & 1;
        v->integer = static_cast<int64_t>(negative && n < 8 ? raw | (~uint64_t{0} << (8 * n)) : raw);
        push(v);
        break;
      }
      case 'G': {  // BINFLOAT: big-endian double
        const auto* p = reinterpret_cast<const unsigned char*>(take(8));
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];
        auto v = make(K::floating);
        std::memcpy(&v->floating, &bits, sizeof(double));
        push(v);
        break;
      }
      case 'X': case 0x8c: case 0x8d:     // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
      case 'T': case 'U':                 // BINSTRING, SHORT_BINSTRING (protocol 1 str)
      case 'B': case 'C': case 0x8e: {    // BINBYTES, SHORT_BINBYTES, BINBYTES8
        const bool bytes = opcode_ == 'B' || opcode_ == 'C' || opcode_ == 0x8e;
        const size_t width = (opcode_ == 0x8c || opcode_ == 'U' || opcode_ == 'C') ? 1
                             : (opcode_ == 0x8d || opcode_ == 0x8e)                ? 8
                                                                                   : 4;
        const size_t n = length(unsigned_le(width));
        auto v = make(bytes ? K::bytes : K::string);
        v->text.assign(take(n), n);
        push(v);
        break;
      }
      case ')': push(make(K::tuple)); break;  // EMPTY_TUPLE
      case ']': push(make(K::list)); break;   // EMPTY_LIST
      case '}': push(make(K::dict)); break;   // EMPTY_DICT
      case 't': push(tuple(pop_to_mark())); break;  // TUPLE
      case 0x85: case 0x86: case 0x87: {            // TUPLE1, TUPLE2, TUPLE3
        std::vector<ValuePtr> items(opcode_ - 0x84);
        for (size_t i = items.size(); i-- > 0;) items[i] = pop();
        push(tuple(std::move(items)));
        break;
      }
      case 'a': {  // APPEND
        auto item = pop();
        append(*top(), {item});
        break;
      }
      case 'e': {  // APPENDS
        auto items = pop_to_mark();
        append(*top(), std::move(items));
        break;
      }
      case 's': {  // SETITEM
        auto value = pop();
        auto key = pop();
        set_items(*top(), {key, value});
        break;
      }
      case 'u': {  // SETITEMS
        auto items = pop_to_mark();
        set_items(*top(), std::move(items));
        break;
      }
      case 'q': case 'r': case 0x94: {  // BINPUT, LONG_BINPUT, MEMOIZE
        const uint64_t index = opcode_ == 0x94 ? memo_.size() : unsigned_le(opcode_ == 'q' ? 1 : 4);
        memo_[index] = top();
        break;
      }
      case 'h': case 'j': {  // BINGET, LONG_BINGET
        const uint64_t index = unsigned_le(opcode_ == 'h' ? 1 : 4);
        const auto found = memo_.find(index);
        if (found == memo_.end()) fail("memo entry ", index, " is read but was never stored");
        push(found->second);
        break;
      }
      case 'c': {  // GLOBAL: "module\nname\n"
        const std::string module = line();
        global(module, line());
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        auto name = pop();
        auto module = pop();
        if (module->kind != K::string || name->kind != K::string) fail("STACK_GLOBAL of non-strings");
        global(module->text, name->text);
        break;
      }
      case 'Q': {  // BINPERSID
        auto id = pop();
        push(persistent_load(*id));
        break;
      }
      case 'R': case 0x81: {  // REDUCE (callable, args), NEWOBJ (class, args)
        auto args = pop();
        auto callable = pop();
        push(call(*callable, *args));
        break;
      }
      case 'b': {  // BUILD: state set on an object; kept inert
        auto state = pop();
        auto& target = *top();
        if (target.kind != K::dict && target.kind != K::object && target.kind != K::tensor) {
          fail("BUILD on a ", kind_name(target.kind));
        }
        if (target.kind == K::object) add(target, {state});
        break;
      }
      default:
        fail("unknown or unsupported opcode");
    }
  }
}

inline void Unpickler::global(const std::string& module, const std::string& name) {
  const std::string full = module + "." + name;
  const auto known = classify_global(module, name);
  if (!known) {
    std::ostringstream message;
    message << source_ << " refers to global '" << full
            << "', which a weights file has no reason to contain; refused without running it"
            << " (offset " << opcode_at_ << ")";
    TORCH_CHECK(false, message.str());
  }
  auto v = make(Value::Kind::global);
  v->text = full;
  v->role = known->first;
  v->dtype = known->second;
  push(v);
}

inline ValuePtr Unpickler::call(const Value& callable, const Value& args) {
  using K = Value::Kind;
  if (callable.kind != K::global) fail("calling a ", kind_name(callable.kind), ", not a global");
  if (args.kind != K::tuple) fail("'", callable.text, "' called with a ", kind_name(args.kind), ", not a tuple");
  const auto& a = args.items;
  switch (callable.role) {
    case GlobalRole::ordered_dict: {
      if (!a.empty()) fail("collections.OrderedDict called with arguments");
      return make(K::dict);
    }
    case GlobalRole::rebuild_tensor_v2: return rebuild_tensor(a, /*v3=*/false);
    case GlobalRole::rebuild_tensor_v3: return rebuild_tensor(a, /*v3=*/true);
    case GlobalRole::rebuild_parameter:
      if (a.empty() || a[0]->kind != K::tensor) fail("'", callable.text, "' without a tensor");
      return a[0];
    case GlobalRole::rebuild_from_type: {
      // (func, type, args, state): func must itself rebuild a tensor.
      if (a.size() != 4 || a[0]->kind != K::global || a[2]->kind != K::tuple) {
        fail("'", callable.text, "' with unexpected arguments");
      }
      auto result = call(*a[0], *a[2]);
      if (result->kind != K::tensor) fail("'", callable.text, "' that does not rebuild a tensor");
      return result;
    }
    case GlobalRole::restore_type_tag:
      if (a.empty()) fail("'", callable.text, "' without arguments");
      return a[0];
    case GlobalRole::torch_size:
      if (a.size() != 1 || a[0]->kind != K::tuple) fail("torch.Size without a tuple");
      return a[0];
    case GlobalRole::placeholder: {
      auto object = make(K::object);
      object->text = callable.text;
      add(*object, a);
      return object;
    }
    case GlobalRole::storage_type:
    case GlobalRole::dtype: break;
  }
  fail("'", callable.text, "' cannot be called");
}

inline ValuePtr Unpickler::persistent_load(const Value& id) {
  using K = Value::Kind;
  const auto& p = id.items;
  if (id.kind != K::tuple || p.size() != 5 || p[0]->kind != K::string || p[0]->text != "storage") {
    fail("a persistent id that is not ('storage', type, key, location, size)");
  }
  if (p[1]->kind != K::global || p[1]->role != GlobalRole::storage_type) {
    fail("a storage whose type is not a torch storage type");
  }
  if (p[2]->kind != K::string) fail("a storage key that is not a str");
  const int64_t numel = integer(*p[4], "a storage size");
  if (numel < 0) fail("a storage of negative size ", numel);
  auto v = make(K::storage);
  v->tensor = storages_(p[2]->text, p[1]->dtype, numel);
  v->text = p[2]->text;
  return v;
}

inline ValuePtr Unpickler::rebuild_tensor(const std::vector<ValuePtr>& a, bool v3) {
  using K = Value::Kind;
  // v2: (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
  // v3: (storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
  const size_t least = v3 ? 7 : 6;
  if (a.size() < least || a.size() > least + 1) fail("a tensor rebuilt from ", a.size(), " arguments");
  if (a[0]->kind != K::storage) fail("a tensor whose storage is a ", kind_name(a[0]->kind));
  torch::Tensor storage = a[0]->tensor;
  if (v3) {
    if (a[6]->kind != K::global || a[6]->role != GlobalRole::dtype) fail("a tensor without a dtype");
    const auto element = static_cast<int64_t>(c10::elementSize(a[6]->dtype));
    if (storage.scalar_type() != torch::kUInt8 || storage.numel() % element != 0) {
      fail("storage '", a[0]->text, "' of ", storage.numel(), " × ", storage.scalar_type(),
           " cannot be read as ", a[6]->dtype);
    }
    storage = storage.numel() == 0 ? torch::empty({0}, storage.options().dtype(a[6]->dtype))
                                   : storage.view(a[6]->dtype);
  }
  const int64_t offset = integer(*a[1], "a storage offset");
  const auto size = integers(*a[2], "a tensor size");
  const auto stride = integers(*a[3], "a tensor stride");
  if (size.size() != stride.size()) fail("a tensor of ", size.size(), " sizes and ", stride.size(), " strides");
  // The elements reached: offset + Σ (size − 1) · stride must lie within the storage.
  const int64_t limit = storage.numel();
  bool empty = false;
  int64_t last = offset;
  for (size_t i = 0; i < size.size(); ++i) {
    if (size[i] < 0 || stride[i] < 0) fail("a negative size or stride");
    if (size[i] == 0) empty = true;
  }
  if (offset < 0 || offset > limit) fail("storage offset ", offset, " outside storage '", a[0]->text, "' of ", limit, " elements");
  for (size_t i = 0; i < size.size() && !empty; ++i) {
    if (size[i] > 1 && stride[i] > (limit - last) / (size[i] - 1)) {
      fail("a tensor of size ", c10::IntArrayRef(size), ", stride ", c10::IntArrayRef(stride), " at offset ",
           offset, " reaches beyond storage '", a[0]->text, "' of ", limit, " elements");
    }
    last += (size[i] - 1) * stride[i];
  }
  if (!empty && last >= limit) {
    fail("a tensor of size ", c10::IntArrayRef(size), ", stride ", c10::IntArrayRef(stride), " at offset ",
         offset, " reaches beyond storage '", a[0]->text, "' of ", limit, " elements");
  }
  auto v = make(K::tensor);
  v->tensor = storage.as_strided(size, stride, offset);
  return v;
}

}  // namespace torch_pickle
}  // namespace scedit
