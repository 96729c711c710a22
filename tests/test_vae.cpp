// Tests of examples/sd/vae.hpp: the SD VAE's configuration, key lists and parameter counts, parity
// with the reference fixtures in float32 and float64, posterior sampling, clone, and errors on
// bad input.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <sd/vae.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <memory>
#include <vector>

namespace {

using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::config_json;
using scedit_test::error_of;
using scedit_test::manifest;
using scedit_test::Models;
using scedit_test::other_case;
using scedit_test::parameter_count;
using scedit_test::rel_err;
using scedit_test::shape_string;
using scedit_test::shapes_of;
using scedit_test::tiny_vae;
using scedit_test::tiny_vae_config;

TEST_F(Models, VAEConfigReadsManifest) {
  const json j = config_json("vae_tiny");
  const auto c = tiny_vae_config();
  EXPECT_EQ(c.block_out_channels, j.at("block_out_channels").get<std::vector<int64_t>>());
  EXPECT_EQ(c.layers_per_block, j.at("layers_per_block").get<int64_t>());
  EXPECT_EQ(c.latent_channels, j.at("latent_channels").get<int64_t>());
  EXPECT_EQ(c.norm_num_groups, j.at("norm_num_groups").get<int64_t>());
  EXPECT_DOUBLE_EQ(c.scaling_factor, 0.18215);  // diffusers' default (not in the manifest)
  EXPECT_TRUE(c.mid_block_add_attention);
  EXPECT_EQ(sd::VAEConfig::from_json(config_json("vae_sd15")).to_json(),
            sd::VAEConfig::sd15().to_json());
  EXPECT_EQ(sd::VAEConfig::from_json(c.to_json()).to_json(), c.to_json());
  json bad = j;
  bad["latents_mean"] = {0.1, 0.2, 0.3, 0.4};
  EXPECT_THAT(error_of([&] { sd::VAEConfig::from_json(bad); }), HasSubstr("latents_mean"));
  bad = j;
  bad["up_block_types"][0] = "AttnUpDecoderBlock2D";
  EXPECT_THAT(error_of([&] { sd::VAEConfig::from_json(bad); }), HasSubstr("AttnUpDecoderBlock2D"));
}

TEST_F(Models, VAETinyAndSd15KeysShapesAndParameterCount) {
  sd::VAE tiny(tiny_vae_config());
  EXPECT_EQ(shapes_of(*tiny), shapes_of(manifest().at("keys_vae_tiny")));
  sd::VAE full(sd::VAEConfig::from_json(config_json("vae_sd15")));
  EXPECT_EQ(shapes_of(*full), shapes_of(manifest().at("keys_vae_sd15")));
  EXPECT_EQ(parameter_count(*full), manifest().at("params_vae_sd15").get<int64_t>());
}

TEST_F(Models, VAEMatchesReference) {
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const double tolerance = dtype == torch::kFloat32 ? 1e-4 : 1e-9;
    auto vae = tiny_vae(dtype);
    torch::NoGradGuard no_grad;
    const auto posterior = vae->encode(other_case("vae.input.image").to(dtype));
    const auto decoded = vae->decode(other_case("vae.input.latent").to(dtype));
    const double e_mean = rel_err(posterior.mean, other_case("vae.output.mean"));
    const double e_logvar = rel_err(posterior.logvar, other_case("vae.output.logvar"));
    const double e_decoded = rel_err(decoded, other_case("vae.output.decoded"));
    std::printf("[ info     ] VAE %s rel err: mean %.3g, logvar %.3g, decoded %.3g\n",
                c10::toString(dtype), e_mean, e_logvar, e_decoded);
    EXPECT_LE(e_mean, tolerance);
    EXPECT_LE(e_logvar, tolerance);
    EXPECT_LE(e_decoded, tolerance);
  }
}

TEST_F(Models, VAESamplesThePosteriorAndClampsLogvar) {
  auto vae = tiny_vae(torch::kFloat64);
  torch::NoGradGuard no_grad;
  const auto image = other_case("vae.input.image");
  const auto p = vae->encode(image);
  const auto noise = torch::randn_like(p.mean);
  EXPECT_TRUE(torch::allclose(sd::AutoencoderKLImpl::sample(p.mean, p.logvar, noise),
                              p.mean + (p.logvar / 2).exp() * noise));
  auto g1 = torch::make_generator<torch::CPUGeneratorImpl>(7);
  auto g2 = torch::make_generator<torch::CPUGeneratorImpl>(7);
  const auto a = sd::AutoencoderKLImpl::sample(p.mean, p.logvar, g1);
  EXPECT_TRUE(torch::equal(a, sd::AutoencoderKLImpl::sample(p.mean, p.logvar, g2)));
  EXPECT_FALSE(torch::equal(a, p.mean));
  // Push the logvar half of the moments far out: it is clamped to [-30, 20].
  const int64_t latent = vae->config.latent_channels;
  vae->quant_conv->bias.slice(0, latent).fill_(1e4);
  EXPECT_EQ(vae->encode(image).logvar.max().item<double>(), 20.0);
  vae->quant_conv->bias.slice(0, latent).fill_(-1e4);
  EXPECT_EQ(vae->encode(image).logvar.min().item<double>(), -30.0);
}

TEST_F(Models, VAERejectsBadInputAndClones) {
  auto vae = tiny_vae(torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto latent = other_case("vae.input.latent").to(torch::kFloat32);
  // The cases' image and latent sizes with one channel too many.
  auto image_sizes = other_case("vae.input.image").sizes().vec(), latent_sizes = latent.sizes().vec();
  image_sizes[1] = vae->config.in_channels + 1;
  latent_sizes[1] = vae->config.latent_channels + 1;
  EXPECT_THAT(error_of([&] { vae->encode(torch::randn(image_sizes)); }),
              AllOf(HasSubstr("encode"), HasSubstr(shape_string(image_sizes))));
  EXPECT_THAT(error_of([&] { vae->decode(torch::randn(latent_sizes)); }),
              AllOf(HasSubstr("decode"), HasSubstr(shape_string(latent_sizes))));
  const auto decoded = vae->decode(latent);
  auto copy = std::dynamic_pointer_cast<sd::AutoencoderKLImpl>(vae->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_TRUE(torch::equal(copy->decode(latent), decoded));
  copy->decoder->ups.at(0)->resnet_blocks.at(0)->conv2->bias.add_(1.0);
  EXPECT_TRUE(torch::equal(vae->decode(latent), decoded));
  EXPECT_FALSE(torch::equal(copy->decode(latent), decoded));
}

}  // namespace
