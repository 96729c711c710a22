// SC-Tuner, CSC-Tuner, skip sites, trainability helpers and tuner files; SC- and CSC-Tuners on
// the tiny SDXL UNet.

#include <scedit/csctuner.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/sites.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tiny.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <tuple>
#include <sstream>

#include "test_util.hpp"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

using scedit_test::error_of;
using scedit_test::rel_err;

/// Gives every parameter of `module` random values (so zero-initialised parts test something).
void randomize(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) p.normal_(0.0, 0.2);
}

/// A tiny encoder-decoder written the LibTorch way, with two skip sites in decoder order.
struct ToyUNetImpl : torch::nn::Module {
  ToyUNetImpl() {
    conv_in = register_module("conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).padding(1)));
    down = register_module("down", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 16, 3).stride(2).padding(1)));
    mid = register_module("mid", torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 16, 3).padding(1)));
    up0 = register_module("up0", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 16, 3).padding(1)));
    up1 = register_module("up1", torch::nn::Conv2d(torch::nn::Conv2dOptions(24, 4, 3).padding(1)));
    lsc_identity = register_module("lsc_identity", torch::nn::ModuleList());
    for (int64_t channels : {16, 8}) {
      scedit::SkipSite site{scedit::SkipSiteOptions(channels)};
      lsc_identity->push_back(site);
      sites.push_back(site);
    }
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto s0 = conv_in(x);                   // [N, 8, H, W]
    auto s1 = torch::silu(down(s0));        // [N, 16, H/2, W/2]
    encoder_skips = {s0, s1};
    auto h = torch::silu(mid(s1));
    h = up0(torch::cat({h, sites[0](s1)}, 1));  // the skip path: pop, edit, concatenate
    h = torch::upsample_nearest2d(h, {x.size(2), x.size(3)});
    return up1(torch::cat({h, sites[1](s0)}, 1));
  }

  std::vector<int64_t> skip_channels() const { return {8, 16}; }  // encoder order
  std::vector<bool> skip_down_flags() const { return {false, true}; }

  torch::nn::Conv2d conv_in{nullptr}, down{nullptr}, mid{nullptr}, up0{nullptr}, up1{nullptr};
  torch::nn::ModuleList lsc_identity{nullptr};
  std::vector<scedit::SkipSite> sites;
  std::vector<torch::Tensor> encoder_skips;
};
TORCH_MODULE(ToyUNet);

class Tuners : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  const fs::path& temp_dir() const { return scratch_.path(); }

 private:
  scedit_test::TempDir scratch_{"tuners"};
};

/// The MLP by hand: ln2(GELU(ln1(x))) over channels of NCHW.
torch::Tensor mlp_by_hand(const torch::Tensor& x, scedit::TunerMLP& mlp) {
  auto h = x.permute({0, 2, 3, 1});
  h = torch::matmul(h, mlp->ln1->weight.t()) + mlp->ln1->bias;
  h = 0.5 * h * (1 + torch::erf(h / std::sqrt(2.0)));
  h = torch::matmul(h, mlp->ln2->weight.t()) + mlp->ln2->bias;
  return h.permute({0, 3, 1, 2});
}

}  // namespace

TEST_F(Tuners, SCTunerMinimalUseCompilesAndIsIdentityAtInit) {
  scedit::SCTuner tuner(scedit::SCTunerOptions(320));
  auto x = torch::randn({2, 320, 4, 4});
  EXPECT_TRUE(torch::equal(tuner(x), x));
  auto tokens = torch::randn({2, 16, 320});  // [N, L, C]
  EXPECT_TRUE(torch::equal(tuner(tokens), tokens));
  EXPECT_EQ(tuner->tuner_op->ln2->weight.abs().sum().item<float>(), 0.0f);
}

TEST_F(Tuners, SCTunerMatchesHandComputation) {
  scedit::SCTuner tuner(scedit::SCTunerOptions(6).down_ratio(0.5));
  randomize(*tuner);
  EXPECT_EQ(tuner->tuner_op->ln1->weight.sizes(), (std::vector<int64_t>{3, 6}));
  auto x = torch::randn({2, 6, 3, 5}, torch::kFloat64);
  tuner->to(torch::kFloat64);
  auto expected = x + mlp_by_hand(x, tuner->tuner_op);
  EXPECT_LT(rel_err(tuner(x), expected), 1e-12);
  // [N, L, C] input runs the MLP over the last dimension.
  auto tokens = x.flatten(2).transpose(1, 2);
  EXPECT_LT(rel_err(tuner(tokens), expected.flatten(2).transpose(1, 2)), 1e-12);
  // Scale s + 0.6·(T(s) − s), and the two-argument form shortcut + MLP(x).
  tuner->set_scale(0.6);
  EXPECT_LT(rel_err(tuner(x), x + 0.6 * mlp_by_hand(x, tuner->tuner_op)), 1e-12);
  tuner->set_scale(1.0);
  auto shortcut = torch::randn_like(x);
  EXPECT_LT(rel_err(tuner(x, shortcut), shortcut + mlp_by_hand(x, tuner->tuner_op)), 1e-12);
}

