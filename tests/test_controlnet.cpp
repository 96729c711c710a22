// Tests of examples/sd/controlnet{,_config,_weights}.hpp: diffusers'
// ControlNetModel against the reference fixtures in controlnet/ (keys, parameter counts, parity of
// the residuals in float32 and float64, from_unet, the UNet driven by the residuals), its
// configuration, clone, training levers, the three weight layouts and errors on bad input. Every
// size comes from controlnet/manifest.json and the cases, so the tests hold on any fixture set
// that $SCEDIT_FIXTURES names.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <sd/controlnet.hpp>
#include <sd/controlnet_weights.hpp>
#include <sd/ldm_keys.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tiny.hpp>
#include <sd/unet.hpp>
#include <sd/weights.hpp>

#include "controlnet_fixtures.hpp"
#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::fixture;
using scedit_test::parameter_count;
using scedit_test::rel_err;
using scedit_test::shape_string;
using scedit_test::shapes_of;
using scedit_test::TempDir;
using namespace scedit_test::controlnet;

class ControlNet : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

// ---- configuration ---------------------------------------------------------------------------

TEST_F(ControlNet, ConfigReadsTheManifestsConfigurations) {
  for (const char* name : {"controlnet_tiny", "controlnet_sd15"}) {
    const auto& given = manifest().at("configs").at(name);
    const auto c = sd::ControlNetConfig::from_json(given);
    // The constructor arguments and the full resolved config (every default written out, nulls
    // included) describe the same model.
    EXPECT_EQ(sd::ControlNetConfig::from_json(manifest().at("configs_full").at(name)).to_json(),
              c.to_json()) << name;
    EXPECT_EQ(sd::ControlNetConfig::from_json(c.to_json()).to_json(), c.to_json()) << name;
    EXPECT_EQ(c.unet.block_out_channels, given.at("block_out_channels").get<std::vector<int64_t>>());
    EXPECT_EQ(c.conditioning_embedding_out_channels,
              given.at("conditioning_embedding_out_channels").get<std::vector<int64_t>>());
    EXPECT_EQ(c.unet.cross_attention_dim, given.at("cross_attention_dim").get<int64_t>());
  }
  EXPECT_EQ(sd::ControlNetConfig::from_json(manifest().at("configs").at("controlnet_sd15")).to_json(),
            sd::ControlNetConfig::sd15().to_json());
  // The residuals and the condition's size follow from the configuration.
  const auto c = tiny_config();
  EXPECT_EQ(c.residual_channels(), manifest().at("down_res_channels").get<std::vector<int64_t>>());
  EXPECT_EQ(c.conditioning_factor() * cases().at("input.sample").size(2),
            cases().at("input.controlnet_cond").size(2));
  // The tiny UNet of the parent fixtures is the one this ControlNet mirrors.
  EXPECT_EQ(sd::ControlNetConfig::from_unet(scedit_test::tiny_unet_config()).to_json(), c.to_json());
}

TEST_F(ControlNet, ConfigRefusesWhatItCannotBuildNamingTheKey) {
  auto with = [](const std::string& key, const json& value) {
    json j = manifest().at("configs").at("controlnet_tiny");
    j[key] = value;
    return j;
  };
  auto error = [](const json& j) { return error_of([&] { sd::ControlNetConfig::from_json(j); }); };
  EXPECT_THAT(error(with("global_pool_conditions", true)), HasSubstr("global_pool_conditions"));
  EXPECT_THAT(error(with("controlnet_conditioning_channel_order", "rbg")),
              AllOf(HasSubstr("controlnet_conditioning_channel_order"), HasSubstr("rbg")));
  EXPECT_THAT(error(with("class_embed_type", "timestep")), AllOf(HasSubstr("ControlNetModel"),
                                                                  HasSubstr("class_embed_type")));
  EXPECT_THAT(error(with("mid_block_type", "UNetMidBlock2D")), HasSubstr("UNetMidBlock2D"));
  // UNet keys that ControlNetModel does not take, and keys nobody knows.
  EXPECT_THAT(error(with("conv_in_kernel", 5)), AllOf(HasSubstr("unknown key"), HasSubstr("conv_in_kernel")));
  EXPECT_THAT(error(with("new_feature", 1)), AllOf(HasSubstr("unknown key"), HasSubstr("new_feature")));
  EXPECT_THAT(error(with("conditioning_embedding_out_channels", json::array())),
              HasSubstr("conditioning_embedding_out_channels"));
  // A UNet whose encoder ControlNetModel cannot copy.
  auto unet = scedit_test::tiny_unet_config();
  unet.resnet_out_scale_factor = 2.0;
  EXPECT_THAT(error_of([&] { sd::ControlNetConfig::from_unet(unet); }),
              HasSubstr("resnet_out_scale_factor"));
  // bgr is diffusers' flip of the condition's channels.
  EXPECT_EQ(sd::ControlNetConfig::from_json(with("controlnet_conditioning_channel_order", "bgr"))
                .controlnet_conditioning_channel_order,
            "bgr");
}

