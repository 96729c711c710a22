// Tests of include/scedit/torch_pickle.hpp (and tensor_file.hpp's torch.save branch): torch.save
// zips written by LibTorch's torch::pickle_save, and hand-assembled pickles (tests/
// torch_save_writer.hpp) for the layouts pickle_save cannot produce and for hostile files.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <scedit/tensor_file.hpp>
#include <scedit/torch_pickle.hpp>

#include "test_util.hpp"
#include "torch_save_writer.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::Pickle;
using scedit_test::Records;
using scedit_test::TempDir;

class TorchFile : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }

  /// A zip at `name` of the pickle `p` (ended here with STOP) and `records`.
  std::string write(const std::string& name, Pickle p, const Records& records = {},
                    const std::map<std::string, std::string>& extra = {}) {
    const std::string path = dir_.file(name);
    p.op('.');
    scedit_test::write_torch_zip(path, p.bytes, records, extra);
    return path;
  }

  TempDir dir_{"torch_file"};
};

/// 12 float32 values 0..11, the storage "0" of the hand-written files.
Records twelve_floats() { return {{"0", scedit_test::tensor_bytes(torch::arange(12, torch::kFloat32))}}; }

// ---- files LibTorch writes ---------------------------------------------------------------------

TEST_F(TorchFile, ReadsPickleSaveDictsOfEveryDtype) {
  c10::Dict<std::string, torch::Tensor> saved;
  for (const auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kFloat64, torch::kInt64,
                           torch::kInt32, torch::kInt16, torch::kInt8, torch::kUInt8, torch::kBool}) {
    const auto t = (torch::randn({3, 5}) * 50).to(dtype);
    saved.insert(std::string(c10::toString(dtype)), t);
  }
  saved.insert("scalar", torch::tensor(2.5));
  saved.insert("empty", torch::zeros({0, 4}));
  saved.insert("transposed", torch::randn({4, 6}).t());
  saved.insert("slice", torch::randn({8}).narrow(0, 3, 4));
  const auto bytes = torch::pickle_save(saved);
  const std::string path = dir_.file("saved.pt");
  scedit_test::write_file(path, std::string(bytes.begin(), bytes.end()));

  EXPECT_EQ(scedit::tensor_file_format(path), scedit::TensorFileFormat::torch_zip);
  const auto loaded = scedit::load_torch_file(path);
  ASSERT_EQ(loaded.size(), saved.size());
  for (const auto& entry : saved) {
    ASSERT_TRUE(loaded.count(entry.key())) << entry.key();
    const auto& t = loaded.at(entry.key());
    EXPECT_EQ(t.scalar_type(), entry.value().scalar_type()) << entry.key();
    EXPECT_TRUE(torch::equal(t, entry.value())) << entry.key();
  }
  const auto dispatched = scedit::load_tensor_file(path);
  EXPECT_TRUE(torch::equal(dispatched.at("Float"), saved.at("Float")));
}

// ---- layouts of Python's pickler -----------------------------------------------------------

// torch.save({'w': t}): Python's pickler writes a one-entry dict with SETITEM, not SETITEMS.
TEST_F(TorchFile, ReadsOneEntryDictBuiltWithSetitem) {
  Pickle p;
  p.proto(2).op('}').put(0).str("w").put(1).tensor("FloatStorage", "0", 12, 0, {3, 4}, {4, 1}).op('s');
  const auto loaded = scedit::load_torch_file(write("one.pt", p, twelve_floats()));
  ASSERT_EQ(loaded.size(), 1u);
  EXPECT_TRUE(torch::equal(loaded.at("w"), torch::arange(12, torch::kFloat32).view({3, 4})));
}

// A state dict of 1001 entries: SETITEMS for the first 1000 pairs, SETITEM for the last one,
// then BUILD with the `_metadata` attribute.
TEST_F(TorchFile, ReadsStateDictWhoseLastBatchIsOneEntry) {
  scedit::TensorMap tensors;
  for (int i = 0; i < 1001; ++i) tensors.emplace("layer." + std::to_string(i) + ".weight", torch::full({2}, i));
  Pickle p;
  Records records;
  scedit_test::state_dict(p.proto(2), tensors, records);
  const auto loaded = scedit::load_torch_file(write("big.pt", p, records));
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [key, t] : tensors) EXPECT_TRUE(torch::equal(loaded.at(key), t)) << key;
}

