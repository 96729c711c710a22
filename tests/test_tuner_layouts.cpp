// SCEdit weights in scepter's and SWIFT's layouts (tuner_layouts.hpp, tuner_io.hpp): which layout
// a file is in, reading each layout (files and folders, with gaps in the site indices) to the
// reference fixtures' outputs, writing each layout and reading it back, and attaching a file with
// gaps to the tiny pipeline.
//
// The scepter and SWIFT files here are the fixture's tuners with their keys renamed the way those
// tools name them (docs/FILE_FORMATS.md gives the source of each name):
//  - scepter SC-Tuners: `model.lsc_identity.{i}.tuner_op.*` (LatentDiffusionSCETuning's state dict
//    filtered to lsc_identity), `configuration.json` with SC_TUNER_CFG / USE_LAYERS beside them;
//  - scepter CSC-Tuner: `0.` + the tuner's keys (its control_blocks ModuleList), `model.0.` and
//    `model.` as scepter's own loader accepts them; `configuration.json` with CONTROL_MODEL;
//  - SWIFT SCETuning: `model.lsc_identity.{i}.scetuner_{adapter}.tuner_op.*` in
//    `{adapter}/adapter_model.safetensors` with `{adapter}/adapter_config.json`.
// The containers are safetensors: `scedit::load_tensor_file` did not read torch.save zips when
// these were written, so the `.bin` files written here are read back through LibTorch's own
// pickle reader, and through the library's readers only where `load_tensor_file` reads them.

#include <scedit/csctuner.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/tensor_file.hpp>
#include <scedit/tuner_io.hpp>
#include <scedit/tuner_layouts.hpp>
#include <sd/tiny.hpp>
#include <sd/tuner_files.hpp>
#include <sd/unet.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace {

using scedit_test::error_of;
using scedit_test::fixture_path;
using scedit_test::manifest;
using scedit_test::rel_err;
using ::testing::HasSubstr;

namespace fs = std::filesystem;

const scedit::TensorMap& cases() { return scedit_test::fixture("unet_cases.safetensors"); }
const scedit::TensorMap& adapters() { return scedit_test::fixture("adapters_tiny.safetensors"); }

/// The fixture's tensors under `prefix` ("sc.", "csc_a."), renamed by `rename` (given the key
/// without the prefix); `keep` selects them.
scedit::TensorMap renamed(const std::string& prefix, const std::function<std::string(const std::string&)>& rename,
                          const std::function<bool(const std::string&)>& keep = {}) {
  scedit::TensorMap out;
  for (const auto& [key, value] : adapters()) {
    if (key.rfind(prefix, 0) != 0) continue;
    const auto rest = key.substr(prefix.size());
    if (!keep || keep(rest)) out[rename(rest)] = value;
  }
  return out;
}

/// The site `i` of an `lsc_identity.{i}.*` key.
int64_t site_of(const std::string& key) { return std::stoll(key.substr(13, key.find('.', 13) - 13)); }

/// `lsc_identity.{i}.tuner_op.x` → `lsc_identity.{i}.scetuner_{adapter}.tuner_op.x`.
std::string swift_name(const std::string& key, const std::string& adapter) {
  const auto dot = key.find('.', 13);
  return key.substr(0, dot + 1) + "scetuner_" + adapter + "." + key.substr(dot + 1);
}

void write_json(const fs::path& path, const nlohmann::json& json) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << json.dump(2);
}

nlohmann::json read_json(const fs::path& path) { return nlohmann::json::parse(std::ifstream(path)); }