// A ControlNet fits only a UNet with its skips' widths, its context width, and SDXL's added
// conditioning exactly where the UNet has it; otherwise the error names the file.
TEST_F(ControlNet, FitsOnlyTheUNetWhoseEncoderItMirrors) {
  const auto tiny = sd::ControlNetConfig::from_json(manifest().at("configs").at("controlnet_tiny"));
  EXPECT_NO_THROW(tiny.check_fits(tiny.unet, "cn"));
  EXPECT_NO_THROW(sd::ControlNetConfig::from_unet(scedit_test::tiny_unet_config()).check_fits(
      scedit_test::tiny_unet_config(), "cn"));
  auto wider = tiny.unet;
  wider.block_out_channels.back() *= 2;
  EXPECT_THAT(error_of([&] { tiny.check_fits(wider, "'cn.safetensors'"); }),
              AllOf(HasSubstr("'cn.safetensors': a ControlNet for another model: its residuals have"),
                    HasSubstr("this model's skips")));
  auto other_text = tiny.unet;
  other_text.cross_attention_dim += 8;
  EXPECT_THAT(error_of([&] { tiny.check_fits(other_text, "cn"); }), HasSubstr("reads a text context"));
  const auto xl = sd::tiny_sdxl_pipeline(0).unet_config;
  EXPECT_THAT(error_of([&] { sd::ControlNetConfig::from_unet(xl).check_fits(tiny.unet, "cn"); }),
              AllOf(HasSubstr("a ControlNet for another model"), HasSubstr("text_time")));
}

// ---- structure -------------------------------------------------------------------------------

TEST_F(ControlNet, TinyKeysShapesAndParameterCountMatchTheManifest) {
  sd::ControlNet controlnet(tiny_config());
  EXPECT_EQ(shapes_of(*controlnet), shapes_of(manifest().at("keys_controlnet_tiny")));
  EXPECT_EQ(shapes_of(tiny_weights()), shapes_of(manifest().at("keys_controlnet_tiny")));
  EXPECT_EQ(parameter_count(*controlnet), manifest().at("params_controlnet_tiny").get<int64_t>());
  EXPECT_EQ(controlnet->zero_convs.size(), residual_count());
}

TEST_F(ControlNet, Sd15KeysShapesAndParameterCountMatchTheManifest) {
  // Built in bfloat16 (half the memory of float32): only keys, shapes and counts are checked.
  scedit_test::DefaultDtypeGuard bf16(caffe2::TypeMeta::Make<at::BFloat16>());
  sd::ControlNet controlnet(sd::ControlNetConfig::from_json(manifest().at("configs").at("controlnet_sd15")));
  EXPECT_EQ(controlnet->conv_in->weight.scalar_type(), torch::kBFloat16);
  const auto& keys = manifest().at("keys_controlnet_sd15");
  EXPECT_EQ(shapes_of(*controlnet), shapes_of(keys));
  EXPECT_EQ(keys.size(), manifest().at("from_unet").at("keys_total").get<size_t>());
  EXPECT_EQ(parameter_count(*controlnet), manifest().at("params_controlnet_sd15").get<int64_t>());
}