TEST_F(Tuners, SCTunerCloneIsDeep) {
  scedit::SCTuner tuner(scedit::SCTunerOptions(8).scale(0.5));
  randomize(*tuner);
  auto copy = std::dynamic_pointer_cast<scedit::SCTunerImpl>(tuner->clone());
  ASSERT_TRUE(copy);
  auto x = torch::randn({1, 8, 2, 2});
  EXPECT_TRUE(torch::allclose(copy->forward(x), tuner(x)));
  EXPECT_EQ(copy->options.scale(), 0.5);
  {
    torch::NoGradGuard no_grad;
    copy->tuner_op->ln2->weight.add_(1.0);
  }
  EXPECT_FALSE(torch::allclose(copy->forward(x), tuner(x)));
}

TEST_F(Tuners, PrettyPrintShowsNonDefaultOptions) {
  std::ostringstream sc, mlp, csc, site;
  scedit::SCTuner(scedit::SCTunerOptions(320).down_ratio(0.25).scale(0.6))->pretty_print(sc);
  EXPECT_EQ(sc.str(), "scedit::SCTuner(320, down_ratio=0.25, scale=0.6)");
  scedit::TunerMLP(scedit::TunerMLPOptions(64).bias(false))->pretty_print(mlp);
  EXPECT_EQ(mlp.str(), "scedit::TunerMLP(64, bias=false)");
  scedit::CSCTuner(scedit::CSCTunerOptions({8, 16}, {false, true}).hint_channels(16).kernel_size(1))
      ->pretty_print(csc);
  EXPECT_EQ(csc.str(), "scedit::CSCTuner(skips=2, hint_channels=16, kernel_size=1)");
  ToyUNet model;
  scedit::attach_sc_tuners(*model);
  model->sites[0]->pretty_print(site);
  EXPECT_EQ(site.str(), "scedit::SkipSite(channels=16, tuners=[sc])");
}

TEST_F(Tuners, SitesAreIdentityUntilTunersAttach) {
  ToyUNet model;
  auto x = torch::randn({2, 4, 8, 8});
  auto base = model(x);
  auto tuners = scedit::attach_sc_tuners(*model);
  ASSERT_EQ(tuners.size(), 2u);
  EXPECT_EQ(tuners[0]->options.channels(), 16);  // decoder order: deepest first
  EXPECT_EQ(tuners[1]->options.channels(), 8);
  EXPECT_TRUE(torch::allclose(model(x), base));
  for (auto& t : tuners) randomize(*t);
  EXPECT_FALSE(torch::allclose(model(x), base));
  // Parameters are registered through the sites: reachable, named, counted once.
  auto names = scedit::tuner_parameter_names(*model);
  EXPECT_TRUE(names.count("lsc_identity.0.sc.tuner_op.ln1.weight"));
  EXPECT_EQ(scedit::tuner_parameters(*model).size(), 8u);
  // Disable, rescale to zero, detach: each returns the base output.
  scedit::set_tuner_enabled(*model, "sc", false);
  EXPECT_TRUE(torch::allclose(model(x), base));
  scedit::set_tuner_enabled(*model, "sc", true);
  scedit::set_tuner_scale(*model, "sc", 0.0);
  EXPECT_TRUE(torch::allclose(model(x), base));
  scedit::detach_tuners(*model, "sc");
  EXPECT_TRUE(scedit::tuner_parameters(*model).empty());
  EXPECT_TRUE(torch::allclose(model(x), base));
}

TEST_F(Tuners, SitePatternSelectsSites) {
  ToyUNet model;
  auto tuners = scedit::attach_sc_tuners(*model, scedit::SCAttachOptions().pattern("lsc_identity\\.1"));
  ASSERT_EQ(tuners.size(), 1u);
  EXPECT_EQ(tuners[0]->options.channels(), 8);
  EXPECT_THAT(error_of([&] { scedit::attach_sc_tuners(*model, scedit::SCAttachOptions().pattern("nothing")); }),
              HasSubstr("no skip site matches pattern 'nothing'"));
  EXPECT_THAT(error_of([&] { scedit::attach_sc_tuners(*model, scedit::SCAttachOptions().pattern("lsc_identity\\.1")); }),
              HasSubstr("already has a tuner named 'sc'"));
  EXPECT_THAT(error_of([&] { scedit::find_sites(*model, "lsc_identity\\.("); }),
              HasSubstr("skip-site pattern 'lsc_identity\\.(' is not a valid regex"));
}