class TunerLayouts : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    unet_ = sd::UNet(sd::UNetConfig::from_json(manifest().at("configs").at("unet_tiny")));
    scedit::LoadOptions options;
    options.source = fixture_path("unet_tiny.safetensors");
    scedit::load_state_dict(*unet_, scedit::safetensors::load(options.source), options);
    unet_->to(torch::kFloat64);
    unet_->eval();
  }

  fs::path dir() const { return temp_.path(); }

  torch::Tensor input(const std::string& key) { return cases().at("input." + key).to(torch::kFloat64); }

  /// The UNet on the cases' inputs; an attached CSC-Tuner gets the cases' first condition.
  torch::Tensor run() {
    torch::NoGradGuard no_grad;
    scedit::ConditionScope conditions;
    for (const auto& item : scedit::csc_tuners(*unet_)) conditions.set(item.value(), input("hint_a"));
    return unet_->forward(input("sample"), cases().at("input.timestep"), input("encoder_hidden_states"));
  }

  /// Attaches each tuner read from `path` at its site under "sc"; returns the sites.
  std::vector<int64_t> attach_sc(const std::string& path) {
    auto sites = unet_->skip_sites();
    std::vector<int64_t> used;
    for (auto& [site, tuner] : scedit::read_sc_tuners(path)) {
      tuner->to(torch::kFloat64);
      sites.at(site)->attach("sc", tuner.ptr(), tuner.ptr());
      used.push_back(site);
    }
    return used;
  }

  scedit_test::TempDir temp_{"tuner_layouts"};
  sd::UNet unet_{nullptr};
};

}  // namespace

// ---- which layout ------------------------------------------------------------------------------

TEST(DetectScEditLayout, TellsEachLayoutItsPrefixAndAdapter) {
  struct Case {
    std::string key;
    scedit::TunerKind kind;
    scedit::SceditLayout layout;
    std::string prefix, adapter;
  };
  using K = scedit::TunerKind;
  using L = scedit::SceditLayout;
  const std::vector<Case> table = {
      {"lsc_identity.3.tuner_op.ln1.weight", K::kSC, L::kScedit, "", ""},
      {"model.lsc_identity.11.tuner_op.ln2.bias", K::kSC, L::kScepter, "model.", ""},
      {"model.lsc_identity.0.scetuner_0_SwiftSCETuning.tuner_op.ln1.weight", K::kSC, L::kSwift, "model.",
       "0_SwiftSCETuning"},
      {"lsc_identity.0.scetuner_default.tuner_op.ln1.bias", K::kSC, L::kSwift, "", "default"},
      {"pre_hint_blocks.0.weight", K::kCSC, L::kScedit, "", ""},
      {"0.dense_hint_blocks.4.1.bias", K::kCSC, L::kScepter, "0.", ""},
      {"model.0.lsc_tuner_blocks.2.tuner_op.ln1.weight", K::kCSC, L::kScepter, "model.0.", ""},
      {"model.pre_hint_blocks.12.weight", K::kCSC, L::kScepter, "model.", ""},
      {"lora_unet_up_blocks_0_attentions_0_proj_in.lora_down.weight", K::kUnknown, L::kUnknown, "", ""},
  };
  for (const auto& c : table) {
    const auto seen = scedit::detect_scedit_layout({c.key});
    EXPECT_EQ(seen.kind, c.kind) << c.key;
    EXPECT_EQ(seen.layout, c.layout) << c.key;
    EXPECT_EQ(seen.prefix, c.prefix) << c.key;
    EXPECT_EQ(seen.adapter, c.adapter) << c.key;
    EXPECT_TRUE(seen.unmatched.empty()) << c.key;
  }
  const auto swift = scedit::detect_scedit_layout({"model.lsc_identity.0.scetuner_a.tuner_op.ln1.weight"});
  EXPECT_EQ(swift.name(), "swift layout of SC-Tuners (keys 'model.lsc_identity.{i}.scetuner_a.tuner_op.*')");
  EXPECT_EQ(swift.renamed.at("model.lsc_identity.0.scetuner_a.tuner_op.ln1.weight"),
            "lsc_identity.0.tuner_op.ln1.weight");
  // Keys of another layout, prefix or adapter than the first key's fit no tuner.
  const auto mixed = scedit::detect_scedit_layout({"model.lsc_identity.0.tuner_op.ln1.weight",
                                                   "lsc_identity.1.tuner_op.ln1.weight",
                                                   "model.lsc_identity.2.scetuner_a.tuner_op.ln1.weight",
                                                   "model.lsc_identity.3.tuner_op.ln3.weight"});
  EXPECT_EQ(mixed.layout, scedit::SceditLayout::kScepter);
  EXPECT_EQ(mixed.unmatched.size(), 3u);
}

