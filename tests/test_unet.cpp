// Tests of examples/sd/{config,layers,transformer,unet_blocks,unet}.hpp: the SD UNet against the
// reference fixtures (parity in float32 and float64, key lists, parameter counts), its
// configuration parsing, skip sites, timestep handling, bf16 autocast, clone and errors on bad
// input. Lean and fused activations: test_lean_ops.cpp; the VAE: test_vae.cpp.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/compat.hpp>
#include <scedit/sites.hpp>
#include <sd/config.hpp>
#include <sd/unet.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::config_json;
using scedit_test::error_of;
using scedit_test::manifest;
using scedit_test::Models;
using scedit_test::odd_size_case;
using scedit_test::odd_size_case_names;
using scedit_test::parameter_count;
using scedit_test::ProbeEditor;
using scedit_test::rel_err;
using scedit_test::run_base;
using scedit_test::shape_string;
using scedit_test::shapes_of;
using scedit_test::tiny_unet;
using scedit_test::tiny_unet_config;
using scedit_test::unet_case;

// ---- configuration -----------------------------------------------------------------------------

TEST_F(Models, UNetConfigReadsManifestAndAppliesDiffusersDefaults) {
  const json j = config_json("unet_tiny");
  const auto c = tiny_unet_config();
  EXPECT_EQ(c.block_out_channels, j.at("block_out_channels").get<std::vector<int64_t>>());
  EXPECT_EQ(c.down_block_types, j.at("down_block_types").get<std::vector<std::string>>());
  EXPECT_EQ(c.up_block_types, j.at("up_block_types").get<std::vector<std::string>>());
  EXPECT_EQ(c.cross_attention_dim, j.at("cross_attention_dim").get<int64_t>());
  EXPECT_EQ(c.norm_num_groups, j.at("norm_num_groups").get<int64_t>());
  EXPECT_EQ(c.layers_per_block, j.at("layers_per_block").get<int64_t>());
  // num_attention_heads is null, so attention_head_dim is the number of heads (diffusers quirk).
  ASSERT_FALSE(j.contains("num_attention_heads"));
  for (size_t i = 0; i < c.num_blocks(); ++i) {
    EXPECT_EQ(c.heads(i), j.at("attention_head_dim").get<int64_t>());
  }
  // Keys the manifest leaves out take diffusers' defaults.
  EXPECT_EQ(c.act_fn, "silu");
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_TRUE(c.flip_sin_to_cos);
  EXPECT_EQ(c.freq_shift, 0);
  EXPECT_DOUBLE_EQ(c.mid_block_scale_factor, 1.0);
  EXPECT_EQ(c.downsample_padding, 1);
  EXPECT_FALSE(c.use_linear_projection);
  EXPECT_FALSE(c.only_cross_attention);
  EXPECT_FALSE(c.center_input_sample);
  EXPECT_EQ(c.transformer_layers(0), 1);
  EXPECT_EQ(c.time_embed_dim(), 4 * c.block_out_channels[0]);
}

TEST_F(Models, UNetConfigSd15MatchesManifestAndRoundTrips) {
  EXPECT_EQ(sd::UNetConfig::from_json(config_json("unet_sd15")).to_json(),
            sd::UNetConfig::sd15().to_json());
  const auto tiny = tiny_unet_config();
  EXPECT_EQ(sd::UNetConfig::from_json(tiny.to_json()).to_json(), tiny.to_json());
  // SD 2.x style: per-block head counts, linear projections, metadata keys.
  json v2 = config_json("unet_tiny");
  v2["attention_head_dim"] = {1, 2, 4, 4};
  v2["use_linear_projection"] = true;
  v2["upcast_attention"] = true;
  v2["_class_name"] = "UNet2DConditionModel";
  const auto c = sd::UNetConfig::from_json(v2);
  EXPECT_EQ(c.heads(0), 1);
  EXPECT_EQ(c.heads(3), 4);
  EXPECT_EQ(sd::UNetConfig::from_json(c.to_json()).to_json(), c.to_json());
}