TEST_F(ControlNet, FreshModelIsZeroInitialisedWhereDiffusersIs) {
  sd::ControlNet controlnet(tiny_config());
  const auto& zero = manifest().at("from_unet").at("zero_initialised_after_from_unet");
  size_t zeroed = 0;
  for (const auto& [key, tensor] : scedit::state_dict(*controlnet)) {
    if (!under(key, zero)) continue;
    ++zeroed;
    EXPECT_EQ(tensor.abs().max().item<double>(), 0.0) << key;
  }
  EXPECT_EQ(zeroed, 2 * zero.size());  // weight and bias of each
  // The convolutions before them are not: the residuals are zero because of the zero convs.
  EXPECT_GT(controlnet->conv_in->weight.abs().max().item<double>(), 0.0);
  EXPECT_GT(controlnet->controlnet_cond_embedding->conv_in->weight.abs().max().item<double>(), 0.0);
  const auto residuals = run(controlnet, torch::kFloat32);
  for (const auto& r : residuals.down) EXPECT_EQ(r.abs().max().item<double>(), 0.0);
  EXPECT_EQ(residuals.mid.abs().max().item<double>(), 0.0);
}

// ---- parity ----------------------------------------------------------------------------------

TEST_F(ControlNet, MatchesTheReferenceFloat32) {
  auto controlnet = tiny_controlnet(torch::kFloat32);
  const double err = max_error(run(controlnet, torch::kFloat32), "output");
  std::printf("[ info     ] ControlNet float32 rel err %.3g\n", err);
  EXPECT_LE(err, kFloat32);
  EXPECT_LE(max_error(run(controlnet, torch::kFloat32, 0.5), "output_scale0.5"), kFloat32);
  torch::NoGradGuard no_grad;
  EXPECT_LE(rel_err(controlnet->controlnet_cond_embedding(input("input.controlnet_cond", torch::kFloat32)),
                    cases().at("debug.controlnet_cond_embedding")),
            kFloat32);
}

TEST_F(ControlNet, MatchesTheReferenceFloat64) {
  auto controlnet = tiny_controlnet(torch::kFloat64);
  const double own = max_error(run(controlnet, torch::kFloat64), "output");
  const double reference = max_error(run(controlnet, torch::kFloat64, 1.0, true), "output");
  std::printf("[ info     ] ControlNet float64 rel err %.3g (own timestep features), %.3g (the reference's)\n",
              own, reference);
  EXPECT_LE(own, kFloat64OwnFeatures);
  EXPECT_LE(reference, kFloat64ReferenceFeatures);
  EXPECT_LE(max_error(run(controlnet, torch::kFloat64, 0.5, true), "output_scale0.5"), kFloat64ReferenceFeatures);
  torch::NoGradGuard no_grad;
  EXPECT_LE(rel_err(controlnet->controlnet_cond_embedding(input("input.controlnet_cond")),
                    cases().at("debug.controlnet_cond_embedding")),
            kFloat64ReferenceFeatures);
  // The features themselves: float32, within an ulp or so of the reference's.
  const auto features = controlnet->time_features(cases().at("input.timestep"), input("input.sample"));
  EXPECT_EQ(features.scalar_type(), torch::kFloat32);
  EXPECT_LE(rel_err(features, cases().at("debug.timestep_features")), 1e-6);
}

TEST_F(ControlNet, FromUNetCopiesTheEncoderAndMatchesTheReference) {
  auto unet = scedit_test::tiny_unet(torch::kFloat32);
  auto controlnet = sd::controlnet_from_unet(unet);
  const auto& from_unet = manifest().at("from_unet");
  const auto unet_tensors = scedit::state_dict(*unet);
  size_t copied = 0;
  scedit::TensorMap merged;
  for (const auto& [key, tensor] : scedit::state_dict(*controlnet)) {
    if (under(key, from_unet.at("prefixes_copied_from_unet"))) {
      ASSERT_TRUE(unet_tensors.count(key)) << key;
      EXPECT_TRUE(torch::equal(tensor, unet_tensors.at(key))) << key;
      ++copied;
      merged.emplace(key, tensor);
    } else {
      EXPECT_TRUE(under(key, from_unet.at("prefixes_not_in_unet"))) << key;
      if (under(key, from_unet.at("zero_initialised_after_from_unet"))) {
        EXPECT_EQ(tensor.abs().sum().item<double>(), 0.0) << key;
      }
      merged.emplace(key, tiny_weights().at(key));  // as the reference: controlnet_tiny's values
    }
  }
  EXPECT_EQ(copied, from_unet.at("keys_copied_from_unet").get<size_t>());
  EXPECT_EQ(controlnet->conv_in->weight.scalar_type(), torch::kFloat32);

  auto f32 = tiny_controlnet(torch::kFloat32, merged);
  EXPECT_LE(max_error(run(f32, torch::kFloat32), "output.from_unet"), kFloat32);
  auto f64 = tiny_controlnet(torch::kFloat64, merged);
  EXPECT_LE(max_error(run(f64, torch::kFloat64, 1.0, true), "output.from_unet"), kFloat64ReferenceFeatures);
}