// ---- reading: parity with the fixtures ---------------------------------------------------------

TEST_F(TunerLayouts, ScepterAndSwiftSCFilesGiveTheReferenceOutput) {
  const auto expected = cases().at("output.sc");
  const auto all_sites = scedit::detail::sc_sites(renamed("sc.", [](const std::string& k) { return k; }));
  // scepter's LatentDiffusionSCETuning.save_pretrained: the `model.` state dict, torch.save'd in
  // a folder with configuration.json (here safetensors, see the top of this file).
  const auto scepter = dir() / "scepter" / "pytorch_model.safetensors";
  fs::create_directories(scepter.parent_path());
  scedit::safetensors::save(scepter.string(), renamed("sc.", [](const std::string& k) { return "model." + k; }));
  write_json(scepter.parent_path() / "configuration.json",
             {{"SC_TUNER_CFG", {{"NAME", "SCTuner"}, {"TUNER_NAME", "SCEAdapter"}, {"DOWN_RATIO", 1.0}}}});
  // SWIFT's SwiftModel.save_pretrained: {adapter}/adapter_model.safetensors + adapter_config.json,
  // beside a text-encoder LoRA adapter (passed over) and the root's `{}` configuration.json.
  const auto swift = dir() / "swift" / "0_SwiftSCETuning" / "adapter_model.safetensors";
  fs::create_directories(swift.parent_path());
  scedit::safetensors::save(swift.string(), renamed("sc.", [](const std::string& k) {
                              return "model." + swift_name(k, "0_SwiftSCETuning");
                            }));
  write_json(swift.parent_path() / "adapter_config.json",
             {{"swift_type", "SCETuning"}, {"target_modules", "model.lsc_identity\\.\\d+$"},
              {"tuner_mode", "identity"}, {"down_ratio", 1.0}});
  write_json(dir() / "swift" / "1_SwiftLoRA" / "adapter_config.json", {{"swift_type", "LORA"}});
  write_json(dir() / "swift" / "configuration.json", nlohmann::json::object());
  // scepter's tuner loader caches the weights without `model.`.
  const auto bare_swift = (dir() / "bare_swift.safetensors").string();
  scedit::safetensors::save(bare_swift, renamed("sc.", [](const std::string& k) { return swift_name(k, "x"); }));

  for (const auto& path : {scepter.string(), scepter.parent_path().string(), swift.string(),
                           (dir() / "swift").string(), bare_swift}) {
    SetUp();
    EXPECT_EQ(attach_sc(path), all_sites) << path;
    EXPECT_LT(rel_err(run(), expected), 5e-9) << path;
  }
  EXPECT_EQ(sd::detect_tuner_path((dir() / "swift").string()), scedit::TunerKind::kSC);
  EXPECT_EQ(sd::detect_tuner_path(scepter.parent_path().string()), scedit::TunerKind::kSC);
}