// Views of one storage: torch.save writes the storage once and each tensor's offset and stride.
TEST_F(TorchFile, ViewsOfOneStorageShareIt) {
  Pickle p;
  p.proto(2).op('}').op('(');
  p.str("matrix").tensor("FloatStorage", "0", 12, 0, {3, 4}, {4, 1});
  p.str("transposed").tensor("FloatStorage", "0", 12, 0, {4, 3}, {1, 4});
  p.str("column").tensor("FloatStorage", "0", 12, 2, {3}, {4});
  p.str("broadcast").tensor("FloatStorage", "0", 12, 11, {2, 2}, {0, 0});
  p.op('u');
  auto loaded = scedit::load_torch_file(write("views.pt", p, twelve_floats()));
  const auto expected = torch::arange(12, torch::kFloat32).view({3, 4});
  EXPECT_TRUE(torch::equal(loaded.at("matrix"), expected));
  EXPECT_TRUE(torch::equal(loaded.at("transposed"), expected.t()));
  EXPECT_FALSE(loaded.at("transposed").is_contiguous());
  EXPECT_TRUE(torch::equal(loaded.at("column"), expected.select(1, 2)));
  EXPECT_TRUE(torch::equal(loaded.at("broadcast"), torch::full({2, 2}, 11.0f)));
  loaded.at("matrix")[0][2].fill_(-1.0f);  // one storage: the other views see the write
  EXPECT_EQ(loaded.at("column")[0].item<float>(), -1.0f);
  EXPECT_EQ(loaded.at("transposed")[2][0].item<float>(), -1.0f);
}

// What protocols 2–5 add over the basic layout: parameters, _rebuild_tensor_v3 over an untyped
// storage with a dtype object, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE, FRAME, SHORT_BINBYTES.
TEST_F(TorchFile, ReadsParametersV3TensorsAndProtocol4Opcodes) {
  const auto bf16 = torch::randn({2, 3}).to(torch::kBFloat16);
  Records records = twelve_floats();
  records["raw"] = scedit_test::tensor_bytes(bf16);
  Pickle p;
  p.proto(4).op(0x95).le(0, 8).op('}').op(0x94).op('(');  // FRAME, EMPTY_DICT, MEMOIZE, MARK
  p.short_str("param").op(0x94).global("torch._utils", "_rebuild_parameter");
  p.tensor("FloatStorage", "0", 12, 4, {4}, {1}).op(0x88).global("collections", "OrderedDict").op(')').op('R');
  p.op(0x87).op('R');  // TUPLE3, REDUCE
  p.str("bf16").short_str("torch._utils").short_str("_rebuild_tensor_v3");
  p.op(0x93).op('(');  // STACK_GLOBAL
  p.op('(').str("storage").global("torch", "UntypedStorage").str("raw").str("cpu").integer(12).op('t').op('Q');
  p.integer(0).tuple({2, 3}).tuple({3, 1}).op(0x89).global("collections", "OrderedDict").op(')').op('R');
  p.global("torch", "bfloat16").op('t').op('R');
  p.short_str("bytes").op('C').op(3).le(0x616263, 3).op(0x94).op('u');  // SHORT_BINBYTES
  const auto loaded = scedit::load_torch_file(write("p4.pt", p, records));
  ASSERT_EQ(loaded.size(), 2u);  // the bytes are skipped
  EXPECT_TRUE(torch::equal(loaded.at("param"), torch::arange(4, 8, torch::kFloat32)));
  EXPECT_TRUE(torch::equal(loaded.at("bf16"), bf16));
}