TEST_F(Models, UNetConfigRejectsWhatItCannotBuild) {
  auto with = [](const std::string& key, const json& value) {
    json j = config_json("unet_tiny");
    j[key] = value;
    return j;
  };
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("class_embed_type", "timestep")); }),
              AllOf(HasSubstr("class_embed_type"), HasSubstr("timestep")));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("addition_embed_type", "text_time")); }),
              HasSubstr("addition_embed_type"));
  EXPECT_THAT(error_of([&] {
                sd::UNetConfig::from_json(with(
                    "down_block_types",
                    {"SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}));
              }),
              HasSubstr("SimpleCrossAttnDownBlock2D"));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")); }),
              AllOf(HasSubstr("mid_block_type"), HasSubstr("UNetMidBlock2DSimpleCrossAttn")));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("act_fn", "gelu")); }),
              AllOf(HasSubstr("act_fn"), HasSubstr("gelu")));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("layers_per_block", "two")); }),
              AllOf(HasSubstr("layers_per_block"), HasSubstr("two")));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("new_feature", 3)); }),
              AllOf(HasSubstr("unknown key"), HasSubstr("new_feature")));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("attention_head_dim", 7)); }),
              AllOf(HasSubstr("block_out_channels[0]"), HasSubstr("7 attention heads")));
}

// ---- structure and parity ----------------------------------------------------------------------

TEST_F(Models, UNetTinyKeysAndShapesMatchManifest) {
  sd::UNet unet(tiny_unet_config());
  EXPECT_EQ(shapes_of(*unet), shapes_of(manifest().at("keys_unet_tiny")));
}