// scepter's USE_LAYERS (and a SWIFT target_modules naming some sites) leave sites out: the tuner
// at index i edits site i, the others are untouched.
TEST_F(TunerLayouts, GapsLeaveTheirSitesUntouched) {
  const std::set<int64_t> kept = {0, 2, 3, 7};
  auto keep = [&](const std::string& k) { return kept.count(site_of(k)) > 0; };
  // What the reference tuners do at those sites alone.
  {
    auto sites = unet_->skip_sites();
    auto tuners = scedit::attach_sc_tuners(*unet_);
    scedit::load_sc_tuners(fixture_path("adapters_tiny.safetensors"), tuners, "sc.");
    for (size_t i = 0; i < sites.size(); ++i) {
      if (!kept.count(static_cast<int64_t>(i))) sites[i]->detach("sc");
    }
    for (auto& t : tuners) t->to(torch::kFloat64);
  }
  const auto expected = run();
  const auto base = cases().at("output.base");
  EXPECT_GT(rel_err(expected, base), 1e-6);
  EXPECT_GT(rel_err(expected, cases().at("output.sc")), 1e-6);

  const std::vector<std::pair<std::string, std::function<std::string(const std::string&)>>> layouts = {
      {"scepter.safetensors", [](const std::string& k) { return "model." + k; }},
      {"swift.safetensors", [](const std::string& k) { return "model." + swift_name(k, "default"); }},
      {"scedit.safetensors", [](const std::string& k) { return k; }}};
  for (const auto& [name, rename] : layouts) {
    const auto path = (dir() / name).string();
    scedit::safetensors::save(path, renamed("sc.", rename, keep));
    SetUp();
    const auto sites = attach_sc(path);
    EXPECT_EQ(std::set<int64_t>(sites.begin(), sites.end()), kept) << name;
    EXPECT_LT(rel_err(run(), expected), 5e-9) << name;
  }
}

TEST_F(TunerLayouts, ScepterCSCFilesGiveTheReferenceOutput) {
  const auto flags = manifest().at("tiny_input_down_flag").get<std::vector<bool>>();
  const double scale = manifest().at("csc_scales").at("csc_a").get<double>();
  const auto expected = cases().at("output.csc_a");
  // scepter's LatentDiffusionSCEControl.save_pretrained: control_blocks (a ModuleList) → `0.`;
  // its CSCTuners.init_from_ckpt also strips `model.`.
  for (const std::string prefix : {"0.", "model.0.", "model."}) {
    const auto path = (dir() / "csc.safetensors").string();
    scedit::safetensors::save(path, renamed("csc_a.", [&](const std::string& k) { return prefix + k; }));
    EXPECT_EQ(scedit::detect_tuner_file(path), scedit::TunerKind::kCSC);
    SetUp();
    auto csc = scedit::read_csc_tuner(path, "", flags);
    csc->options.scale(scale);
    csc->to(torch::kFloat64);
    scedit::attach_csc_tuner(*unet_, csc, "csc_a");
    EXPECT_LT(rel_err(run(), expected), 5e-9) << prefix;
  }
  // A control release: {folder}/0_SwiftSCETuning/configuration.json (CONTROL_MODEL) + the weights;
  // the down flags and the scale come from the configuration.
  const auto release = dir() / "canny_control" / "0_SwiftSCETuning";
  fs::create_directories(release);
  scedit::safetensors::save((release / "pytorch_model.safetensors").string(),
                            renamed("csc_a.", [](const std::string& k) { return "0." + k; }));
  write_json(release / "configuration.json",
             {{"CONTROL_MODEL", {{"NAME", "CSCTuners"}, {"SCALE", scale}, {"INPUT_DOWN_FLAG", flags},
                                 {"DENSE_HINT_KERNAL", 3}}}});
  SetUp();
  auto csc = scedit::read_csc_tuner((dir() / "canny_control").string());
  EXPECT_EQ(csc->options.scale(), scale);
  csc->to(torch::kFloat64);
  scedit::attach_csc_tuner(*unet_, csc, "csc_a");
  EXPECT_LT(rel_err(run(), expected), 5e-9);
  EXPECT_EQ(sd::detect_tuner_path((dir() / "canny_control").string()), scedit::TunerKind::kCSC);
}

// ---- refusals ----------------------------------------------------------------------------------

