// Reading `torch.save` files (the zip format PyTorch writes since 1.6: `open_clip_pytorch_model.bin`,
// Hugging Face `pytorch_model.bin`, open_clip_train's `epoch_N.pt`) with libtorch's own reader: the
// zip archive through `PyTorchStreamReader`, the pickle through libtorch's `Unpickler`, as
// `torch::jit::pickle_load` does, with every storage mapped to the CPU (`map_location="cpu"`), since
// checkpoints written on a GPU name `cuda:N` storages. libtorch's unpickler builds only tensors,
// containers, numbers, strings and a few torch types; any other class in the pickle is an error
// from it, so no Python object is ever built.
//
// One gap of that unpickler is bridged first: it reads `collections.OrderedDict` as None, so the
// `state_dict()` every such file holds fails (pytorch/pytorch#100741). `bridge_ordered_dicts`
// rewrites the pickle's opcodes, not its objects: each `OrderedDict()` call becomes an empty dict
// (the items that follow fill it as before), and the attributes a state dict carries (`BUILD`
// with `{"_metadata": ...}`) become one entry under a reserved key that the walk below leaves out.
//
// The loaded value is handed to Rust as its leaves, depth first: each leaf with its path from the
// root (dict keys, list and tuple indices), joined by '\x1f' (state-dict keys contain '.').
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim.h"

using ferroclip::guarded;

namespace {

// The bytes Rust read, as a read adapter over memory it keeps alive for the call.
class BorrowedBytes : public caffe2::serialize::ReadAdapterInterface {
 public:
  BorrowedBytes(const char* data, size_t len) : data_(data), len_(len) {}
  size_t size() const override { return len_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= len_) return 0;
    size_t k = std::min<size_t>(n, len_ - pos);
    std::memcpy(buf, data_ + pos, k);
    return k;
  }

 private:
  const char* data_;
  size_t len_;
};

// The reserved key a state dict's attributes are kept under (never a real key: it starts with \x1f).
const std::string kAttributesKey = "\x1f" "attributes";

// Opcodes of pickle protocol 2 (Python's pickletools).
namespace op {
constexpr char MARK = '(', STOP = '.', EMPTY_TUPLE = ')', EMPTY_LIST = ']', EMPTY_DICT = '}', NONE = 'N',
               TUPLE = 't', LIST = 'l', DICT = 'd', APPEND = 'a', APPENDS = 'e', SETITEM = 's', SETITEMS = 'u',
               REDUCE = 'R', BUILD = 'b', BINPERSID = 'Q', BINPUT = 'q', LONG_BINPUT = 'r', BINGET = 'h',
               LONG_BINGET = 'j', BININT1 = 'K', BININT2 = 'M', BININT = 'J', BINFLOAT = 'G', BINUNICODE = 'X',
               GLOBAL = 'c';
constexpr unsigned char PROTO = 0x80, NEWOBJ = 0x81, TUPLE1 = 0x85, TUPLE2 = 0x86, TUPLE3 = 0x87, NEWTRUE = 0x88,
                        NEWFALSE = 0x89, LONG1 = 0x8a;
}  // namespace op

// What the bridge knows of a value on the pickle's stack: where its opcodes start in the output.
struct Slot {
  enum Kind { kValue, kMark, kOrderedDictClass, kOrderedDict } kind;
  size_t start;
  std::string text = {};  // a string's value: the key an unreadable value is reported under
};

[[noreturn]] void unsupported(const std::string& what, size_t at) {
  throw std::runtime_error("pickle: " + what + " at byte " + std::to_string(at));
}