TEST_F(Tuners, SiteRefusesWrongChannels) {
  scedit::SkipSite site(scedit::SkipSiteOptions(16));
  EXPECT_THAT(error_of([&] { site(torch::randn({1, 8, 2, 2})); }),
              HasSubstr("expected 16 channels, got a skip of shape [1, 8, 2, 2]"));
}

TEST_F(Tuners, CatSkipSiteEditsTheSkipChannels) {
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(12, 4, 1));
  scedit::CatSkipSite<torch::nn::Conv2dImpl> site(conv, scedit::CatSkipSiteOptions(8));
  scedit::SCTuner tuner(scedit::SCTunerOptions(8));
  randomize(*tuner);
  auto h = torch::randn({2, 4, 3, 3}), skip = torch::randn({2, 8, 3, 3});
  EXPECT_TRUE(torch::allclose(site(torch::cat({h, skip}, 1)), conv(torch::cat({h, skip}, 1))));
  site->attach("sc", tuner.ptr(), tuner.ptr());
  EXPECT_TRUE(torch::allclose(site(torch::cat({h, skip}, 1)), conv(torch::cat({h, tuner(skip)}, 1)), 1e-5, 1e-6));
  // clone copies the wrapped module and the tuner.
  auto copy = std::dynamic_pointer_cast<scedit::CatSkipSiteImpl<torch::nn::Conv2dImpl>>(site->clone());
  ASSERT_TRUE(copy);
  EXPECT_NE(copy->inner.get(), site->inner.get());
  EXPECT_TRUE(torch::allclose(copy->forward(torch::cat({h, skip}, 1)), site(torch::cat({h, skip}, 1))));
}

TEST_F(Tuners, GradientsReachOnlyTunersAndNoGraphUpstream) {
  ToyUNet model;
  scedit::attach_sc_tuners(*model);
  scedit::freeze_except_tuners(*model);
  auto count = scedit::count_parameters(*model);
  EXPECT_EQ(count.trainable, 2 * (16 * 16 + 16) + 2 * (8 * 8 + 8));  // Σ 2C² + 2C
  EXPECT_GT(count.frozen, 0);
  auto out = model(torch::randn({2, 4, 8, 8}));
  for (const auto& skip : model->encoder_skips) {
    EXPECT_FALSE(skip.requires_grad());
    EXPECT_FALSE(skip.grad_fn());  // no autograd graph upstream of the first tuner
  }
  out.square().mean().backward();
  for (const auto& p : model->named_parameters()) {
    const bool tuner = p.key().find(".sc.") != std::string::npos;
    EXPECT_EQ(p.value().grad().defined(), tuner) << p.key();
  }
}

TEST_F(Tuners, CSCTunerIsIdentityAtInitAndNeedsACondition) {
  ToyUNet model;
  auto x = torch::randn({2, 4, 8, 8});
  auto base = model(x);
  scedit::CSCTuner csc(scedit::CSCTunerOptions(model->skip_channels(), model->skip_down_flags()).hint_channels(16));
  scedit::attach_csc_tuner(*model, csc, "canny");
  EXPECT_THAT(error_of([&] { model(x); }), HasSubstr("no condition for this forward pass"));
  {
    scedit::ConditionScope conditions;
    conditions.set(csc, torch::rand({2, 3, 64, 64}));
    EXPECT_TRUE(torch::allclose(model(x), base));
    // The hint serves both halves of a classifier-free-guidance batch.
    auto doubled = torch::cat({x, x});
    EXPECT_TRUE(torch::allclose(model(doubled), torch::cat({base, base}), 1e-5, 1e-6));
  }
  EXPECT_THAT(error_of([&] {
                scedit::ConditionScope conditions;
                conditions.set(csc, torch::rand({2, 3, 32, 32}));
                model(x);
              }),
              HasSubstr("must be 8× the latent size"));
  // Registered once on the model, in its csc_tuners dictionary.
  EXPECT_TRUE(scedit::tuner_parameter_names(*model).count("csc_tuners.canny.pre_hint_blocks.0.weight"));
  ASSERT_EQ(scedit::csc_tuners(*model).size(), 1u);
  EXPECT_EQ(scedit::csc_tuners(*model)["canny"].ptr(), csc.ptr());
  scedit::detach_csc_tuner(*model, "canny");
  EXPECT_TRUE(scedit::tuner_parameters(*model).empty());
  EXPECT_TRUE(scedit::csc_tuners(*model).is_empty());
  EXPECT_TRUE(torch::equal(model(x), base));
}