TEST_F(Models, UNetSd15KeysShapesAndParameterCount) {
  // Built in bfloat16 (half the memory and page faults of float32): only keys, shapes and
  // counts are checked here.
  scedit_test::DefaultDtypeGuard bf16(caffe2::TypeMeta::Make<at::BFloat16>());
  sd::UNet unet(sd::UNetConfig::from_json(config_json("unet_sd15")));
  EXPECT_EQ(unet->conv_in->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(shapes_of(*unet), shapes_of(manifest().at("keys_unet_sd15")));
  EXPECT_EQ(parameter_count(*unet), manifest().at("params_unet_sd15").get<int64_t>());
  EXPECT_EQ(unet->skip_sites().size(), 12u);
}

TEST_F(Models, UNetMatchesReferenceFloat32) {
  auto unet = tiny_unet(torch::kFloat32);
  const auto out = run_base(unet, torch::kFloat32);
  EXPECT_EQ(out.scalar_type(), torch::kFloat32);
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet float32 rel err %.3g\n", err);
  EXPECT_LE(err, 1e-4);
}

TEST_F(Models, UNetMatchesReferenceFloat64) {
  auto unet = tiny_unet(torch::kFloat64);
  const auto out = run_base(unet, torch::kFloat64);
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet float64 rel err %.3g\n", err);
  // Looser than 1e-9 on purpose: diffusers computes the time embedding in float32, and its libm
  // (MKL / Sleef / CUDA) and the correctly rounded values used here may differ by one float32 ulp
  // in an element, which alone moves the output by ~2e-9. Everything after it is float64 and
  // agrees to ~1e-15 (the VAE, which has no time embedding, shows the same layers at that level).
  EXPECT_LE(err, 5e-9);
}

TEST_F(Models, UNetMatchesReferenceAtLatentSizesThatDoNotHalveEvenly) {
  const auto names = odd_size_case_names();
  ASSERT_FALSE(names.empty()) << "no {case}.output in odd_size/unet_odd_cases.safetensors";
  // float64 matches to about 1e-8, not 1e-12: the reference computes its time features in
  // float32 (odd_size/README.md).
  for (const auto& [dtype, tolerance] : {std::pair{torch::kFloat32, 1e-5}, std::pair{torch::kFloat64, 5e-8}}) {
    auto unet = tiny_unet(dtype);
    const int64_t factor = unet->downsampling_factor();
    torch::NoGradGuard no_grad;
    for (const auto& name : names) {
      const auto sample = odd_size_case(name + ".input.sample");
      // Each case has a side off the downsampling grid: some encoder level rounds it up, and the
      // decoder's upsamplers must follow the skips back down.
      EXPECT_TRUE(sample.size(2) % factor != 0 || sample.size(3) % factor != 0) << name;
      const auto out = unet(sample.to(dtype), odd_size_case(name + ".input.timestep"),
                            odd_size_case(name + ".input.encoder_hidden_states").to(dtype));
      ASSERT_EQ(out.sizes(), sample.sizes()) << name;
      const double err = rel_err(out, odd_size_case(name + ".output"));
      std::printf("[ info     ] UNet %s %s rel err %.3g\n", name.c_str(), c10::toString(dtype), err);
      EXPECT_LE(err, tolerance) << name << " in " << dtype;
    }
  }
}

TEST_F(Models, TimestepEmbeddingIsDiffusersSinusoid) {
  // Independent float64 formula: [cos(t·f_j), sin(t·f_j)] with f_j = 10000^(-j / (half - shift)).
  const auto t = torch::tensor({0.0, 10.0, 999.0}, torch::kFloat64);
  const int64_t dim = 32, half = dim / 2;
  for (double shift : {0.0, 1.0}) {
    const auto emb = sd::functional::timestep_embedding(t, dim, /*flip_sin_to_cos=*/true, shift);
    ASSERT_EQ(emb.sizes(), (torch::IntArrayRef{3, dim}));
    EXPECT_EQ(emb.scalar_type(), torch::kFloat32);
    const auto freqs = torch::exp(-std::log(10000.0) * torch::arange(half, torch::kFloat64) /
                                  (static_cast<double>(half) - shift));
    const auto args = t.unsqueeze(1) * freqs.unsqueeze(0);
    const auto expected = torch::cat({args.cos(), args.sin()}, 1);
    // float32 arguments up to ~1000 rad carry ~6e-5 absolute error.
    EXPECT_LT((emb.to(torch::kFloat64) - expected).abs().max().item<double>(), 2e-4);
  }
  const auto unflipped = sd::functional::timestep_embedding(t, dim, false, 0.0);
  const auto flipped = sd::functional::timestep_embedding(t, dim, true, 0.0);
  EXPECT_TRUE(torch::equal(unflipped.slice(1, 0, half), flipped.slice(1, half)));
  EXPECT_EQ(sd::functional::timestep_embedding(t, 33, true, 0.0).size(1), 33);  // zero-padded
}

// ---- skip sites --------------------------------------------------------------------------------

TEST_F(Models, UNetSkipSitesAreIdentityInDecoderOrder) {
  auto unet = tiny_unet(torch::kFloat32);
  const auto dims = manifest().at("tiny_skip_dims_encoder_order").get<std::vector<int64_t>>();
  const auto flags = manifest().at("tiny_input_down_flag").get<std::vector<bool>>();
  EXPECT_EQ(unet->skip_channels(), dims);
  EXPECT_EQ(unet->skip_down_flags(), flags);

  // lsc_identity.{i} in decoder order, with the reversed channels; no parameters.
  auto sites = unet->skip_sites();
  ASSERT_EQ(sites.size(), dims.size());
  const auto found = scedit::find_sites(*unet);
  ASSERT_EQ(found.size(), dims.size());
  for (size_t i = 0; i < sites.size(); ++i) {
    EXPECT_EQ(sites[i]->skip_channels(), dims[dims.size() - 1 - i]) << "site " << i;
    EXPECT_EQ(found[i].path, "lsc_identity." + std::to_string(i));
    EXPECT_EQ(found[i].site, static_cast<scedit::SkipEditing*>(sites[i].get()));
    EXPECT_TRUE(sites[i]->parameters().empty());
  }

  // A probe on every site sees the skips in decoder order with the expected shapes; adding
  // zero leaves the output as the reference's.
  const auto sample = unet_case("input.sample").to(torch::kFloat32);
  std::vector<std::shared_ptr<ProbeEditor>> probes;
  for (auto& site : sites) {
    probes.push_back(std::make_shared<ProbeEditor>());
    site->attach("probe", probes.back());
  }
  const auto base = run_base(unet, torch::kFloat32);
  EXPECT_LE(rel_err(base, unet_case("output.base")), 1e-4);
  int64_t halvings = 0;
  std::vector<std::vector<int64_t>> expected(dims.size());
  for (size_t j = 0; j < dims.size(); ++j) {  // encoder order
    halvings += flags[j] ? 1 : 0;
    expected[dims.size() - 1 - j] = {sample.size(0), dims[j], sample.size(2) >> halvings,
                                     sample.size(3) >> halvings};
  }
  for (size_t i = 0; i < probes.size(); ++i) {
    ASSERT_EQ(probes[i]->shapes.size(), 1u) << "site " << i;
    EXPECT_EQ(probes[i]->shapes[0], expected[i]) << "site " << i;
  }

  // The sites are on the path: a non-zero edit at one site changes the output.
  probes[probes.size() / 2]->value = 0.1;
  EXPECT_GT(rel_err(run_base(unet, torch::kFloat32), base), 1e-4);
}

TEST_F(Models, UNetEncoderRecordsNoGraphAndGradientsReachOnlyTheTuner) {
  auto unet = tiny_unet(torch::kFloat32);
  for (auto& p : unet->parameters()) p.requires_grad_(false);
  const auto sample = unet_case("input.sample").to(torch::kFloat32);
  const auto context = unet_case("input.encoder_hidden_states").to(torch::kFloat32);
  const auto t = unet_case("input.timestep");
  EXPECT_FALSE(unet(sample, t, context).requires_grad());  // frozen model: no graph at all

  auto probe = std::make_shared<ProbeEditor>();
  probe->factor = torch::zeros({}, torch::requires_grad());
  unet->skip_sites()[0]->attach("probe", probe);
  auto out = unet(sample, t, context);
  ASSERT_TRUE(out.requires_grad());
  EXPECT_FALSE(probe->saw_graph);  // the encoder's skip carries no graph
  out.square().sum().backward();
  ASSERT_TRUE(probe->factor.grad().defined());
  EXPECT_NE(probe->factor.grad().item<float>(), 0.0f);
  for (const auto& p : unet->parameters()) EXPECT_FALSE(p.grad().defined());
}

// ---- inputs, variants, clone -------------------------------------------------------------------

TEST_F(Models, UNetTimestepBroadcastsScalarsAndFloats) {
  auto unet = tiny_unet(torch::kFloat64);
  torch::NoGradGuard no_grad;
  const auto sample = unet_case("input.sample");
  const auto context = unet_case("input.encoder_hidden_states");
  const int64_t t0 = unet_case("input.timestep")[0].item<int64_t>();
  const auto per_sample = unet(sample, torch::full({sample.size(0)}, t0, torch::kInt64), context);
  EXPECT_TRUE(torch::equal(unet(sample, torch::tensor(t0), context), per_sample));
  EXPECT_TRUE(torch::equal(unet(sample, torch::full({1}, t0, torch::kInt64), context), per_sample));
  EXPECT_TRUE(torch::equal(unet(sample, torch::tensor(static_cast<double>(t0)), context), per_sample));
}

TEST_F(Models, UNetNonSquareLatentKeepsItsShape) {
  auto unet = tiny_unet(torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto context = unet_case("input.encoder_hidden_states").to(torch::kFloat32);
  // The case's sample, one downsampling step wider.
  auto sizes = unet_case("input.sample").sizes().vec();
  sizes[3] += unet->downsampling_factor();
  const auto sample = torch::randn(sizes);
  const auto out = unet(sample, unet_case("input.timestep"), context);
  EXPECT_EQ(out.sizes(), sample.sizes());
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
}

TEST_F(Models, Transformer2DModelReturnsContiguousNCHW) {
  sd::Transformer2DModel transformer(sd::Transformer2DModelOptions(32, 8, 16).norm_num_groups(8));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 32, 4, 6});
  const auto out = transformer(x, torch::randn({2, 5, 16}));
  EXPECT_EQ(out.sizes(), x.sizes());
  EXPECT_TRUE(out.is_contiguous());
}