TEST_F(TunerLayouts, KeysThatFitNoTunerAreRefusedNamingTheKey) {
  auto tensors = renamed("sc.", [](const std::string& k) { return "model." + k; });
  tensors["model.lsc_identity.0.tuner_op.ln3.weight"] = torch::zeros({2, 2});
  const auto path = (dir() / "extra.safetensors").string();
  scedit::safetensors::save(path, tensors);
  EXPECT_THAT(error_of([&] { scedit::read_sc_tuners(path); }),
              HasSubstr("key 'model.lsc_identity.0.tuner_op.ln3.weight' (shape [2, 2]) fits no tuner"));
  // Two layouts in one file: the keys of the one that is not the first key's are refused.
  tensors.erase("model.lsc_identity.0.tuner_op.ln3.weight");
  tensors["model.lsc_identity.0.scetuner_a.tuner_op.ln1.weight"] = torch::zeros({2, 2});
  scedit::safetensors::save(path, tensors);
  EXPECT_THAT(error_of([&] { scedit::read_sc_tuners(path); }),
              HasSubstr("fits no tuner of the swift layout of SC-Tuners"));
  // A CSC key beside SC keys; a second CSC-Tuner of a ModuleList.
  auto csc = renamed("csc_a.", [](const std::string& k) { return "0." + k; });
  csc["1.pre_hint_blocks.0.weight"] = torch::zeros({2});
  scedit::safetensors::save(path, csc);
  EXPECT_THAT(error_of([&] { scedit::read_csc_tuner(path, "", std::vector<bool>{}); }),
              HasSubstr("key '1.pre_hint_blocks.0.weight'"));
  // An SC reader on a CSC file says what the file holds.
  csc.erase("1.pre_hint_blocks.0.weight");
  scedit::safetensors::save(path, csc);
  EXPECT_THAT(error_of([&] { scedit::read_sc_tuners(path); }), HasSubstr("it holds the scepter layout of a CSC-Tuner"));
}

// scepter's USE_LAYERS on a CSC-Tuner puts identities in the hint cascade (whose channels then no
// longer follow the skips) and cannot run its tuner blocks; such files are refused.
TEST_F(TunerLayouts, CSCFilesWithGapsAreRefused) {
  const auto flags = manifest().at("tiny_input_down_flag").get<std::vector<bool>>();
  const auto path = (dir() / "csc_gap.safetensors").string();
  scedit::safetensors::save(path, renamed("csc_a.", [](const std::string& k) { return "0." + k; },
                                          [](const std::string& k) { return k.rfind("dense_hint_blocks.1.", 0) != 0; }));
  EXPECT_THAT(error_of([&] { scedit::read_csc_tuner(path, "", flags); }),
              HasSubstr("lacks key '0.dense_hint_blocks.1.1.weight'"));
  scedit::safetensors::save(path, renamed("csc_a.", [](const std::string& k) { return "0." + k; },
                                          [](const std::string& k) { return k.rfind("lsc_tuner_blocks.2.", 0) != 0; }));
  EXPECT_THAT(error_of([&] { scedit::read_csc_tuner(path, "", flags); }),
              HasSubstr("lacks key '0.lsc_tuner_blocks.2.tuner_op.ln1.weight'"));
  // Two SCEdit adapters in one SWIFT folder: which one is meant cannot be told.
  for (const char* adapter : {"a", "b"}) {
    const auto sub = dir() / "two" / adapter;
    write_json(sub / "adapter_config.json", {{"swift_type", "SCETuning"}});
    scedit::safetensors::save((sub / "adapter_model.safetensors").string(),
                              renamed("sc.", [&](const std::string& k) { return "model." + swift_name(k, adapter); }));
  }
  EXPECT_THAT(error_of([&] { sd::detect_tuner_path((dir() / "two").string()); }),
              HasSubstr("holds several sets of SCEdit weights"));
}

// ---- writing -----------------------------------------------------------------------------------