TEST_F(ControlNet, DrivesTheUNetAsTheReference) {
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    auto unet = scedit_test::tiny_unet(dtype);
    auto controlnet = tiny_controlnet(dtype);
    const double tolerance = dtype == torch::kFloat32 ? kFloat32 : kFloat64OwnFeatures;
    torch::NoGradGuard no_grad;
    for (const auto& [scale, expected] : {std::pair{1.0, "output.unet_with_controlnet"},
                                          std::pair{0.5, "output.unet_with_controlnet_scale0.5"}}) {
      const auto out = unet(input("input.sample", dtype), cases().at("input.timestep"),
                            input("input.encoder_hidden_states", dtype), run(controlnet, dtype, scale));
      EXPECT_LE(rel_err(out, cases().at(expected)), tolerance) << expected << " in " << dtype;
    }
  }
}

// At latent sizes that do not halve evenly (odd_size/'s cases), with a condition at the
// conditioning factor, every residual has the shape of the skip it is added to.
TEST_F(ControlNet, DrivesTheUNetAtLatentSizesThatDoNotHalveEvenly) {
  auto unet = scedit_test::tiny_unet(torch::kFloat32);
  auto controlnet = tiny_controlnet(torch::kFloat32);
  const int64_t factor = controlnet->config.conditioning_factor();
  const auto names = scedit_test::odd_size_case_names();
  ASSERT_FALSE(names.empty());
  torch::NoGradGuard no_grad;
  for (const auto& name : names) {
    const auto sample = scedit_test::odd_size_case(name + ".input.sample").to(torch::kFloat32);
    const auto context = scedit_test::odd_size_case(name + ".input.encoder_hidden_states").to(torch::kFloat32);
    const auto t = scedit_test::odd_size_case(name + ".input.timestep");
    const auto cond = torch::rand({sample.size(0), controlnet->config.conditioning_channels,
                                   factor * sample.size(2), factor * sample.size(3)});
    const auto residuals = controlnet(sample, t, context, cond);
    const auto features = unet->encode(sample, t, context);
    ASSERT_EQ(residuals.down.size(), features.skips.size()) << name;
    for (size_t i = 0; i < residuals.down.size(); ++i) {
      EXPECT_EQ(residuals.down[i].sizes(), features.skips[i].sizes()) << name << ", residual " << i;
    }
    EXPECT_EQ(residuals.mid.sizes(), features.mid_output.sizes()) << name;
    const auto out = unet(sample, t, context, residuals);
    EXPECT_EQ(out.sizes(), sample.sizes()) << name;
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>()) << name;
  }
}

TEST_F(ControlNet, FromUNetLeavesTheUNetUnchanged) {
  auto unet = scedit_test::tiny_unet(torch::kFloat32);
  auto controlnet = sd::controlnet_from_unet(unet);
  torch::NoGradGuard no_grad;
  const auto sample = input("input.sample", torch::kFloat32);
  const auto context = input("input.encoder_hidden_states", torch::kFloat32);
  const auto t = cases().at("input.timestep");
  EXPECT_TRUE(torch::equal(unet(sample, t, context, run(controlnet, torch::kFloat32)),
                           unet(sample, t, context)));
}