// A Lightning checkpoint (what `Trainer.save_checkpoint` writes): the weights under
// `state_dict`, beside counters, a callback state keyed by the callback's class, a callback
// object pickled whole (as Python's pickler writes any plain object: NEWOBJ, then BUILD with its
// `__dict__`), hyper-parameters as an argparse.Namespace (the same way) and a numpy scalar
// (`scalar(dtype('f8'), bytes)`).
TEST_F(TorchFile, ReadsTheStateDictOfALightningCheckpoint) {
  const scedit::TensorMap weights = {{"model.diffusion_model.out.2.weight", torch::randn({4, 3})},
                                     {"model.diffusion_model.out.2.bias", torch::randn({4})}};
  Pickle p;
  Records records;
  p.proto(2).op('}').op('(');
  p.str("epoch").integer(6).str("global_step").integer(470000).str("pytorch-lightning_version").str("1.4.2");
  p.str("callbacks").op('}').global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint");
  p.op('}').op('(').str("monitor").op('N').str("best_model_score");
  p.tensor("FloatStorage", "score", 1, 0, {}, {});
  records["score"] = scedit_test::tensor_bytes(torch::tensor(0.25f));
  p.str("best_model_path").str("/ckpt/last.ckpt").op('u').op('s');
  p.str("checkpoint_callback").global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint").op(')');
  p.op(0x81).op('}').str("monitor").op('N').op('s').str("save_top_k").integer(1).op('s').op('b');  // NEWOBJ, BUILD
  p.str("hparams").global("argparse", "Namespace").op(')').op(0x81).op('}').str("lr").op('G').le(0, 8).op('s').op('b');
  p.str("loss").global("numpy.core.multiarray", "scalar").global("numpy", "dtype").str("f8").op(0x89).op(0x88).op(0x87);
  p.op('R').op('(').integer(3).str("<").op('N').op('N').op('N').integer(-1).integer(-1).integer(0).op('t').op('b');
  p.global("_codecs", "encode").str("\x9a\x99\x99\x99\x99\x99\xb9?").str("latin1").op(0x86).op('R').op(0x86).op('R');
  p.str("optimizer_states").op(']').str("lr_schedulers").op(']');
  scedit_test::state_dict(p.str("state_dict"), weights, records);
  p.op('u');
  const std::string path = write("lightning.ckpt", p, records);
  const auto loaded = scedit::load_torch_file(path);
  ASSERT_EQ(loaded.size(), weights.size());  // only state_dict: not the callback's score
  for (const auto& [key, t] : weights) EXPECT_TRUE(torch::equal(loaded.at(key), t)) << key;
  EXPECT_TRUE(torch::equal(scedit::load_tensor_file(path).at("model.diffusion_model.out.2.bias"),
                           weights.at("model.diffusion_model.out.2.bias")));
}

// Without a state_dict entry, nested dicts are joined with '.'; integer keys are written out.
TEST_F(TorchFile, FlattensNestedDicts) {
  Pickle p;
  p.proto(2).op('}').op('(').str("unet").op('}').str("conv").op('}').str("weight");
  p.tensor("FloatStorage", "0", 12, 0, {12}, {1}).op('s').op('s').str("step").integer(7);
  p.str("ema").op('}').integer(3).tensor("FloatStorage", "0", 12, 1, {2}, {1}).op('s').op('u');
  const auto loaded = scedit::load_torch_file(write("nested.pt", p, twelve_floats()));
  ASSERT_EQ(loaded.size(), 2u);
  EXPECT_TRUE(torch::equal(loaded.at("unet.conv.weight"), torch::arange(12, torch::kFloat32)));
  EXPECT_TRUE(torch::equal(loaded.at("ema.3"), torch::arange(1, 3, torch::kFloat32)));
}

// ---- hostile and broken files --------------------------------------------------------------

TEST_F(TorchFile, RefusesGlobalsOutsideTheAllowListByName) {
  for (const auto& [module, name] : std::vector<std::pair<std::string, std::string>>{
           {"os", "system"}, {"posix", "system"}, {"builtins", "eval"}, {"torch", "load"},
           {"subprocess", "Popen"}, {"torch.nn.modules.linear", "Linear"}}) {
    Pickle p;
    p.proto(2).op('}').str("x").global(module, name).str("echo pwned").op(0x85).op('R').op('s');
    const std::string path = write(name + ".pt", p);
    EXPECT_THAT(error_of([&] { scedit::load_torch_file(path); }),
                AllOf(HasSubstr(path), HasSubstr("'" + module + "." + name + "'"),
                      HasSubstr("refused without running it")));
  }
  // The same through STACK_GLOBAL (protocol 4).
  Pickle p;
  p.proto(4).op('}').str("x").str("builtins").str("eval").op(0x93).str("1").op(0x85).op('R').op('s');
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(write("stack.pt", p)); }), HasSubstr("'builtins.eval'"));
}