// A CSC-Tuner that edits some skips trains exactly the parameters those skips' edits use.
TEST_F(Tuners, CSCTunerOfSomeSkipsFreezesWhatTheyDoNotUse) {
  for (const std::vector<bool>& edited : {std::vector<bool>{true, false}, std::vector<bool>{false, true}}) {
    ToyUNet model;
    scedit::CSCTuner csc(scedit::CSCTunerOptions(model->skip_channels(), model->skip_down_flags())
                             .hint_channels(16).edited_skips(edited));
    randomize(*csc);
    scedit::attach_csc_tuner(*model, csc, "csc");
    scedit::freeze_except_tuners(*model);
    {
      scedit::ConditionScope conditions;
      conditions.set(csc, torch::rand({2, 3, 64, 64}));
      model(torch::randn({2, 4, 8, 8})).square().mean().backward();
    }
    const std::string pattern = edited[0] ? "decoder skip 0" : "decoder skip 1";
    int64_t unused = 0;
    for (const auto& p : csc->named_parameters()) unused += !p.value().grad().defined();
    EXPECT_GT(unused, 0) << pattern;
    csc->freeze_unedited();
    for (const auto& p : csc->named_parameters()) {
      EXPECT_EQ(p.value().requires_grad(), p.value().grad().defined()) << pattern << ": " << p.key();
    }
  }
}

// A fresh tuner of the deepest skip alone adds nothing, yet its condition reaches that skip: the
// dense conv of the skip it leaves alone passes the hint on, so the edited conv gets a gradient.
TEST_F(Tuners, CSCTunerOfTheDeepestSkipAloneReceivesItsCondition) {
  ToyUNet model;
  const auto x = torch::randn({2, 4, 8, 8});
  const auto base = model(x);
  scedit::CSCTuner csc(scedit::CSCTunerOptions(model->skip_channels(), model->skip_down_flags())
                           .hint_channels(16).edited_skips({true, false}));  // decoder skip 0: encoder skip 1
  scedit::attach_csc_tuner(*model, csc, "csc");
  scedit::freeze_except_tuners(*model);
  scedit::ConditionScope conditions;
  conditions.set(csc, torch::rand({2, 3, 64, 64}));
  const auto out = model(x);
  EXPECT_TRUE(torch::allclose(out, base));
  out.square().mean().backward();
  const auto& edited = csc->dense_hint_blocks[1]->as<torch::nn::SequentialImpl>()->ptr(1)->as<torch::nn::Conv2dImpl>()->weight;
  ASSERT_TRUE(edited.grad().defined());
  EXPECT_GT(edited.grad().abs().max().item<double>(), 0);
}

// A fresh hint encoder passes its condition on: what differs between two conditions is not lost
// among the biases in seven convolutions (csctuner.hpp, reset_parameters).
TEST_F(Tuners, CSCHintEncoderKeepsTheConditionAtInit) {
  scedit::CSCTuner csc(scedit::CSCTunerOptions({32, 32, 64}, {false, false, true}));
  torch::NoGradGuard no_grad;
  const auto features = csc->pre_hint_blocks->forward(torch::rand({4, 3, 64, 64}));
  const double between = (features - features.mean(0, true)).pow(2).mean().sqrt().item<double>();
  const double size = features.pow(2).mean().sqrt().item<double>();
  EXPECT_GT(between, 0.2 * size) << "the conditions' differences are " << between
                                 << " of features of size " << size;
}

TEST_F(Tuners, ConditionScopeGivesEachTunerItsOwnConditionForItsLifetimeOnly) {
  ToyUNet model;
  auto make = [&] {
    scedit::CSCTuner csc(scedit::CSCTunerOptions(model->skip_channels(), model->skip_down_flags()).hint_channels(16));
    randomize(*csc);
    return csc;
  };
  auto a = make(), b = make();
  scedit::attach_csc_tuner(*model, a, "a");
  scedit::attach_csc_tuner(*model, b, "b");
  auto x = torch::randn({1, 4, 8, 8});
  auto hint_a = torch::rand({1, 3, 64, 64}), hint_b = torch::rand({1, 3, 64, 64});
  auto run = [&](const torch::Tensor& for_a, const torch::Tensor& for_b) {
    scedit::ConditionScope conditions;
    conditions.set(a, for_a).set(b, for_b);
    EXPECT_TRUE(a->has_condition() && b->has_condition());
    return model(x);
  };
  const auto ab = run(hint_a, hint_b);
  EXPECT_FALSE(a->has_condition() || b->has_condition()) << "a condition outlived its scope";
  EXPECT_TRUE(torch::equal(run(hint_a, hint_b), ab));
  EXPECT_FALSE(torch::allclose(run(hint_b, hint_a), ab)) << "the two tuners got the same condition";
  // One condition per tuner and scope; nested scopes cannot set it again.
  scedit::ConditionScope outer;
  outer.set(a, hint_a);
  EXPECT_THAT(error_of([&] { outer.set(a, hint_b); }), HasSubstr("has a condition already"));
  EXPECT_THAT(error_of([&] {
                scedit::ConditionScope inner;
                inner.set(a, hint_b);
              }),
              HasSubstr("has a condition already"));
  EXPECT_THAT(error_of([&] { model(x); }), HasSubstr("no condition for this forward pass"));  // b has none
  EXPECT_THAT(error_of([&] { scedit::attach_csc_tuner(*model, make(), "a"); }),
              HasSubstr("already has a tuner named 'a'"));
}