// SDXL's layout (tiny: 3 levels, no attention at the first, 1, 1, 2 transformer layers, linear
// projections, "text_time"): from_unet copies the added embedding with the encoder, so that with
// the zero convolutions set to the identity its residuals are the UNet's own skip features and
// middle output — they differ if the added conditioning were left out or not copied — and at
// init (zero convolutions zero) the UNet's output is unchanged.
TEST_F(ControlNet, FromUNetOnSdxlReproducesTheUNetsSkipsAndAddsNothingAtInit) {
  auto sd = sd::tiny_sdxl_pipeline(/*seed=*/3);
  auto unet = sd.unet;
  auto controlnet = sd::controlnet_from_unet(unet);
  ASSERT_FALSE(controlnet->add_embedding.is_empty());
  EXPECT_EQ(controlnet->zero_convs.size(), unet->sites.size());
  const int64_t b = 2, latent = 8, factor = controlnet->config.conditioning_factor();
  torch::NoGradGuard no_grad;
  const auto sample = torch::randn({b, sd.unet_config.in_channels, latent, latent});
  const auto context = torch::randn({b, 77, sd.unet_config.cross_attention_dim});
  const auto t = torch::tensor({999, 250}, torch::kInt64);
  const auto added = sd::added_conditions(sd, torch::randn({b, sd.unet_config.text_embeds_dim()}),
                                          {sd::SizeConditioning::uncropped(64, 64)});
  const auto cond = torch::rand({b, 3, factor * latent, factor * latent});

  const auto at_init = controlnet(sample, t, context, added, cond);
  for (size_t i = 0; i < at_init.down.size(); ++i) {
    EXPECT_EQ(at_init.down[i].abs().max().item<double>(), 0.0) << "residual " << i;
  }
  EXPECT_EQ(at_init.mid.abs().max().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(unet(sample, t, context, added, at_init), unet(sample, t, context, added)));

  // The zero convolutions as identities: the residuals are the encoder's features themselves.
  auto identity = [](torch::nn::Conv2d& conv) {
    conv->weight.copy_(torch::eye(conv->weight.size(0)).view(conv->weight.sizes()));
    conv->bias.zero_();
  };
  for (auto& conv : controlnet->zero_convs) identity(conv);
  identity(controlnet->controlnet_mid_block);
  const auto copied = controlnet(sample, t, context, added, cond);
  const auto features = unet->encode(sample, t, context, added);
  ASSERT_EQ(copied.down.size(), features.skips.size());
  for (size_t i = 0; i < copied.down.size(); ++i) {
    EXPECT_LE(rel_err(copied.down[i], features.skips[i]), 1e-6) << "skip " << i;
  }
  EXPECT_LE(rel_err(copied.mid, features.mid_output), 1e-6);
  // Other size conditioning, other features: the added embedding reaches the encoder.
  const auto other = sd::added_conditions(sd, added.text_embeds, {sd::SizeConditioning::uncropped(32, 48)});
  EXPECT_GT(rel_err(controlnet(sample, t, context, other, cond).mid, features.mid_output), 1e-3);

  // Without the added conditioning, or with it on a ControlNet without "text_time": an error
  // naming what is expected.
  EXPECT_THAT(error_of([&] { controlnet(sample, t, context, cond); }),
              AllOf(HasSubstr("text_time"), HasSubstr("text_embeds [2, 40]")));
  auto sd15 = tiny_controlnet(torch::kFloat32);
  const auto sd15_sample = input("input.sample", torch::kFloat32);
  const int64_t f = sd15->config.conditioning_factor();
  const auto sd15_cond = torch::rand({sd15_sample.size(0), sd15->config.conditioning_channels,
                                      f * sd15_sample.size(2), f * sd15_sample.size(3)});
  EXPECT_THAT(error_of([&] {
                sd15(sd15_sample, cases().at("input.timestep"),
                     input("input.encoder_hidden_states", torch::kFloat32), added, sd15_cond);
              }),
              HasSubstr("no addition_embed_type"));
}

// ---- module behaviour ------------------------------------------------------------------------