TEST_F(TorchFile, RefusesTruncatedZips) {
  c10::Dict<std::string, torch::Tensor> saved;
  saved.insert("w", torch::randn({64}));
  const auto bytes = torch::pickle_save(saved);
  for (const size_t size : {size_t{8}, bytes.size() / 2, bytes.size() - 22, bytes.size() - 1}) {
    const std::string path = dir_.file("cut" + std::to_string(size) + ".pt");
    scedit_test::write_file(path, std::string(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(size)));
    EXPECT_THAT(error_of([&] { scedit::load_torch_file(path); }), AllOf(HasSubstr(path), HasSubstr("zip")));
  }
}

TEST_F(TorchFile, RefusesStoragesOfTheWrongSizeAndTensorsBeyondThem) {
  Pickle small;
  small.proto(2).op('}').str("w").tensor("FloatStorage", "0", 12, 0, {12}, {1}).op('s');
  const std::string path = write("short.pt", small, {{"0", std::string(40, '\0')}});
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(path); }),
              AllOf(HasSubstr(path), HasSubstr("'data/0'"), HasSubstr("40 bytes"), HasSubstr("48 bytes")));

  const std::vector<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>>> beyond = {
      {0, {4, 4}, {4, 1}},                  // 16 elements of 12
      {11, {2}, {1}},                       // ends one past
      {13, {0}, {1}},                       // an offset past the end, even for no elements
      {0, {3, 2}, {int64_t{1} << 62, 1}},   // a stride that would overflow
      {0, {2}, {-1}},                       // a negative stride
      {-200, {1}, {1}}};                    // a negative offset
  for (const auto& [offset, size, stride] : beyond) {
    Pickle p;
    p.proto(2).op('}').str("w").tensor("FloatStorage", "0", 12, offset, size, stride).op('s');
    const std::string file = write("beyond.pt", p, twelve_floats());
    EXPECT_THAT(error_of([&] { scedit::load_torch_file(file); }),
                AllOf(HasSubstr(file), HasSubstr(stride[0] < 0 ? "negative" : offset < 0 ? "offset -200" : "storage")))
        << "offset " << offset;
  }
  Pickle huge;  // a size beyond 32 bits (LONG1) that the record does not hold
  huge.proto(2).op('}').str("w").tensor("FloatStorage", "0", int64_t{1} << 36, 0, {12}, {1}).op('s');
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(write("huge.pt", huge, twelve_floats())); }),
              AllOf(HasSubstr("68719476736 × Float"), HasSubstr("48 bytes")));
  Pickle missing;
  missing.proto(2).op('}').str("w").tensor("FloatStorage", "7", 12, 0, {12}, {1}).op('s');
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(write("missing.pt", missing, twelve_floats())); }),
              HasSubstr("no record 'data/7'"));
}

TEST_F(TorchFile, RefusesMalformedPickles) {
  const auto error = [&](const std::string& name, const Pickle& p) {
    return error_of([&] { scedit::load_torch_file(write(name, p, twelve_floats())); });
  };
  Pickle unknown;
  unknown.proto(2).op('}').op(0xff);
  EXPECT_THAT(error("unknown.pt", unknown), AllOf(HasSubstr("unknown"), HasSubstr("0xff"), HasSubstr("offset 3")));
  Pickle text_int;  // protocol 0's INT opcode: not something torch.save writes
  text_int.proto(2).op('I').bytes += "1\n";
  EXPECT_THAT(error("text.pt", text_int), AllOf(HasSubstr("0x49"), HasSubstr("offset 2")));
  Pickle memo;
  memo.proto(2).op('}').get(5);
  EXPECT_THAT(error("memo.pt", memo), AllOf(HasSubstr("memo entry 5"), HasSubstr("never stored")));
  Pickle underflow;
  underflow.proto(2).op('}').str("x").op('s');
  EXPECT_THAT(error("underflow.pt", underflow), HasSubstr("stack underflow"));
  Pickle below_mark;  // SETITEM may not take items from below a MARK
  below_mark.proto(2).op('}').str("x").op('(').str("y").op('s');
  EXPECT_THAT(error("below_mark.pt", below_mark), HasSubstr("stack underflow"));
  Pickle no_mark;
  no_mark.proto(2).op('}').str("x").str("y").op('u');
  EXPECT_THAT(error("no_mark.pt", no_mark), HasSubstr("no MARK"));
  Pickle long_string;
  long_string.proto(2).op('X').le(1000, 4);
  long_string.bytes += "abc";
  EXPECT_THAT(error("long.pt", long_string), HasSubstr("past the pickle's end"));
  Pickle no_stop;
  no_stop.proto(2).op('}');
  const std::string path = dir_.file("no_stop.pt");
  scedit_test::write_torch_zip(path, no_stop.bytes, {});
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(path); }), HasSubstr("without STOP"));
  Pickle list;
  list.proto(2).op(']');
  EXPECT_THAT(error("list.pt", list), HasSubstr("holds a pickled list, not a dict"));
  Pickle call_storage;  // a storage type or a dtype is never called
  call_storage.proto(2).op('}').str("x").global("torch", "FloatStorage").op(')').op('R').op('s');
  EXPECT_THAT(error("call.pt", call_storage), HasSubstr("'torch.FloatStorage' cannot be called"));
}