std::string bridge_ordered_dicts(const char* in, size_t n) {
  std::string out;
  out.reserve(n + 64);
  std::vector<Slot> stack;
  std::vector<bool> memo_is_class;  // memo slots holding collections.OrderedDict itself
  size_t i = 0;
  auto need = [&](size_t k) {
    if (i + k > n) unsupported("truncated", i);
  };
  auto u32 = [&](size_t at) {
    uint32_t v;
    std::memcpy(&v, in + at, 4);
    return v;
  };
  auto pop = [&]() {
    if (stack.empty()) unsupported("stack underflow", i);
    Slot s = stack.back();
    stack.pop_back();
    return s;
  };
  auto pop_to_mark = [&]() {
    while (true) {
      Slot s = pop();
      if (s.kind == Slot::kMark) return s;
    }
  };
  auto memo_class = [&](uint32_t k) { return k < memo_is_class.size() && memo_is_class[k]; };
  auto memoize = [&](uint32_t k, size_t at, size_t len) {
    if (stack.empty()) unsupported("memo of an empty stack", at);
    bool cls = stack.back().kind == Slot::kOrderedDictClass;
    if (memo_is_class.size() <= k) memo_is_class.resize(k + 1, false);
    memo_is_class[k] = cls;
    // The class itself has no bytes in the output (its call becomes an empty dict): nor has its memo.
    if (!cls) out.append(in + at, len);
  };
  while (i < n) {
    const size_t at = i;
    const unsigned char c = static_cast<unsigned char>(in[i++]);
    auto copy = [&](size_t len) {
      need(len);
      out.append(in + at, 1 + len);
      i += len;
    };
    switch (c) {
      case op::PROTO:
        copy(1);
        break;
      case op::STOP:
        out.push_back(static_cast<char>(c));
        return out;
      case op::MARK:
        stack.push_back({Slot::kMark, out.size()});
        out.push_back(static_cast<char>(c));
        break;
      case op::EMPTY_TUPLE:
      case op::EMPTY_LIST:
      case op::EMPTY_DICT:
      case op::NONE:
      case op::NEWTRUE:
      case op::NEWFALSE:
        stack.push_back({Slot::kValue, out.size()});
        copy(0);
        break;
      case op::BININT1:
      case op::BININT2:
      case op::BININT:
      case op::BINFLOAT: {
        size_t len = c == op::BININT1 ? 1 : c == op::BININT2 ? 2 : c == op::BININT ? 4 : 8;
        stack.push_back({Slot::kValue, out.size()});
        copy(len);
      } break;
      case op::LONG1:
        need(1);
        stack.push_back({Slot::kValue, out.size()});
        copy(1 + static_cast<unsigned char>(in[i]));
        break;
      case op::BINUNICODE: {
        need(4);
        uint32_t len = u32(i);
        need(4 + len);
        stack.push_back({Slot::kValue, out.size(), std::string(in + i + 4, len)});
        copy(4 + len);
      } break;
      case op::GLOBAL: {
        size_t end1 = i;
        while (end1 < n && in[end1] != '\n') end1++;
        size_t end2 = end1 + 1;
        while (end2 < n && in[end2] != '\n') end2++;
        if (end2 >= n) unsupported("truncated GLOBAL", at);
        std::string module(in + i, end1 - i), name(in + end1 + 1, end2 - end1 - 1);
        if (module == "collections" && name == "OrderedDict") {
          stack.push_back({Slot::kOrderedDictClass, out.size()});
          i = end2 + 1;
        } else if (module != "torch" && module.rfind("torch.", 0) != 0) {
          // libtorch builds torch's types only; say which value holds the object.
          std::string key = "<root>";
          for (auto it = stack.rbegin(); it != stack.rend(); ++it) {
            if (!it->text.empty()) {
              key = it->text;
              break;
            }
          }
          throw std::runtime_error("`" + key + "` holds a `" + module + "." + name +
                                   "` object (only tensors, dicts, lists, tuples, numbers, strings and None are read)");
        } else {
          stack.push_back({Slot::kValue, out.size()});
          copy(end2 + 1 - i);
        }
      } break;
      case op::BINPUT:
        need(1);
        memoize(static_cast<unsigned char>(in[i]), at, 2);
        i += 1;
        break;
      case op::LONG_BINPUT:
        need(4);
        memoize(u32(i), at, 5);
        i += 4;
        break;
      case op::BINGET:
      case op::LONG_BINGET: {
        size_t len = c == op::BINGET ? 1 : 4;
        need(len);
        uint32_t k = len == 1 ? static_cast<unsigned char>(in[i]) : u32(i);
        if (memo_class(k)) {
          stack.push_back({Slot::kOrderedDictClass, out.size()});
          i += len;
        } else {
          stack.push_back({Slot::kValue, out.size()});
          copy(len);
        }
      } break;
      case op::TUPLE:
      case op::LIST:
      case op::DICT: {
        Slot mark = pop_to_mark();
        stack.push_back({Slot::kValue, mark.start});
        copy(0);
      } break;
      case op::TUPLE1:
      case op::TUPLE2:
      case op::TUPLE3: {
        size_t start = out.size();
        for (int k = 0; k < c - op::TUPLE1 + 1; ++k) start = pop().start;
        stack.push_back({Slot::kValue, start});
        copy(0);
      } break;
      case op::APPEND:
      case op::SETITEM:
        pop();
        if (c == op::SETITEM) pop();
        copy(0);
        break;
      case op::APPENDS:
      case op::SETITEMS:
        pop_to_mark();
        copy(0);
        break;
      case op::BINPERSID: {
        Slot s = pop();
        stack.push_back({Slot::kValue, s.start});
        copy(0);
      } break;
      case op::REDUCE:
      case op::NEWOBJ: {
        Slot args = pop();
        Slot callable = pop();
        if (callable.kind == Slot::kOrderedDictClass) {
          // `OrderedDict()`: the class wrote nothing, its argument tuple must be the empty one.
          if (out.size() != args.start + 1 || out[args.start] != op::EMPTY_TUPLE)
            unsupported("OrderedDict built with arguments", at);
          out.resize(callable.start);
          stack.push_back({Slot::kOrderedDict, out.size()});
          out.push_back(op::EMPTY_DICT);
        } else {
          stack.push_back({Slot::kValue, callable.start});
          copy(0);
        }
      } break;
      case op::BUILD: {
        Slot state = pop();
        if (stack.empty()) unsupported("BUILD without an object", at);
        if (stack.back().kind == Slot::kOrderedDict) {
          // obj.__dict__.update(state) -> obj[kAttributesKey] = state
          std::string key(1, op::BINUNICODE);
          uint32_t len = static_cast<uint32_t>(kAttributesKey.size());
          key.append(reinterpret_cast<const char*>(&len), 4);
          key += kAttributesKey;
          out.insert(state.start, key);
          out.push_back(op::SETITEM);
        } else {
          copy(0);
        }
      } break;
      default:
        unsupported("opcode 0x" + [&] {
          char hex[3];
          std::snprintf(hex, sizeof hex, "%02x", c);
          return std::string(hex);
        }() + " (not one torch.save writes)", at);
    }
  }
  unsupported("no STOP opcode", n);
}