TEST_F(Tuners, CSCTunerCloneIsDeep) {
  scedit::CSCTuner csc(scedit::CSCTunerOptions({8, 16}, {false, true}).hint_channels(16).scale(0.5));
  randomize(*csc);
  auto copy = std::dynamic_pointer_cast<scedit::CSCTunerImpl>(csc->clone());
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->options.scale(), 0.5);
  const auto hint = torch::rand({1, 3, 64, 64});
  auto features = csc->hint_features(hint), copied = copy->hint_features(hint);
  ASSERT_EQ(features.size(), copied.size());
  for (size_t k = 0; k < features.size(); ++k) EXPECT_TRUE(torch::equal(features[k], copied[k])) << k;
  {
    torch::NoGradGuard no_grad;
    for (auto& p : copy->parameters()) p.zero_();
  }
  EXPECT_TRUE(torch::equal(csc->hint_features(hint)[0], features[0])) << "the copy shares weights";
  EXPECT_EQ(copy->hint_features(hint)[0].abs().sum().item<double>(), 0.0) << "the copy runs stale modules";
}

TEST_F(Tuners, CSCAndSCComposeAsTheFormula) {
  ToyUNet model;
  model->to(torch::kFloat64);
  auto x = torch::randn({2, 4, 8, 8}, torch::kFloat64);
  auto make = [&](double scale) {
    scedit::CSCTuner csc(scedit::CSCTunerOptions(model->skip_channels(), model->skip_down_flags())
                             .hint_channels(16).kernel_size(1).scale(scale));
    randomize(*csc);
    csc->to(torch::kFloat64);
    return csc;
  };
  auto a = make(1.0), b = make(0.5);
  auto hint_a = torch::rand({2, 3, 64, 64}, torch::kFloat64), hint_b = torch::rand({2, 3, 64, 64}, torch::kFloat64);
  scedit::ConditionScope conditions;
  conditions.set(a, hint_a).set(b, hint_b);
  auto sc = scedit::attach_sc_tuners(*model);
  for (auto& t : sc) { randomize(*t); t->to(torch::kFloat64); }
  scedit::attach_csc_tuner(*model, a, "a");
  scedit::attach_csc_tuner(*model, b, "b");
  scedit::set_control_scale(*model, 0.8);

  // Expected edit of each site by hand: s + 0.8·Σ scale_k·(c_k + MLP_k(s + c_k)) + (T(s) − s).
  auto fa = a->hint_features(hint_a), fb = b->hint_features(hint_b);
  auto model_copy = ToyUNet();
  model_copy->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model_copy->named_parameters()) p.value().copy_(model->named_parameters()[p.key()]);
  }
  auto s0 = model_copy->conv_in(x);
  auto s1 = torch::silu(model_copy->down(s0));
  auto edit = [&](const torch::Tensor& s, int k) {
    auto mlp_a = a->lsc_tuner_blocks[k]->as<scedit::SCTunerImpl>()->tuner_op;
    auto mlp_b = b->lsc_tuner_blocks[k]->as<scedit::SCTunerImpl>()->tuner_op;
    return s + 0.8 * (1.0 * (fa[k] + mlp_by_hand(s + fa[k], mlp_a)) +
                      0.5 * (fb[k] + mlp_by_hand(s + fb[k], mlp_b))) +
           mlp_by_hand(s, sc[k]->tuner_op);
  };
  auto h = torch::silu(model_copy->mid(s1));
  h = model_copy->up0(torch::cat({h, edit(s1, 0)}, 1));
  h = torch::upsample_nearest2d(h, {8, 8});
  auto expected = model_copy->up1(torch::cat({h, edit(s0, 1)}, 1));
  EXPECT_LT(rel_err(model(x), expected), 1e-12);
}