TEST_F(TunerLayouts, EveryWrittenSCLayoutReadsBackWithItsSites) {
  auto tuners = scedit::attach_sc_tuners(*unet_, scedit::SCAttachOptions().down_ratio(0.5));
  {
    torch::NoGradGuard no_grad;
    for (auto& t : tuners) {
      for (auto& p : t->parameters()) p.normal_();
    }
  }
  const std::vector<scedit::SCTuner> some = {tuners[1], tuners[4], tuners[5]};
  const std::vector<int64_t> sites = {1, 4, 5};
  using L = scedit::SceditLayout;
  struct Case {
    L layout;
    std::string file, config, first_key;
  };
  const std::vector<Case> table = {
      {L::kScedit, "ours/style.safetensors", "ours/style.json", "lsc_identity.1.tuner_op.ln1.weight"},
      {L::kScepter, "scepter/pytorch_model.safetensors", "scepter/configuration.json",
       "model.lsc_identity.1.tuner_op.ln1.weight"},
      {L::kSwift, "swift/0_SwiftSCETuning/adapter_model.safetensors", "swift/0_SwiftSCETuning/adapter_config.json",
       "model.lsc_identity.1.scetuner_0_SwiftSCETuning.tuner_op.ln1.weight"}};
  for (const auto& c : table) {
    const auto path = (dir() / c.file).string();
    scedit::save_sc_tuners(path, some, scedit::SCTunerSaveOptions().layout(c.layout).sites(sites).adapter_name("0_SwiftSCETuning"));
    EXPECT_TRUE(scedit::safetensors::File(path).contains(c.first_key)) << c.file;
    EXPECT_EQ(scedit::detect_tuner_file(path), scedit::TunerKind::kSC) << c.file;
    const auto config = read_json(dir() / c.config);
    if (c.layout == L::kScepter) {
      EXPECT_EQ(config.at("USE_LAYERS"), nlohmann::json(sites));
      EXPECT_EQ(config.at("SC_TUNER_CFG").at("DOWN_RATIO"), 0.5);
    } else if (c.layout == L::kSwift) {
      EXPECT_EQ(config.at("swift_type"), "SCETuning");
      EXPECT_EQ(config.at("target_modules"), "model.lsc_identity\\.(1|4|5)$");
      EXPECT_EQ(config.at("dims"), nlohmann::json({some[0]->options.channels(), some[1]->options.channels(),
                                                   some[2]->options.channels()}));
      EXPECT_EQ(config.at("tuner_mode"), "identity");
      EXPECT_EQ(config.at("down_ratio"), 0.5);
    }
    // The file, and (scepter, SWIFT) the folders the tools write, read back.
    std::vector<std::string> reads = {path};
    if (c.layout != L::kScedit) reads.push_back(fs::path(path).parent_path().string());
    if (c.layout == L::kSwift) reads.push_back((dir() / "swift").string());
    for (const auto& read_path : reads) {
      const auto loaded = scedit::read_sc_tuners(read_path);
      ASSERT_EQ(loaded.size(), some.size()) << read_path;
      for (size_t n = 0; n < some.size(); ++n) {
        EXPECT_EQ(loaded[n].site, sites[n]) << read_path;
        EXPECT_EQ(loaded[n].tuner->options.down_ratio(), 0.5) << read_path;
        const auto a = scedit::state_dict(*loaded[n].tuner), b = scedit::state_dict(*some[n]);
        for (const auto& [key, value] : b) EXPECT_TRUE(torch::equal(a.at(key), value)) << read_path << " " << key;
      }
    }
  }
  // What scepter's and SWIFT's layouts cannot say is refused.
  scedit::SCTuner thin(scedit::SCTunerOptions(8).down_ratio(0.25));
  EXPECT_THAT(error_of([&] {
                scedit::save_sc_tuners((dir() / "x.safetensors").string(), {tuners[0], thin},
                                       scedit::SCTunerSaveOptions().layout(L::kSwift));
              }),
              HasSubstr("one down_ratio for all tuners"));
  EXPECT_THAT(error_of([&] {
                scedit::save_sc_tuners((dir() / "x.safetensors").string(), some,
                                       scedit::SCTunerSaveOptions().sites({4, 1, 5}));
              }),
              HasSubstr("strictly increasing"));
}