TEST_F(Models, UNetLinearProjectionAndPerBlockHeadsRun) {
  json j = config_json("unet_tiny");
  j["attention_head_dim"] = {1, 2, 4, 4};
  j["use_linear_projection"] = true;
  sd::UNet unet(sd::UNetConfig::from_json(j));
  const auto shapes = shapes_of(*unet);
  const int64_t c0 = unet->config.block_out_channels[0];
  EXPECT_EQ(shapes.at("down_blocks.0.attentions.0.proj_in.weight"), (std::vector<int64_t>{c0, c0}));
  const auto& mid = unet->mid_block->transformers.at(0)->blocks.at(0)->attn1->options;
  EXPECT_EQ(mid.heads(), 4);
  torch::NoGradGuard no_grad;
  const auto sample = unet_case("input.sample").to(torch::kFloat32);
  const auto out = unet(sample, torch::tensor(10), unet_case("input.encoder_hidden_states").to(torch::kFloat32));
  EXPECT_EQ(out.sizes(), sample.sizes());
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
}

TEST_F(Models, UNetBFloat16AutocastOnCpuStaysClose) {
  auto unet = tiny_unet(torch::kBFloat16);
  torch::Tensor out;
  {
    scedit::compat::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    out = run_base(unet, torch::kFloat32);
  }
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet bf16 autocast rel err %.3g (dtype %s)\n", err,
              c10::toString(out.scalar_type()));
  EXPECT_LT(err, 5e-2);
}