TEST_F(Tuners, CSCHintFeaturesMatchTheReference) {
  const auto& manifest = scedit_test::manifest();
  const auto flags = manifest.at("tiny_input_down_flag").get<std::vector<bool>>();
  const auto adapters = (scedit_test::fixtures_dir() / "adapters_tiny.safetensors").string();
  scedit::safetensors::File cases((scedit_test::fixtures_dir() / "unet_cases.safetensors").string());
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    auto csc = scedit::read_csc_tuner(adapters, "csc_a.", flags);
    EXPECT_EQ(csc->options.skip_channels(), manifest.at("tiny_skip_dims_encoder_order").get<std::vector<int64_t>>());
    csc->to(dtype);
    torch::NoGradGuard no_grad;
    auto features = csc->hint_features(cases.get("input.hint_a").to(dtype));
    ASSERT_EQ(static_cast<int64_t>(features.size()), csc->num_skips());
    for (size_t k = 0; k < features.size(); ++k) {
      auto ref = cases.get("hint_features_a." + std::to_string(k));
      ASSERT_EQ(features[k].sizes(), ref.sizes()) << "hint feature " << k;
      EXPECT_LT(rel_err(features[k], ref), dtype == torch::kFloat32 ? 1e-5 : 1e-12)
          << "hint feature " << k;
    }
  }
}

TEST_F(Tuners, SCTunersSaveAndLoadRoundTrip) {
  ToyUNet model;
  auto tuners = scedit::attach_sc_tuners(*model, scedit::SCAttachOptions().down_ratio(0.5));
  for (auto& t : tuners) randomize(*t);
  tuners[1]->set_scale(0.25);
  const auto path = (temp_dir() / "style.safetensors").string();
  scedit::save_sc_tuners(path, tuners);
  EXPECT_EQ(scedit::detect_tuner_file(path), scedit::TunerKind::kSC);
  scedit::safetensors::File file(path);
  EXPECT_TRUE(file.contains("lsc_identity.0.tuner_op.ln1.weight"));
  EXPECT_TRUE(file.contains("lsc_identity.1.tuner_op.ln2.bias"));
  const auto sidecar = nlohmann::json::parse(std::ifstream(scedit::sidecar_path(path)));
  EXPECT_EQ(sidecar.at("kind"), "sc_tuner");
  EXPECT_EQ(sidecar.at("options")[1].at("scale"), 0.25);

  auto loaded = scedit::read_sc_tuners(path);
  ASSERT_EQ(loaded.size(), 2u);
  EXPECT_EQ(loaded[1].site, 1);
  EXPECT_EQ(loaded[1].tuner->options.scale(), 0.25);
  EXPECT_EQ(loaded[0].tuner->options.down_ratio(), 0.5);
  auto x = torch::randn({1, 16, 3, 3});
  EXPECT_TRUE(torch::equal(loaded[0].tuner(x), tuners[0](x)));
  // Into existing tuners; a mismatch is refused by key.
  std::vector<scedit::SCTuner> fresh = {scedit::SCTuner(scedit::SCTunerOptions(16).down_ratio(0.5)),
                                        scedit::SCTuner(scedit::SCTunerOptions(8).down_ratio(0.5))};
  scedit::load_sc_tuners(path, fresh);
  EXPECT_TRUE(torch::equal(fresh[0](x), tuners[0](x)));
  std::vector<scedit::SCTuner> wrong = {scedit::SCTuner(scedit::SCTunerOptions(16))};
  EXPECT_THAT(error_of([&] { scedit::load_sc_tuners(path, wrong); }), HasSubstr("tuner_op.ln1.weight"));
}

TEST_F(Tuners, SCTunersLoadFromTheReferenceFile) {
  const auto adapters = (scedit_test::fixtures_dir() / "adapters_tiny.safetensors").string();
  auto tuners = scedit::read_sc_tuners(adapters, "sc.");
  const auto& manifest = scedit_test::manifest();
  auto dims = manifest.at("tiny_skip_dims_encoder_order").get<std::vector<int64_t>>();
  ASSERT_EQ(tuners.size(), dims.size());
  for (size_t k = 0; k < tuners.size(); ++k) {
    EXPECT_EQ(tuners[k].site, static_cast<int64_t>(k));
    EXPECT_EQ(tuners[k].tuner->options.channels(), dims[dims.size() - 1 - k]);
  }
}