TEST_F(ControlNet, CloneIsDeepAndUsesItsOwnWeights) {
  auto controlnet = tiny_controlnet(torch::kFloat32);
  const auto base = run(controlnet, torch::kFloat32);
  auto copy = std::dynamic_pointer_cast<sd::ControlNetModelImpl>(controlnet->clone());
  ASSERT_NE(copy, nullptr);
  sd::ControlNet cloned(copy);
  const auto same = run(cloned, torch::kFloat32);
  for (size_t i = 0; i < base.down.size(); ++i) EXPECT_TRUE(torch::equal(same.down[i], base.down[i]));
  EXPECT_NE(cloned->zero_convs[0].get(), controlnet->zero_convs[0].get());
  EXPECT_NE(cloned->downs[0].get(), controlnet->downs[0].get());
  {
    // Weights deep in the clone's lists, through its typed holders: its forward must see them.
    torch::NoGradGuard no_grad;
    cloned->zero_convs.back()->bias.add_(1.0);
    cloned->controlnet_cond_embedding->convs.at(0)->bias.add_(1.0);
    EXPECT_TRUE(torch::equal(cloned->named_parameters()["controlnet_cond_embedding.blocks.0.bias"],
                             cloned->controlnet_cond_embedding->convs.at(0)->bias));
  }
  const auto changed = run(cloned, torch::kFloat32);
  EXPECT_FALSE(torch::allclose(changed.down.back(), base.down.back()));
  EXPECT_FALSE(torch::allclose(changed.down.front(), base.down.front()));
  const auto original = run(controlnet, torch::kFloat32);
  EXPECT_TRUE(torch::equal(original.down.back(), base.down.back()));
  EXPECT_TRUE(torch::equal(original.down.front(), base.down.front()));
}

TEST_F(ControlNet, PrintsItsConfiguration) {
  const auto c = tiny_config();
  std::ostringstream expected, printed, embedding;
  expected << "sd::ControlNetModel(block_out_channels=" << torch::IntArrayRef(c.unet.block_out_channels)
           << ", layers_per_block=" << c.unet.layers_per_block
           << ", cross_attention_dim=" << c.unet.cross_attention_dim
           << ", conditioning_embedding_out_channels="
           << torch::IntArrayRef(c.conditioning_embedding_out_channels) << ")";
  sd::ControlNet(c)->pretty_print(printed);
  EXPECT_EQ(printed.str(), expected.str());
  sd::ControlNetConditioningEmbedding(
      sd::ControlNetConditioningEmbeddingOptions(320).block_out_channels({16, 32}).conditioning_channels(1))
      ->pretty_print(embedding);
  EXPECT_EQ(embedding.str(),
            "sd::ControlNetConditioningEmbedding(conditioning_embedding_channels=320, "
            "block_out_channels=[16, 32], conditioning_channels=1)");
}

TEST_F(ControlNet, BgrConditionIsFlippedToRgb) {
  auto rgb = tiny_controlnet(torch::kFloat32);
  auto bgr_config = tiny_config();
  bgr_config.controlnet_conditioning_channel_order = "bgr";
  sd::ControlNet bgr(bgr_config);
  scedit::load_state_dict(*bgr, tiny_weights());
  torch::NoGradGuard no_grad;
  const auto sample = input("input.sample", torch::kFloat32);
  const auto context = input("input.encoder_hidden_states", torch::kFloat32);
  const auto cond = input("input.controlnet_cond", torch::kFloat32);
  const auto t = cases().at("input.timestep");
  EXPECT_TRUE(torch::equal(bgr(sample, t, context, cond.flip({1})).mid, rgb(sample, t, context, cond).mid));
}

TEST_F(ControlNet, TrainingLeversKeepTheResult) {
  // Gradient checkpointing recomputes the encoder in the backward pass: the same residuals and
  // the same gradients. Lean activations and channels-last change the memory, not the values.
  auto loss_and_gradients = [](sd::ControlNet& controlnet) {
    const auto residuals = controlnet(input("input.sample", torch::kFloat32), cases().at("input.timestep"),
                                      input("input.encoder_hidden_states", torch::kFloat32),
                                      input("input.controlnet_cond", torch::kFloat32));
    auto loss = residuals.mid.square().mean();
    for (const auto& r : residuals.down) loss = loss + r.square().mean();
    controlnet->zero_grad();
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (const auto& p : controlnet->parameters()) grads.push_back(p.grad().clone());
    return std::pair{loss.detach(), grads};
  };
  auto plain = tiny_controlnet(torch::kFloat32);
  const auto [loss, grads] = loss_and_gradients(plain);
  auto checkpointed = tiny_controlnet(torch::kFloat32);
  checkpointed->set_gradient_checkpointing(true);
  const auto [loss_c, grads_c] = loss_and_gradients(checkpointed);
  EXPECT_LE(rel_err(loss_c, loss), 1e-6);
  ASSERT_EQ(grads_c.size(), grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].abs().sum().item<double>() == 0.0) continue;
    EXPECT_LE(rel_err(grads_c[i], grads[i]), 1e-5) << "parameter " << i;
  }

  auto lean = tiny_controlnet(torch::kFloat32);
  sd::LeanActivations options;
  options.group_norm_silu = true;
  options.geglu = true;
  lean->set_lean_activations(options);
  EXPECT_TRUE(lean->downs.at(0)->resnet_blocks.at(0)->lean.group_norm_silu);
  EXPECT_TRUE(lean->mid_block->resnet_blocks.at(1)->lean.group_norm_silu);
  EXPECT_LE(rel_err(loss_and_gradients(lean).first, loss), 1e-6);

  auto channels_last = tiny_controlnet(torch::kFloat32);
  channels_last->set_channels_last(true);
  EXPECT_TRUE(channels_last->conv_in->weight.is_contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_LE(rel_err(loss_and_gradients(channels_last).first, loss), 1e-5);
}