TEST_F(TorchFile, RefusesDeepNestingAndSurvivesCycles) {
  Pickle marks;  // 100,000 open MARKs
  marks.proto(2).op('}');
  marks.bytes += std::string(100000, '(');
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(write("marks.pt", marks)); }), HasSubstr("MARKs open"));

  Pickle lists;  // [[[[...]]]] 100,000 deep, built inside out
  lists.proto(2).op('}').str("x");
  lists.bytes += std::string(100000, ']');
  lists.bytes += std::string(99999, 'a');
  lists.op('s');
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(write("lists.pt", lists)); }), HasSubstr("nested deeper"));

  // A chain of 200,000 lists, each inside the one made after it: all made (and memoised) first,
  // then each appended into the next while still empty, so no nesting is seen as it is built;
  // and a list inside itself. Read (lists are skipped) and freed without recursion: freed the
  // ordinary way, the outermost list would free the next one inside it, and so on, 200,000 calls
  // deep.
  constexpr uint32_t kChain = 200000;
  Pickle chain;
  chain.proto(2).op('}').str("chain");
  for (uint32_t i = 1; i <= kChain; ++i) chain.op(']').op('r').le(i, 4).op('0');  // LONG_BINPUT i, POP
  for (uint32_t i = kChain - 1; i >= 1; --i) {  // L[i + 1].append(L[i])
    chain.op('j').le(i + 1, 4).op('j').le(i, 4).op('a').op('0');
  }
  chain.op('j').le(kChain, 4).op('s');
  for (uint32_t i = 1; i <= kChain; ++i) chain.op('N').op('r').le(i, 4).op('0');  // memo forgets them
  chain.str("self").op(']').op('r').le(kChain + 1, 4).op('j').le(kChain + 1, 4).op('a').op('s');
  chain.str("w").tensor("FloatStorage", "0", 12, 0, {12}, {1}).op('s');
  const auto loaded = scedit::load_torch_file(write("chain.pt", chain, twelve_floats()));
  EXPECT_EQ(loaded.size(), 1u);

  Pickle cycle;  // a dict inside itself: flattening it would never end
  cycle.proto(2).op('}').put(0).str("self").get(0).op('s');
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(write("cycle.pt", cycle)); }), HasSubstr("nested deeper"));
}

TEST_F(TorchFile, RefusesBigEndianFilesAndOtherFormats) {
  Pickle p;
  p.proto(2).op('}').str("w").tensor("FloatStorage", "0", 12, 0, {12}, {1}).op('s');
  const std::string big = write("big.pt", p, twelve_floats(), {{"byteorder", "big"}});
  EXPECT_THAT(error_of([&] { scedit::load_torch_file(big); }), AllOf(HasSubstr(big), HasSubstr("big-endian")));
  const std::string little = write("little.pt", p, twelve_floats(), {{"byteorder", "little"}});
  EXPECT_EQ(scedit::load_torch_file(little).size(), 1u);

  const std::string legacy = dir_.file("legacy.pt");  // torch.save's pre-1.6 format: a bare pickle
  scedit_test::write_file(legacy, p.bytes);
  EXPECT_THAT(error_of([&] { scedit::load_tensor_file(legacy); }), AllOf(HasSubstr(legacy), HasSubstr("not supported")));
}

}  // namespace