// Leaf kinds, as `torch_file.rs` decodes them.
enum Leaf : int { kTensor = 0, kInt = 1, kDouble = 2, kBool = 3, kNone = 4, kString = 5, kEmpty = 6 };

using Visit = void (*)(void* ctx, const char* path, int kind, at::Tensor* tensor, int64_t i, double d, const char* s);

std::string join(const std::string& path, const std::string& part) {
  return path.empty() ? part : path + '\x1f' + part;
}

std::string shown(const std::string& path) {
  std::string out = path;
  for (auto& c : out) {
    if (c == '\x1f') c = '/';
  }
  return out.empty() ? "<root>" : out;
}

void walk(const c10::IValue& v, const std::string& path, Visit visit, void* ctx) {
  if (v.isTensor()) {
    visit(ctx, path.c_str(), kTensor, new at::Tensor(v.toTensor()), 0, 0.0, nullptr);
  } else if (v.isInt()) {
    visit(ctx, path.c_str(), kInt, nullptr, v.toInt(), 0.0, nullptr);
  } else if (v.isDouble()) {
    visit(ctx, path.c_str(), kDouble, nullptr, 0, v.toDouble(), nullptr);
  } else if (v.isBool()) {
    visit(ctx, path.c_str(), kBool, nullptr, v.toBool() ? 1 : 0, 0.0, nullptr);
  } else if (v.isNone()) {
    visit(ctx, path.c_str(), kNone, nullptr, 0, 0.0, nullptr);
  } else if (v.isString()) {
    visit(ctx, path.c_str(), kString, nullptr, 0, 0.0, v.toStringRef().c_str());
  } else if (v.isGenericDict()) {
    auto dict = v.toGenericDict();
    if (dict.empty()) visit(ctx, path.c_str(), kEmpty, nullptr, 0, 0.0, nullptr);
    for (const auto& item : dict) {
      const auto& key = item.key();
      if (key.isString() && key.toStringRef() == kAttributesKey) continue;
      std::string part;
      if (key.isString()) {
        part = key.toStringRef();
      } else if (key.isInt()) {
        part = std::to_string(key.toInt());
      } else {
        throw std::runtime_error("`" + shown(path) + "` has a key of type " + key.tagKind() +
                                 " (only string and integer keys are read)");
      }
      walk(item.value(), join(path, part), visit, ctx);
    }
  } else if (v.isList() || v.isTuple() || v.isIntList() || v.isDoubleList() || v.isBoolList() ||
             v.isTensorList()) {
    std::vector<c10::IValue> items;
    if (v.isTuple()) {
      for (const auto& e : v.toTupleRef().elements()) items.push_back(e);
    } else {
      for (const auto& e : v.toListRef()) items.push_back(e);
    }
    if (items.empty()) visit(ctx, path.c_str(), kEmpty, nullptr, 0, 0.0, nullptr);
    for (size_t i = 0; i < items.size(); ++i) walk(items[i], join(path, std::to_string(i)), visit, ctx);
  } else {
    throw std::runtime_error("`" + shown(path) + "` is a " + v.tagKind() +
                             " (only tensors, dicts, lists, tuples, numbers, strings and None are read)");
  }
}

}  // namespace

extern "C" {

// Loads the torch.save zip archive in `data[0..len)` and calls `visit` once per leaf (tensors are
// new CPU tensors Rust takes ownership of). 0 on success; non-zero with the error recorded.
int ferroclip_torch_load(const char* data, size_t len, Visit visit, void* ctx) {
  return guarded(
      [&]() -> int {
        caffe2::serialize::PyTorchStreamReader reader(std::make_shared<BorrowedBytes>(data, len));
        auto [pickle, pickle_len] = reader.getRecord("data.pkl");
        const std::string bridged = bridge_ordered_dicts(static_cast<const char*>(pickle.get()), pickle_len);
        size_t pos = 0;
        auto read = [&](char* buf, size_t n) -> size_t {
          size_t k = std::min(n, bridged.size() - pos);
          std::memcpy(buf, bridged.data() + pos, k);
          pos += k;
          return k;
        };
        auto read_record = [&](const std::string& name) { return std::get<0>(reader.getRecord("data/" + name)); };
        torch::jit::Unpickler unpickler(read, /*type_resolver=*/nullptr, /*obj_loader=*/nullptr, read_record,
                                        /*device=*/at::Device(at::kCPU));
        unpickler.set_version(reader.version());
        c10::IValue value = unpickler.parse_ivalue();
        walk(value, "", visit, ctx);
        return 0;
      },
      1);
}

}  // extern "C"