TEST_F(ControlNet, RefusesBadInputNamingTheShape) {
  auto controlnet = tiny_controlnet(torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto sample = input("input.sample", torch::kFloat32);
  const auto context = input("input.encoder_hidden_states", torch::kFloat32);
  const auto cond = input("input.controlnet_cond", torch::kFloat32);
  const auto t = cases().at("input.timestep");
  const int64_t factor = controlnet->config.conditioning_factor();
  const std::string times = std::to_string(factor) + "× the latent size";
  // A condition at the latent's size, one of half the size, one with a channel too many.
  const auto small = torch::rand({sample.size(0), cond.size(1), sample.size(2), sample.size(3)});
  EXPECT_THAT(error_of([&] { controlnet(sample, t, context, small); }),
              AllOf(HasSubstr("controlnet_cond"), HasSubstr(times), HasSubstr(shape_string(small.sizes())),
                    HasSubstr(shape_string(cond.sizes()))));
  const auto half = cond.slice(2, 0, cond.size(2) / 2);
  EXPECT_THAT(error_of([&] { controlnet(sample, t, context, half); }), HasSubstr(times));
  const auto extra = torch::cat({cond, cond.slice(1, 0, 1)}, 1);
  EXPECT_THAT(error_of([&] { controlnet(sample, t, context, extra); }),
              HasSubstr(shape_string(extra.sizes())));
  const auto wrong_sample = torch::cat({sample, sample.slice(1, 0, 1)}, 1);
  EXPECT_THAT(error_of([&] { controlnet(wrong_sample, t, context, cond); }),
              AllOf(HasSubstr("sample"), HasSubstr(shape_string(wrong_sample.sizes()))));
  const auto wide = torch::cat({context, context.slice(2, 0, 1)}, 2);
  EXPECT_THAT(error_of([&] { controlnet(sample, t, wide, cond); }),
              AllOf(HasSubstr("encoder_hidden_states"), HasSubstr(shape_string(wide.sizes()))));
  const auto one_more = torch::zeros({sample.size(0) + 1}, torch::kInt64);
  EXPECT_THAT(error_of([&] { controlnet(sample, one_more, context, cond); }),
              AllOf(HasSubstr("timestep"), HasSubstr(shape_string(one_more.sizes()))));
  const auto features = torch::zeros({sample.size(0), controlnet->config.unet.block_out_channels[0] + 1});
  EXPECT_THAT(error_of([&] { controlnet->forward_with_time_features(sample, features, context, cond); }),
              AllOf(HasSubstr("timestep features"), HasSubstr(shape_string(features.sizes()))));
}

TEST_F(ControlNet, MatchesTheReferenceFloat32_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::globalContext().setAllowTF32CuBLAS(false);  // parity needs true float32 arithmetic
  at::globalContext().setAllowTF32CuDNN(false);
  auto controlnet = tiny_controlnet(torch::kFloat32);
  controlnet->to(torch::kCUDA);
  torch::NoGradGuard no_grad;
  const auto cuda = [](const std::string& key) { return input(key, torch::kFloat32).to(torch::kCUDA); };
  auto residuals = controlnet(cuda("input.sample"), cuda("input.timestep"), cuda("input.encoder_hidden_states"),
                              cuda("input.controlnet_cond"));
  for (auto& r : residuals.down) r = r.cpu();
  residuals.mid = residuals.mid.cpu();
  EXPECT_LE(max_error(residuals, "output"), kFloat32);
}

}  // namespace
