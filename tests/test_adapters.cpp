// The reference UNet cases with adapters: SC-Tuners, CSC-Tuners (one and two conditions with an
// SC-Tuner, each condition given through a ConditionScope), LoRA, and a ControlNet's residuals,
// each attached to the tiny UNet through the library's public API only; the UNet's halves and its
// clone with CSC-Tuners attached. Configurations, scales and LoRA settings are read from the
// manifests.

#include <scedit/compat.hpp>
#include <scedit/csctuner.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>
#include <sd/unet.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <fstream>

#include "sd_fixtures.hpp"
#include "test_util.hpp"

namespace {

using scedit_test::fixture_path;
using scedit_test::manifest;

const scedit::TensorMap& cases() { return scedit_test::fixture("unet_cases.safetensors"); }

using scedit_test::rel_err;

/// The float64 bound: 5e-9, not 1e-9, because the reference computes the sinusoidal time
/// embedding in float32 with its own exp/sin/cos; test_unet.cpp (UNetMatchesReferenceFloat64) shows the
/// whole difference comes from that one float32 step.
double tolerance(torch::Dtype dtype) { return dtype == torch::kFloat32 ? 1e-4 : 5e-9; }

/// A dtype and a device to run the cases in.
struct Setting {
  torch::Dtype dtype;
  bool cuda;
};

/// How GoogleTest prints a setting (in test names and failures).
void PrintTo(const Setting& setting, std::ostream* os) {
  *os << (setting.dtype == torch::kFloat32 ? "float32" : "float64") << (setting.cuda ? " on CUDA" : " on CPU");
}

class Adapters : public ::testing::TestWithParam<Setting> {
 protected:
  void SetUp() override {
    if (GetParam().cuda && !torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    if (GetParam().cuda) {
      // Parity needs true float32 matmuls and convolutions (TF32 alone gives ~4e-4).
      at::globalContext().setAllowTF32CuBLAS(false);
      at::globalContext().setAllowTF32CuDNN(false);
    }
    torch::manual_seed(0);
    dtype_ = GetParam().dtype;
    device_ = GetParam().cuda ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
    unet_ = sd::UNet(sd::UNetConfig::from_json(manifest().at("configs").at("unet_tiny")));
    scedit::LoadOptions options;
    options.source = fixture_path("unet_tiny.safetensors");
    scedit::load_state_dict(*unet_, scedit::safetensors::load(options.source), options);
    unet_->to(device_, dtype_);
    unet_->eval();
  }

  torch::Tensor input(const std::string& key) { return cases().at("input." + key).to(device_, dtype_); }

  /// The UNet on the case's inputs, each attached CSC-Tuner given its condition for the call.
  torch::Tensor run() { return run(*unet_); }
  torch::Tensor run(sd::UNet2DConditionModelImpl& unet) {
    torch::NoGradGuard no_grad;
    scedit::ConditionScope conditions;
    for (const auto& item : scedit::csc_tuners(unet)) {
      conditions.set(item.value(), input(item.key() == "csc_a" ? "hint_a" : "hint_b"));
    }
    return unet.forward(input("sample"), cases().at("input.timestep").to(device_),
                        input("encoder_hidden_states")).cpu();
  }

  scedit::CSCTuner attach_csc(const std::string& name) {
    auto flags = manifest().at("tiny_input_down_flag").get<std::vector<bool>>();
    auto csc = scedit::read_csc_tuner(fixture_path("adapters_tiny.safetensors"), name + ".", flags);
    csc->options.scale(manifest().at("csc_scales").at(name).get<double>());
    csc->to(device_, dtype_);
    scedit::attach_csc_tuner(*unet_, csc, name);
    return csc;
  }

  std::vector<scedit::SCTuner> attach_sc() {
    auto tuners = scedit::attach_sc_tuners(*unet_);
    scedit::load_sc_tuners(fixture_path("adapters_tiny.safetensors"), tuners, "sc.");
    for (auto& t : tuners) t->to(device_, dtype_);
    return tuners;
  }

  torch::Dtype dtype_ = torch::kFloat32;
  torch::Device device_ = torch::kCPU;
  sd::UNet unet_{nullptr};
};

}  // namespace

TEST_P(Adapters, BaseMatchesTheReference) {
  EXPECT_LT(rel_err(run(), cases().at("output.base")), tolerance(dtype_));
}

TEST_P(Adapters, SCTunersMatchTheReference) {
  attach_sc();
  EXPECT_LT(rel_err(run(), cases().at("output.sc")), tolerance(dtype_));
  scedit::set_tuner_scale(*unet_, "sc", 0.6);
  EXPECT_LT(rel_err(run(), cases().at("output.sc_scale_0.6")), tolerance(dtype_));
  scedit::set_tuner_scale(*unet_, "sc", 0.0);
  EXPECT_LT(rel_err(run(), cases().at("output.base")), tolerance(dtype_));
}

TEST_P(Adapters, CSCTunerMatchesTheReference) {
  attach_csc("csc_a");
  EXPECT_LT(rel_err(run(), cases().at("output.csc_a")), tolerance(dtype_));
}

// At latent sizes that do not halve evenly (odd_size/'s cases) each hint feature still lines up
// with its skip: the hint encoder's stride-2 convs round odd sides up as the UNet's downsamplers
// do, so a condition at the case's own image-to-latent ratio edits every skip.
TEST_P(Adapters, CSCTunerEditsAtLatentSizesThatDoNotHalveEvenly) {
  const auto names = scedit_test::odd_size_case_names();
  ASSERT_FALSE(names.empty());
  const int64_t ratio = input("hint_a").size(2) / input("sample").size(2);  // image px per latent cell
  for (const auto& name : names) {
    auto odd = [&](const std::string& key) { return scedit_test::odd_size_case(name + key).to(device_, dtype_); };
    const auto sample = odd(".input.sample"), context = odd(".input.encoder_hidden_states");
    const auto t = scedit_test::odd_size_case(name + ".input.timestep").to(device_);
    torch::NoGradGuard no_grad;
    const auto base = unet_->forward(sample, t, context);
    auto csc = attach_csc("csc_a");
    const auto condition = torch::rand({sample.size(0), csc->options.in_channels(), ratio * sample.size(2),
                                        ratio * sample.size(3)}, torch::TensorOptions(dtype_).device(device_));
    const auto hints = csc->hint_features(condition);  // decoder order
    const auto skips = unet_->encode(sample, t, context).skips;  // encoder order
    ASSERT_EQ(hints.size(), skips.size()) << name;
    for (size_t k = 0; k < hints.size(); ++k) {
      EXPECT_EQ(hints[k].sizes(), skips[skips.size() - 1 - k].sizes()) << name << ", decoder skip " << k;
    }
    scedit::ConditionScope conditions;
    conditions.set(csc, condition);
    const auto edited = unet_->forward(sample, t, context);
    EXPECT_EQ(edited.sizes(), sample.sizes()) << name;
    EXPECT_TRUE(torch::isfinite(edited).all().item<bool>()) << name;
    EXPECT_GT((edited - base).abs().max().item<double>(), 0.0) << name << ": the CSC-Tuner edited nothing";
    scedit::detach_csc_tuner(*unet_, "csc_a");
  }
}

TEST_P(Adapters, TwoConditionsAndAnSCTunerMatchTheReference) {
  attach_csc("csc_a");
  attach_csc("csc_b");
  attach_sc();
  scedit::set_control_scale(*unet_, manifest().at("csc_scales").at("control_scale").get<double>());
  EXPECT_LT(rel_err(run(), cases().at("output.csc_ab_sc_cs0.8")), tolerance(dtype_));
}

TEST_P(Adapters, UNetHalvesAreTheForwardPass) {
  attach_csc("csc_a");
  attach_sc();
  torch::NoGradGuard no_grad;
  scedit::ConditionScope conditions;
  conditions.set(scedit::csc_tuners(*unet_)["csc_a"], input("hint_a"));
  const auto t = cases().at("input.timestep").to(device_);
  auto features = unet_->encode(input("sample"), t, input("encoder_hidden_states"));
  EXPECT_EQ(features.skips.size(), unet_->skip_channels().size());
  for (size_t i = 0; i < features.skips.size(); ++i) {
    EXPECT_EQ(features.skips[i].size(1), unet_->skip_channels()[i]) << "skip " << i;
  }
  const auto halves = unet_->decode(std::move(features));
  EXPECT_TRUE(torch::equal(halves, unet_->forward(input("sample"), t, input("encoder_hidden_states"))));
}

TEST_P(Adapters, CloneWithCSCTunersIsDeepAndEditsWithItsOwnTuners) {
  attach_csc("csc_a");
  attach_csc("csc_b");
  attach_sc();
  scedit::set_control_scale(*unet_, manifest().at("csc_scales").at("control_scale").get<double>());
  auto copy = std::dynamic_pointer_cast<sd::UNet2DConditionModelImpl>(unet_->clone());
  ASSERT_TRUE(copy);
  const auto expected = cases().at("output.csc_ab_sc_cs0.8");
  EXPECT_LT(rel_err(run(*copy), expected), tolerance(dtype_));
  const auto original = scedit::csc_tuners(*unet_), cloned = scedit::csc_tuners(*copy);
  ASSERT_EQ(cloned.size(), 2u);
  for (const auto& name : {"csc_a", "csc_b"}) EXPECT_NE(cloned[name].ptr(), original[name].ptr());
  // The copy's sites edit with the copy's tuners: changing them changes the copy only.
  {
    torch::NoGradGuard no_grad;
    for (auto& p : cloned["csc_a"]->parameters()) p.mul_(0.5);
  }
  EXPECT_GT(rel_err(run(*copy), expected), 10 * tolerance(dtype_));
  EXPECT_LT(rel_err(run(), expected), tolerance(dtype_));
}

TEST_P(Adapters, LoRAMatchesTheReference) {
  const auto& lora = manifest().at("lora");
  scedit::LoRAInjection injection;
  auto result = scedit::load_lora_peft(fixture_path("adapters_tiny.safetensors"), injection, *unet_,
                                       scedit::LoRALoadOptions().prefix("lora").alpha(lora.at("alpha").get<double>()));
  // Every injected layer is one of the manifest's targets, with the manifest's rank.
  const auto targets = lora.at("targets").get<std::vector<std::string>>();
  ASSERT_FALSE(result.paths.empty());
  for (const auto& path : result.paths) {
    bool targeted = false;
    for (const auto& t : targets) targeted = targeted || (path.size() > t.size() && path.compare(path.size() - t.size(), t.size(), t) == 0);
    EXPECT_TRUE(targeted) << path;
    EXPECT_EQ(injection.at(path).adapter("default").options.r(), lora.at("r").get<int64_t>()) << path;
  }
  for (auto& p : scedit::lora_parameters(*unet_)) p.set_data(p.data().to(device_, dtype_));
  injection.refresh();
  EXPECT_LT(rel_err(run(), cases().at("output.lora_r4_a8")), tolerance(dtype_));
  // Merged into the weights, the same output; unmerged again, too.
  injection.merge("default");
  EXPECT_LT(rel_err(run(), cases().at("output.lora_r4_a8")), tolerance(dtype_));
  injection.unmerge("default");
  injection.set_adapter_weight("default", 0.0);
  EXPECT_LT(rel_err(run(), cases().at("output.base")), tolerance(dtype_));
}

/// The UNet driven by a ControlNet's residuals (diffusers' down_block_additional_residuals and
/// mid_block_additional_residual), on controlnet/'s cases. Those were computed by an older torch
/// whose float32 timestep features differ from the UNet fixtures' by an ulp here and there
/// (tests/data/fixtures/controlnet/README.md): float64 agrees to ~2e-8, not 5e-9.
TEST_P(Adapters, ControlNetResidualsMatchTheReference) {
  const auto& controlnet = scedit_test::fixture("controlnet/controlnet_cases.safetensors");
  const double tolerance = dtype_ == torch::kFloat32 ? 1e-4 : 1e-7;
  auto at = [&](const std::string& key) { return controlnet.at(key).to(device_, dtype_); };
  auto run_with = [&](const std::string& output) {
    sd::UNetResiduals residuals;
    for (size_t i = 0; controlnet.count(output + ".down." + std::to_string(i)); ++i) {
      residuals.down.push_back(at(output + ".down." + std::to_string(i)));
    }
    residuals.mid = at(output + ".mid");
    torch::NoGradGuard no_grad;
    return unet_->forward(at("input.sample"), controlnet.at("input.timestep").to(device_),
                          at("input.encoder_hidden_states"), residuals).cpu();
  };
  EXPECT_LT(rel_err(run_with("output"), controlnet.at("output.unet_with_controlnet")), tolerance);
  EXPECT_LT(rel_err(run_with("output_scale0.5"), controlnet.at("output.unet_with_controlnet_scale0.5")),
            tolerance);
  torch::NoGradGuard no_grad;
  EXPECT_LT(rel_err(unet_->forward(at("input.sample"), controlnet.at("input.timestep").to(device_),
                                   at("input.encoder_hidden_states")).cpu(),
                    controlnet.at("output.unet_base")),
            tolerance);
  // A residual of the wrong count or shape is refused, naming it.
  sd::UNetResiduals wrong;
  wrong.down.push_back(at("output.down.0"));
  EXPECT_NE(scedit_test::error_of([&] {
              unet_->forward(at("input.sample"), controlnet.at("input.timestep").to(device_),
                             at("input.encoder_hidden_states"), wrong);
            }).find("1 skip residuals for"),
            std::string::npos);
  wrong.down.clear();
  wrong.mid = at("output.down.0");
  EXPECT_NE(scedit_test::error_of([&] {
              unet_->forward(at("input.sample"), controlnet.at("input.timestep").to(device_),
                             at("input.encoder_hidden_states"), wrong);
            }).find("the middle residual has shape"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Parity, Adapters,
                         ::testing::Values(Setting{torch::kFloat32, false}, Setting{torch::kFloat64, false},
                                           Setting{torch::kFloat32, true}, Setting{torch::kFloat64, true}),
                         [](const ::testing::TestParamInfo<Setting>& info) {
                           return std::string(info.param.dtype == torch::kFloat32 ? "Float32" : "Float64") +
                                  (info.param.cuda ? "_CUDA" : "");
                         });

// fp16 needs CUDA (LibTorch's CPU kernels lack half convolutions); bf16 on the CPU is covered in
// test_unet.cpp. Half-precision weights under autocast stay finite and close to float32.
TEST(HalfPrecision, UNetWithTunersStaysCloseToFloat32_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (auto dtype : {torch::kFloat16, torch::kBFloat16}) {
    sd::UNet unet(sd::UNetConfig::from_json(manifest().at("configs").at("unet_tiny")));
    scedit::LoadOptions options;
    options.source = fixture_path("unet_tiny.safetensors");
    scedit::load_state_dict(*unet, scedit::safetensors::load(options.source), options);
    auto tuners = scedit::attach_sc_tuners(*unet);
    scedit::load_sc_tuners(fixture_path("adapters_tiny.safetensors"), tuners, "sc.");
    unet->to(torch::kCUDA, dtype);
    for (auto& p : scedit::tuner_parameters(*unet)) p.set_data(p.data().to(torch::kFloat32));
    torch::NoGradGuard no_grad;
    scedit::compat::AutocastGuard autocast(torch::kCUDA, dtype);
    auto out = unet->forward(cases().at("input.sample").to(torch::kCUDA, dtype),
                             cases().at("input.timestep").to(torch::kCUDA),
                             cases().at("input.encoder_hidden_states").to(torch::kCUDA, dtype)).cpu();
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
    EXPECT_LT(rel_err(out, cases().at("output.sc")), 5e-2) << c10::toString(dtype);
  }
}