TEST_F(Models, UNetRejectsBadInputNamingTheShape) {
  auto unet = tiny_unet(torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto sample = unet_case("input.sample").to(torch::kFloat32);
  const auto t = unet_case("input.timestep");
  const auto context = unet_case("input.encoder_hidden_states").to(torch::kFloat32);
  const int64_t batch = sample.size(0), channels = unet->config.in_channels;
  // One channel too many; no rows at all; a context wider than the cross-attention; one
  // timestep more than the batch.
  const std::vector<int64_t> extra_channel{batch, channels + 1, sample.size(2), sample.size(3)};
  EXPECT_THAT(error_of([&] { unet(torch::randn(extra_channel), t, context); }),
              AllOf(HasSubstr("sample [B, " + std::to_string(channels) + ", H, W]"),
                    HasSubstr(shape_string(extra_channel))));
  const std::vector<int64_t> empty{batch, channels, 0, sample.size(3)};
  EXPECT_THAT(error_of([&] { unet(torch::randn(empty), t, context); }),
              AllOf(HasSubstr("must be positive"), HasSubstr(shape_string(empty))));
  const std::vector<int64_t> wider{batch, context.size(1), context.size(2) + 1};
  EXPECT_THAT(error_of([&] { unet(sample, t, torch::randn(wider)); }),
              AllOf(HasSubstr("encoder_hidden_states"), HasSubstr(shape_string(wider))));
  EXPECT_THAT(error_of([&] { unet(sample, torch::zeros({batch + 1}, torch::kInt64), context); }),
              AllOf(HasSubstr("timestep"), HasSubstr(shape_string({batch + 1}))));
}

TEST_F(Models, UNetCloneIsDeepAndUsesItsOwnWeights) {
  auto unet = tiny_unet(torch::kFloat32);
  const auto base = run_base(unet, torch::kFloat32);
  auto copy = std::dynamic_pointer_cast<sd::UNet2DConditionModelImpl>(unet->clone());
  ASSERT_NE(copy, nullptr);
  sd::UNet cloned(copy);
  EXPECT_TRUE(torch::equal(run_base(cloned, torch::kFloat32), base));
  EXPECT_EQ(cloned->skip_sites().size(), unet->skip_sites().size());
  EXPECT_NE(cloned->skip_sites()[0].get(), unet->skip_sites()[0].get());
  {
    // A weight deep in the clone's lists: the clone's forward must see it, the original not.
    torch::NoGradGuard no_grad;
    cloned->ups.at(1)->resnet_blocks.at(0)->conv2->bias.add_(1.0);
    EXPECT_TRUE(torch::equal(
        cloned->named_parameters()["up_blocks.1.resnets.0.conv2.bias"],
        cloned->ups.at(1)->resnet_blocks.at(0)->conv2->bias));
  }
  EXPECT_TRUE(torch::equal(run_base(unet, torch::kFloat32), base));
  EXPECT_GT(rel_err(run_base(cloned, torch::kFloat32), base), 1e-4);
}

TEST_F(Models, LayersPrintTheirOptions) {
  std::ostringstream resnet, attention;
  sd::ResnetBlock2D(sd::ResnetBlock2DOptions(32, 64).temb_channels(128).groups(8).eps(1e-5))
      ->pretty_print(resnet);
  EXPECT_EQ(resnet.str(),
            "sd::ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=128, groups=8, "
            "eps=1e-05)");
  sd::Attention(sd::AttentionOptions(320, 8, 40).cross_attention_dim(768))->pretty_print(attention);
  EXPECT_EQ(attention.str(), "sd::Attention(query_dim=320, heads=8, dim_head=40, cross_attention_dim=768)");
}

}  // namespace