TEST_F(TunerLayouts, EveryWrittenCSCLayoutReadsBack) {
  scedit::CSCTuner csc(scedit::CSCTunerOptions({8, 16}, {false, true}).hint_channels(16).hint_ratio(2).scale(0.7));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : csc->parameters()) p.normal_();
  }
  const auto hint = torch::rand({1, 3, 32, 32});
  const auto expected = csc->hint_features(hint);
  const auto path = (dir() / "canny" / "0_SwiftSCETuning" / "pytorch_model.safetensors").string();
  scedit::save_csc_tuner(path, csc, scedit::SceditLayout::kScepter);
  EXPECT_TRUE(scedit::safetensors::File(path).contains("0.pre_hint_blocks.0.weight"));
  const auto config = read_json(fs::path(path).parent_path() / "configuration.json").at("CONTROL_MODEL");
  EXPECT_EQ(config.at("NAME"), "CSCTuners");
  EXPECT_EQ(config.at("PRE_HINT_OUT_CHANNELS"), 16);
  EXPECT_EQ(config.at("INPUT_DOWN_FLAG"), nlohmann::json({false, true}));
  for (const auto& read_path : {path, (dir() / "canny").string()}) {
    auto loaded = scedit::read_csc_tuner(read_path);  // the flags from configuration.json
    EXPECT_EQ(loaded->options.hint_ratio(), 2) << read_path;
    EXPECT_EQ(loaded->options.scale(), 0.7) << read_path;
    EXPECT_EQ(loaded->options.down_flags(), (std::vector<bool>{false, true})) << read_path;
    const auto features = loaded->hint_features(hint);
    for (size_t k = 0; k < features.size(); ++k) EXPECT_TRUE(torch::equal(features[k], expected[k])) << read_path;
  }
  EXPECT_THAT(error_of([&] { scedit::save_csc_tuner(path, csc, scedit::SceditLayout::kSwift); }),
              HasSubstr("swift has no CSC-Tuner layout"));
  csc->options.edited_skips({true, false});
  EXPECT_THAT(error_of([&] { scedit::save_csc_tuner(path, csc, scedit::SceditLayout::kScepter); }),
              HasSubstr("leaves decoder skip 1 alone"));
}

// `.bin` names write a torch.save zip holding the same dict, as scepter's pytorch_model.bin.
TEST_F(TunerLayouts, BinNamesWriteATorchSaveZip) {
  auto tuners = scedit::attach_sc_tuners(*unet_);
  const auto path = (dir() / "scepter_bin" / "pytorch_model.bin").string();
  scedit::save_sc_tuners(path, tuners, scedit::SCTunerSaveOptions().layout(scedit::SceditLayout::kScepter));
  EXPECT_EQ(scedit::tensor_file_format(path), scedit::TensorFileFormat::torch_zip);
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto dict = torch::jit::pickle_load(bytes).toGenericDict();
  EXPECT_EQ(dict.size(), 4 * tuners.size());
  const auto ln1 = dict.at(std::string("model.lsc_identity.0.tuner_op.ln1.weight")).toTensor();
  EXPECT_TRUE(torch::equal(ln1, tuners[0]->tuner_op->ln1->weight));
}