TEST_F(Tuners, CSCTunerSaveAndLoadRoundTrip) {
  scedit::CSCTuner csc(scedit::CSCTunerOptions({8, 16}, {false, true}).hint_channels(16).hint_ratio(2).scale(0.7));
  randomize(*csc);
  const auto path = (temp_dir() / "canny.safetensors").string();
  scedit::save_csc_tuner(path, csc);
  EXPECT_EQ(scedit::detect_tuner_file(path), scedit::TunerKind::kCSC);
  auto loaded = scedit::read_csc_tuner(path);
  EXPECT_EQ(loaded->options.hint_ratio(), 2);
  EXPECT_EQ(loaded->options.scale(), 0.7);
  EXPECT_EQ(loaded->options.down_flags(), (std::vector<bool>{false, true}));
  auto hint = torch::rand({1, 3, 32, 32});
  auto a = csc->hint_features(hint), b = loaded->hint_features(hint);
  for (size_t k = 0; k < a.size(); ++k) EXPECT_TRUE(torch::equal(a[k], b[k]));
  // A scepter file has no options: the stride flags must come from the caller.
  scedit::TensorMap bare;
  for (const auto& p : csc->named_parameters()) bare["model." + p.key()] = p.value().detach();
  const auto scepter = (temp_dir() / "scepter.safetensors").string();
  scedit::safetensors::save(scepter, bare);
  EXPECT_THAT(error_of([&] { scedit::read_csc_tuner(scepter); }), HasSubstr("pass the model's skip down flags"));
  auto from_scepter = scedit::read_csc_tuner(scepter, "", std::vector<bool>{false, true});
  auto c = from_scepter->hint_features(hint);
  for (size_t k = 0; k < a.size(); ++k) EXPECT_TRUE(torch::equal(a[k], c[k]));
}

TEST_F(Tuners, AttachCSCRefusesMismatchedSites) {
  ToyUNet model;
  scedit::CSCTuner three(scedit::CSCTunerOptions({8, 16, 16}, {false, true, false}).hint_channels(16));
  EXPECT_THAT(error_of([&] { scedit::attach_csc_tuner(*model, three); }), HasSubstr("edits 3 skips but 2 sites"));
  scedit::CSCTuner swapped(scedit::CSCTunerOptions({16, 8}, {false, true}).hint_channels(16));
  EXPECT_THAT(error_of([&] { scedit::attach_csc_tuner(*model, swapped); }), HasSubstr("site lsc_identity.0 has 16 channels"));
}

// A tuner file holding NaN or Inf is refused, naming the file and the tensor: loaded, it would
// only turn every image black, far from its cause.
TEST_F(Tuners, FilesHoldingNaNOrInfAreRefusedNamingTheTensor) {
  ToyUNet model;
  auto sc = scedit::attach_sc_tuners(*model);
  scedit::CSCTuner csc(scedit::CSCTunerOptions(model->skip_channels(), model->skip_down_flags()).hint_channels(16));
  const auto sc_path = (temp_dir() / "sc_nan.safetensors").string();
  const auto csc_path = (temp_dir() / "csc_inf.safetensors").string();
  const std::string sc_key = "lsc_identity.1.tuner_op.ln2.weight", csc_key = "pre_hint_blocks.2.bias";
  {
    torch::NoGradGuard no_grad;
    sc[1]->tuner_op->ln2->weight.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    csc->named_parameters()[csc_key].view(-1)[1] = std::numeric_limits<float>::infinity();
  }
  scedit::save_sc_tuners(sc_path, sc);
  scedit::save_csc_tuner(csc_path, csc);
  const std::vector<std::tuple<std::string, std::string, std::function<void()>>> reads = {
      {sc_path, sc_key, [&] { scedit::read_sc_tuners(sc_path); }},
      {csc_path, csc_key, [&] { scedit::read_csc_tuner(csc_path); }}};
  for (const auto& [path, key, read] : reads) {
    const auto message = error_of(read);
    EXPECT_THAT(message, HasSubstr("tuner file '" + path + "'"));
    EXPECT_THAT(message, HasSubstr("tensor '" + key + "'"));
  }
  // Into existing tuners too: nothing is copied.
  std::vector<scedit::SCTuner> fresh = {scedit::SCTuner(scedit::SCTunerOptions(16)), scedit::SCTuner(scedit::SCTunerOptions(8))};
  const auto before = fresh[1]->tuner_op->ln2->weight.clone();
  EXPECT_THAT(error_of([&] { scedit::load_sc_tuners(sc_path, fresh); }), HasSubstr(sc_key));
  EXPECT_TRUE(torch::equal(fresh[1]->tuner_op->ln2->weight, before));
}

namespace {

/// The tiny SDXL in float64 with the inputs of one forward pass: latents, timesteps, the
/// prompts' context and the added conditioning of two uncropped 64-pixel images.
struct TinySDXLCall {
  sd::StableDiffusion pipe = sd::tiny_sdxl_pipeline(0, torch::kFloat64);
  torch::Tensor x = torch::randn({2, 4, 8, 8}, torch::kFloat64);
  torch::Tensor t = torch::tensor({10, 700}, torch::kLong);
  sd::TextConditioning text = sd::encode_text(pipe, {"a red circle", "a cat"});
  sd::UNetAddedConditions added =
      sd::added_conditions(pipe, text.pooled, {sd::SizeConditioning::uncropped(64, 64)});

  /// The UNet's prediction, with `residuals` added to its skips.
  torch::Tensor operator()(const sd::UNetResiduals& residuals = {}) {
    torch::NoGradGuard no_grad;
    return pipe.unet->forward(x, t, text.context, added, residuals);
  }
  /// The skip features the encoder hands the decoder, encoder order.
  std::vector<torch::Tensor> skips() {
    torch::NoGradGuard no_grad;
    return pipe.unet->encode(x, t, text.context, added).skips;
  }
};

/// A CSC-Tuner for `unet` with SCEdit.md's SDXL hint encoder (r = 2, P = 320).
scedit::CSCTuner sdxl_csc_tuner(sd::UNet& unet) {
  return scedit::CSCTuner(scedit::CSCTunerOptions(unet->skip_channels(), unet->skip_down_flags())
                              .hint_ratio(2)
                              .hint_channels(320));
}

}  // namespace

TEST_F(Tuners, SCAndCSCTunersOnTheTinySDXLUNetAreTheIdentityAtInit) {
  TinySDXLCall call;
  ASSERT_TRUE(call.pipe.unet_config.has_text_time());
  const auto base = call();
  auto sc = scedit::attach_sc_tuners(*call.pipe.unet);
  EXPECT_EQ(sc.size(), 9u);  // SDXL's skips
  for (auto& tuner : sc) tuner->to(torch::kFloat64);
  EXPECT_LE((call() - base).abs().max().item<double>(), 1e-6);
  auto csc = sdxl_csc_tuner(call.pipe.unet);
  csc->to(torch::kFloat64);
  scedit::attach_csc_tuner(*call.pipe.unet, csc, "canny");
  EXPECT_EQ(csc->pre_hint_blocks[0]->as<torch::nn::Conv2dImpl>()->weight.size(0), 32);  // 16·r
  EXPECT_EQ(csc->pre_hint_blocks[12]->as<torch::nn::Conv2dImpl>()->weight.size(0), 320);  // P
  scedit::ConditionScope conditions;
  conditions.set(csc, torch::rand({2, 3, 64, 64}, torch::kFloat64));
  EXPECT_LE((call() - base).abs().max().item<double>(), 1e-6);
}

// With random tuner weights, each edited skip is the formula computed by hand from the skip
// features of the untuned encoder: SC s + (T(s) − s) = s + MLP(s); CSC s + c_k + MLP_k(s + c_k).
// The UNet without tuners given those edits as residuals must predict what the tuned UNet does.
TEST_F(Tuners, SCAndCSCTunersOnTheTinySDXLUNetMatchTheFormula) {
  for (const bool controlled : {false, true}) {
    TinySDXLCall plain, tuned;  // the same seeded weights and inputs
    tuned.x = plain.x;
    const auto skips = plain.skips();
    const auto n = skips.size();
    ASSERT_EQ(n, 9u);
    sd::UNetResiduals edits;
    if (!controlled) {
      auto sc = scedit::attach_sc_tuners(*tuned.pipe.unet);
      for (auto& tuner : sc) {
        randomize(*tuner);
        tuner->to(torch::kFloat64);
      }
      for (size_t j = 0; j < n; ++j) edits.down.push_back(mlp_by_hand(skips[j], sc[n - 1 - j]->tuner_op));
      EXPECT_LT(rel_err(tuned(), plain(edits)), 1e-10);
      continue;
    }
    auto csc = sdxl_csc_tuner(tuned.pipe.unet);
    randomize(*csc);
    csc->to(torch::kFloat64);
    scedit::attach_csc_tuner(*tuned.pipe.unet, csc, "canny");
    const auto hint = torch::rand({2, 3, 64, 64}, torch::kFloat64);
    std::vector<torch::Tensor> features;
    {
      torch::NoGradGuard no_grad;
      features = csc->hint_features(hint);  // decoder order
    }
    for (size_t j = 0; j < n; ++j) {
      const auto k = n - 1 - j;
      auto mlp = csc->lsc_tuner_blocks[k]->as<scedit::SCTunerImpl>()->tuner_op;
      edits.down.push_back(features[k] + mlp_by_hand(skips[j] + features[k], mlp));
    }
    scedit::ConditionScope conditions;
    conditions.set(csc, hint);
    EXPECT_LT(rel_err(tuned(), plain(edits)), 1e-10);
  }
}