// scepter's own container: pytorch_model.bin (and SWIFT's adapter_model.bin) read back through
// scedit::load_tensor_file, where it reads torch.save zips (skipped where it does not yet).
TEST_F(TunerLayouts, BinFoldersReadBackWhereTorchSaveFilesAreRead) {
  auto tuners = scedit::attach_sc_tuners(*unet_);
  {
    torch::NoGradGuard no_grad;
    for (auto& t : tuners) {
      for (auto& p : t->parameters()) p.normal_();
    }
  }
  const auto scepter = dir() / "bin_scepter" / "pytorch_model.bin";
  const auto swift = dir() / "bin_swift" / "0_SwiftSCETuning" / "adapter_model.bin";
  scedit::save_sc_tuners(scepter.string(), tuners, scedit::SCTunerSaveOptions().layout(scedit::SceditLayout::kScepter));
  scedit::save_sc_tuners(swift.string(), tuners, scedit::SCTunerSaveOptions()
                                                     .layout(scedit::SceditLayout::kSwift)
                                                     .adapter_name("0_SwiftSCETuning"));
  try {
    scedit::load_tensor_file(scepter.string());
  } catch (const c10::Error& e) {
    GTEST_SKIP() << "load_tensor_file does not read torch.save zips here: " << e.what_without_backtrace();
  }
  for (const auto& path : {scepter.parent_path(), dir() / "bin_swift"}) {
    EXPECT_EQ(sd::detect_tuner_path(path.string()), scedit::TunerKind::kSC) << path;
    const auto loaded = scedit::read_sc_tuners(path.string());
    ASSERT_EQ(loaded.size(), tuners.size()) << path;
    for (size_t n = 0; n < tuners.size(); ++n) {
      EXPECT_EQ(loaded[n].site, static_cast<int64_t>(n));
      EXPECT_TRUE(torch::equal(loaded[n].tuner->tuner_op->ln2->weight, tuners[n]->tuner_op->ln2->weight)) << path;
    }
  }
}

// ---- attaching ---------------------------------------------------------------------------------

TEST(TunerLayoutFiles, AGapFileAttachedToTheTinyUNetEditsExactlyItsSites) {
  scedit_test::TempDir temp("tuner_layouts_attach");
  auto pipe = sd::tiny_pipeline(0);
  auto all = scedit::attach_sc_tuners(*pipe.unet);
  scedit::detach_tuners(*pipe.unet, "sc");
  const std::vector<int64_t> named = {1, 4, 9};
  std::vector<scedit::SCTuner> some;
  {
    torch::NoGradGuard no_grad;
    for (auto site : named) {
      for (auto& p : all[site]->parameters()) p.normal_(0.0, 0.2);
      some.push_back(all[site]);
    }
  }
  const auto folder = temp.path() / "gaps";
  scedit::save_sc_tuners((folder / "pytorch_model.safetensors").string(), some,
                         scedit::SCTunerSaveOptions().layout(scedit::SceditLayout::kScepter).sites(named));
  auto fresh = sd::tiny_pipeline(0);
  sd::AttachedTuners attached;
  const auto tuner = sd::attach_tuner_file(fresh, folder.string(), 1.0, attached);
  EXPECT_EQ(tuner.kind, scedit::TunerKind::kSC);
  EXPECT_EQ(tuner.count, 3);
  auto sites = fresh.unet->skip_sites();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < sites.size(); ++i) {
    const bool is_named = std::find(named.begin(), named.end(), static_cast<int64_t>(i)) != named.end();
    EXPECT_EQ(sites[i]->find(tuner.name) != nullptr, is_named) << "site " << i;
    const auto skip = torch::randn({1, sites[i]->skip_channels(), 4, 4});
    EXPECT_EQ(torch::equal(sites[i]->edit(skip), skip), !is_named) << "site " << i;
  }
  // A site the UNet does not have is refused, naming it.
  scedit::save_sc_tuners((temp.path() / "far.safetensors").string(), {some[0]},
                         scedit::SCTunerSaveOptions().sites({40}));
  auto other = sd::tiny_pipeline(0);
  EXPECT_THAT(error_of([&] { sd::attach_tuner_file(other, (temp.path() / "far.safetensors").string(), 1.0, attached); }),
              HasSubstr("holds an SC-Tuner for skip site 40 but the UNet has " + std::to_string(sites.size()) +
                        " skip sites"));
}
